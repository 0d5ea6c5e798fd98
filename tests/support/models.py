"""A second real model for tests: the bundled GGUF re-quantised to Q8_0 with llama.cpp.

A different file, size, quantisation and fingerprint, made in about a second;
it answers like the bundled model (the same weights, finer steps). The
quantiser runs in a child process because llama.cpp prints every tensor.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hivebridge.inference.bundled import bundled_model_path

_QUANTIZE = """
import sys
import llama_cpp as L
params = L.llama_model_quantize_default_params()
params.ftype = getattr(L, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
params.allow_requantize = True
params.nthread = 1
sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def quantized_copy(dest: Path, ftype: str = "Q8_0") -> Path:
    """The bundled model re-quantised into ``dest``; raises if llama.cpp refuses."""
    source = bundled_model_path()
    if source is None:
        raise RuntimeError("the bundled model is not installed")
    dest.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", _QUANTIZE, str(source), str(dest), ftype],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=300,
    )
    if done.returncode != 0 or not dest.is_file():
        raise RuntimeError(f"quantizing to {ftype} failed: {done.stderr.decode()[-500:]}")
    return dest
