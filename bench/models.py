"""Time to first token of a persona whose model is cold, warm, or swapped in under a budget.

Two real local models (the bundled SmolLM2 Q4_1 and the same re-quantised to
Q8_0, made here with llama.cpp's quantiser) behind the local models manager,
requests through the backend a persona uses (loaded on first use):

* cold_load_s: the first request to a model that is not loaded (load + prefill);
* warm_ttft_s: the next request of another room, the model loaded;
* swap_ttft_s: under a memory budget that holds one model, a request to the other
  (unload the least recently used, load, prefill).

Median of ROUNDS rounds each. Prints progress to stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import emit, log, model_path, now, persona_prompt

from hivebridge.inference.local import EngineSettings, LocalModels, ModelSource
from hivebridge.inference.types import ChatMessage, SamplingParams

SETTINGS = EngineSettings(n_ctx=4 * 2048, n_seq_max=4, max_seq_tokens=2048)
PARAMS = SamplingParams(max_tokens=4, temperature=0.0)
PERSONA = ChatMessage("system", persona_prompt("Captain Mira", 24))

_QUANTIZE = """
import sys, llama_cpp as L
p = L.llama_model_quantize_default_params()
p.ftype, p.allow_requantize, p.nthread = L.LLAMA_FTYPE_MOSTLY_Q8_0, True, 1
sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def second_model(workdir: Path) -> Path:
    out = workdir / "q8.gguf"
    subprocess.run(
        [sys.executable, "-c", _QUANTIZE, str(model_path()), str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return out


async def first_token(models: LocalModels, name: str, room: int) -> float:
    msgs = [PERSONA, ChatMessage("user", f"Hello captain, visitor {room} here. How are you?")]
    started = now()
    gen = models.backend(name).generate(msgs, PARAMS, session=f"room{room}")
    async for _ in gen:
        break
    took = now() - started
    await gen.aclose()
    return took


async def run(rounds: int) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="hb-bench-models-"))
    q8 = second_model(workdir)
    sources = [ModelSource("q4", model_path(), default=True), ModelSource("q8", q8)]
    cold, warm, swap = [], [], []
    for r in range(rounds):
        models = LocalModels(lambda: sources, SETTINGS)
        files = {f.name: f for f in await models.rescan()}
        cold.append(await first_token(models, "q4", 1000 * r))
        warm.append(await first_token(models, "q4", 1000 * r + 1))
        # A budget with room for one model: each request to the other one swaps.
        one = max(models.estimate_bytes(f, SETTINGS) for f in files.values())
        models.memory_budget = one + one // 4
        swap.append(await first_token(models, "q8", 1000 * r + 2))
        swap.append(await first_token(models, "q4", 1000 * r + 3))
        await models.close()
        log(f"round {r + 1}: cold {cold[-1]:.3f}s warm {warm[-1]:.3f}s swap {swap[-2:]}")
    os.remove(q8)
    return {
        "cold_load_s": round(statistics.median(cold), 3),
        "warm_ttft_s": round(statistics.median(warm), 3),
        "swap_ttft_s": round(statistics.median(swap), 3),
        "rounds": rounds,
        "models": ["SmolLM2-135M Q4_1", "SmolLM2-135M Q8_0"],
        "prompt_tokens": "~500",
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    emit(asyncio.run(run(args.rounds)))


if __name__ == "__main__":
    main()
