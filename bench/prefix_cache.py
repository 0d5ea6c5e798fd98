"""TTFT for a persona with a ~1,500-token system prompt: cold, warm, after a restart.

cold: fresh engine, empty snapshot dir (the system prompt is evaluated).
warm: same engine, a different room with the same persona (pinned prefix forked).
restart: a fresh *process* with the same snapshot dir (persona restored from disk at start).

Prints progress to stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import emit, log, model_path, now, persona_prompt

from hivebridge.inference.local import EngineSettings, LocalEngine
from hivebridge.inference.types import ChatMessage, SamplingParams, collect

SETTINGS = dict(n_ctx=8 * 2048, n_seq_max=8, max_seq_tokens=2048)
PARAMS = SamplingParams(max_tokens=4, temperature=0.0)
PERSONA = ChatMessage("system", persona_prompt("Captain Mira", 48))


def question(i: int) -> list[ChatMessage]:
    return [PERSONA, ChatMessage("user", f"Hello captain, this is visitor {i}. How are you?")]


async def ttft(engine: LocalEngine, i: int, session: str) -> tuple[float, dict[str, int]]:
    t0 = now()
    gen = engine.generate(question(i), PARAMS, session=session)
    first = -1.0
    async for _ in gen:
        if first < 0:
            first = now() - t0
    if first < 0:
        first = now() - t0
    s = gen.stats
    counts = {"prompt": s.prompt_tokens, "cached": s.cached_tokens, "evaluated": s.evaluated_tokens}
    return (s.ttft_s if s.ttft_s is not None else first), counts


async def child(snap: Path) -> None:
    """The restarted process: start (restoring personas) and time one request."""
    engine = LocalEngine(model_path(), EngineSettings(snapshot_dir=snap, **SETTINGS))  # type: ignore[arg-type]
    t0 = now()
    await engine.start()
    start_s = now() - t0
    t, counts = await ttft(engine, 99, "restart-room")
    await engine.stop()
    print(
        json.dumps(
            {"ttft_s": t, "start_s": start_s, "restored": engine.restored_personas, **counts}
        )
    )


async def parent() -> None:
    with tempfile.TemporaryDirectory(prefix="hb-prefix-bench-") as tmp:
        snap = Path(tmp) / "snapshots"
        engine = LocalEngine(model_path(), EngineSettings(snapshot_dir=snap, **SETTINGS))  # type: ignore[arg-type]
        await engine.start()
        # warm the compute graph with an unrelated tiny request so "cold" measures the prompt
        await collect(engine.generate([ChatMessage("user", "hi")], PARAMS))
        n_sys = engine.count_tokens(PERSONA.content)
        log(f"persona system prompt: {n_sys} tokens")
        cold, c_counts = await ttft(engine, 0, "room-0")
        log(f"cold ttft {cold:.3f}s {c_counts}")
        warms = []
        for i in range(1, 6):
            t, w_counts = await ttft(engine, i, f"room-{i}")
            warms.append(t)
            log(f"warm ttft {t:.3f}s {w_counts}")
        await engine.stop()  # waits for the snapshot writer
        files = sorted(snap.glob("*.hbsq"))
        log(
            f"snapshots on disk: {len(files)}, "
            f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MiB"
        )
        restarts = []
        for _ in range(3):
            out = subprocess.run(  # noqa: ASYNC221 - the bench waits on purpose
                [sys.executable, __file__, "--child", str(snap)],
                check=True,
                capture_output=True,
                text=True,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            log(f"restart (fresh process): {res}")
            restarts.append(float(res["ttft_s"]))
    warm = statistics.median(warms)
    restart = statistics.median(restarts)
    emit(
        {
            "system_prompt_tokens": n_sys,
            "prompt_tokens": c_counts["prompt"],
            "cold_ttft_s": round(cold, 4),
            "warm_ttft_s": round(warm, 4),
            "restart_ttft_s": round(restart, 4),
            "warm_speedup": round(cold / warm, 1),
            "restart_speedup": round(cold / restart, 1),
        }
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", type=Path)
    args = ap.parse_args()
    asyncio.run(child(args.child) if args.child else parent())
