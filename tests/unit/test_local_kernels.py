"""Which llama.cpp builds keep greedy output independent of batching."""

from __future__ import annotations

from hivebridge.inference.local.model import row_dependent_kernels

BASE = "CPU : SSE3 = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 1 | "


def test_stock_llamafile_kernels_depend_on_the_rows() -> None:
    assert row_dependent_kernels(BASE + "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")


def test_patched_llamafile_and_no_llamafile_do_not() -> None:
    patched = BASE + "LLAMAFILE = 1 | LLAMAFILE_ALL_ROWS = 1 | OPENMP = 1 | "
    assert not row_dependent_kernels(patched)
    assert not row_dependent_kernels(BASE + "OPENMP = 1 | REPACK = 1 | ")


def test_the_installed_build_is_the_patched_one() -> None:
    # make builds llama-cpp-python with the patch (Makefile, patches/).
    assert not row_dependent_kernels()
