"""Where a decode step's time goes, 1 and 8 rooms: the engine's own profile beside llama-server's.

The workload is bench/throughput.py's (TURNS questions x 64 tokens per room).
For the engine, per pure-decode step (one token per running room): time inside
``llama_decode``; sampling + detokenising + stop strings + queuing updates
(``sample``); admission and batch filling; the rest of the engine thread's
loop (command queue, hand-off to the event loop); and the wall clock per step
as the rooms see it. CPU seconds per thread (from /proc) show who else wants
the two cores while llama.cpp's workers spin: the event-loop thread (main),
the engine thread, the OpenMP workers. For llama-server: its own
``timings.predicted_per_token_ms`` per request, same rooms and turns.

``--variant`` runs the engine with an EngineSettings change (e.g.
``adaptive_threads=False``) to compare policies in the same run.

Prints progress to stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from pathlib import Path
from typing import Any

import _llama_server as ls
import aiohttp
import throughput as tp
from _common import emit, llama_cpp_build, log, model_path, now

from hivebridge.inference.local import EngineSettings
from hivebridge.inference.types import ChatMessage

LEVELS = (1, 8)
CLK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread name of this process (utime + stime)."""
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        secs = (int(fields[11]) + int(fields[12])) / CLK
        key = "main" if int(task.name) == os.getpid() else name
        out[key] = out.get(key, 0.0) + secs
    return out


async def engine_level(level: int, threads: int, overrides: dict[str, Any]) -> dict[str, Any]:
    eng = await tp.new_engine(threads, False, **overrides)
    hist = [tp.history(r) for r in range(level)]
    before = thread_cpu()
    base = dict((await eng.inspect())["profile"])
    t0 = now()
    for turn in range(tp.TURNS):
        for r in range(level):
            hist[r].append(tp.user_turn(r, turn))
        replies = await asyncio.gather(
            *(tp.engine_turn(eng, level, r, turn, hist[r]) for r in range(level))
        )
        for r in range(level):
            hist[r].append(ChatMessage("assistant", replies[r]))
    wall = now() - t0
    state = await eng.inspect()
    after = thread_cpu()
    await eng.stop()
    p = {k: v - base.get(k, 0.0) for k, v in state["profile"].items()}
    steps = max(1.0, p["decode_only_steps"])
    total_steps = max(1, state["steps"])
    inside = p["admit_s"] + p["fill_s"] + p["decode_s"] + p["sample_s"]
    cpu = {k: round(after.get(k, 0.0) - before.get(k, 0.0), 2) for k in after}
    tokens = level * tp.TURNS * tp.MAX_TOKENS
    return {
        "tok_s": round(tokens / wall, 1),
        "wall_s": round(wall, 2),
        "steps": total_steps,
        "decode_only_steps": int(p["decode_only_steps"]),
        "ms_per_decode_step": {
            "llama_decode": round(1000 * p["decode_only_s"] / steps, 2),
            "sample_detok_emit": round(1000 * p["decode_only_sample_s"] / steps, 3),
        },
        "ms_per_step_all": {
            "admit": round(1000 * p["admit_s"] / total_steps, 3),
            "fill": round(1000 * p["fill_s"] / total_steps, 3),
            "decode": round(1000 * p["decode_s"] / total_steps, 2),
            "sample": round(1000 * p["sample_s"] / total_steps, 3),
            "loop_rest": round(1000 * (p["loop_s"] - inside) / total_steps, 3),
            "turns_wait": round(1000 * p["turns_wait_s"] / total_steps, 3),
            "wall": round(1000 * wall / total_steps, 2),
        },
        "threads_chosen": state["threads"],
        "thread_switches": state["thread_switches"],
        "cpu_s_by_thread": {k: v for k, v in cpu.items() if v > 0},
    }


async def server_level(level: int, url: str) -> dict[str, Any]:
    hist = [tp.history(r) for r in range(level)]
    per_tok: list[float] = []
    t0 = now()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as http:
        for turn in range(tp.TURNS):
            for r in range(level):
                hist[r].append(tp.user_turn(r, turn))
            res = await asyncio.gather(
                *(
                    ls.chat(http, url, tp.as_json(hist[r]), tp.server_body(tp.sampling(r, turn)))
                    for r in range(level)
                )
            )
            for r, x in enumerate(res):
                hist[r].append(ChatMessage("assistant", x["text"]))
                per_tok.append(float(x["timings"].get("predicted_per_token_ms", 0.0)))
    wall = now() - t0
    return {
        "tok_s": round(level * tp.TURNS * tp.MAX_TOKENS / wall, 1),
        "predicted_per_token_ms_median": round(statistics.median(per_tok), 2),
    }


async def main(variant: dict[str, Any], with_server: bool) -> None:
    threads = EngineSettings().resolved_threads()[0]
    result: dict[str, Any] = {"engine": {}, "variant": variant}
    server = None
    if with_server:
        binary, _ = tp.peer_binary()
        server = ls.start(binary, model_path(), parallel=8, n_ctx=16384, threads=threads)
        result["server"] = {}
        result["server_llama_cpp"] = ls.server_build(binary)
    try:
        for level in LEVELS:
            result["engine"][str(level)] = await engine_level(level, threads, variant)
            log(f"engine N={level}: {result['engine'][str(level)]}")
            if server is not None:
                result["server"][str(level)] = await server_level(level, server.url)
                log(f"server N={level}: {result['server'][str(level)]}")
    finally:
        if server is not None:
            server.stop()
    result["engine_llama_cpp"] = llama_cpp_build()
    result["threads"] = threads
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    emit(result)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=tp.TURNS)
    ap.add_argument("--variant", help="EngineSettings changes, e.g. adaptive_threads=false")
    ap.add_argument("--no-server", action="store_true")
    args = ap.parse_args()
    tp.TURNS = args.turns
    asyncio.run(main(tp.parse_variant(args.variant), not args.no_server))
