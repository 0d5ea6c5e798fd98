"""The bridge's own workload, the engine vs llama-server: 24 rooms, 3 long personas, bursts.

24 rooms talk to 3 personas (~1,000-token system prompts; room r has persona
r % 3), 6 turns per room. Each turn every room asks one question; the rooms
arrive in seeded bursts (3-8 rooms at once, 0.3-1.5 s apart), so requests
pile up beyond llama-server's 8 slots (``-np 8 -c 16384``, its default
host-memory prompt cache on) and beyond the engine's running sequences.
Replies are REPLY_TOKENS long (end-of-generation suppressed on both sides).
The sides alternate turn by turn, each timed on its own turns only.

Per side: completion tok/s (completion tokens / the side's own time), time to
first token p50/p95 (from the request's arrival to its first text), prompt
tokens evaluated (engine: GenerationStats.evaluated_tokens; llama-server:
``timings.prompt_n``; ``cache_n`` is what it reused).

Then both restart: the engine (snapshot_dir on disk: pinned personas and the
rooms it kept) and llama-server (its prompt cache lives in memory), and every
room asks one more question, arriving in the same bursts. restart_ttft_ratio =
engine p50 / llama-server p50 on that turn.

Prints progress to stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import _llama_server as ls
import aiohttp
from _common import emit, llama_cpp_build, log, model_path, now, persona_prompt, user_turn
from throughput import as_json, server_body

from hivebridge.inference.local import EngineSettings, LocalEngine
from hivebridge.inference.types import ChatMessage, SamplingParams

ROOMS, TURNS, PERSONA_SENTENCES = 24, 6, 32  # ~1,000 tokens per persona (~31 a sentence)
REPLY_TOKENS = 32
SEED = 19
PERSONAS = [
    ChatMessage("system", persona_prompt(name, PERSONA_SENTENCES, seed=i))
    for i, name in enumerate(["Captain Mira", "Navigator Olu", "Quartermaster Ines"])
]

Result = dict[str, Any]  # ttft_s, evaluated, cached, completion, text


def bursts(turn: int) -> list[tuple[list[int], float]]:
    """(rooms arriving together, pause before the next burst) for one turn, seeded."""
    rng = random.Random(SEED * 1000 + turn)
    rooms = list(range(ROOMS))
    rng.shuffle(rooms)
    out: list[tuple[list[int], float]] = []
    while rooms:
        size = rng.randint(3, 8)
        out.append((rooms[:size], rng.uniform(0.3, 1.5)))
        rooms = rooms[size:]
    return out


def sampling(room: int, turn: int) -> SamplingParams:
    return SamplingParams(max_tokens=REPLY_TOKENS, temperature=0.7, seed=room * 97 + turn)


def engine_settings(snapshot_dir: Path) -> EngineSettings:
    return EngineSettings(
        n_ctx=16 * 2048,
        n_seq_max=16,
        max_seq_tokens=2048,
        snapshot_dir=snapshot_dir,
        snapshot_ram_bytes=1 << 30,
    )


async def engine_ask(engine: LocalEngine, room: int, turn: int, msgs: list[ChatMessage]) -> Result:
    t0 = now()
    ttft: float | None = None
    parts: list[str] = []
    gen = engine.generate(
        msgs, sampling(room, turn), session=f"!room{room}:hs|@p{room % 3}:hs", ignore_eos=True
    )
    async for piece in gen:
        if piece and ttft is None:
            ttft = now() - t0
        parts.append(piece)
    s = gen.stats
    assert s.completion_tokens == REPLY_TOKENS, s
    return {
        "ttft_s": ttft,
        "evaluated": s.evaluated_tokens,
        "cached": s.cached_tokens,
        "completion": s.completion_tokens,
        "text": "".join(parts),
    }


async def server_ask(
    http: aiohttp.ClientSession, url: str, room: int, turn: int, msgs: list[ChatMessage]
) -> Result:
    x = await ls.chat(http, url, as_json(msgs), server_body(sampling(room, turn)))
    t = x["timings"]
    assert x["finish"] == "length", x
    return {
        "ttft_s": x["ttft_s"],
        "evaluated": int(t.get("prompt_n", 0)),
        "cached": int(t.get("cache_n", 0)),
        "completion": int(t.get("predicted_n", 0)),
        "text": x["text"],
    }


async def one_turn(
    ask: Callable[[int, int, list[ChatMessage]], Awaitable[Result]],
    hist: list[list[ChatMessage]],
    turn: int,
) -> tuple[list[Result], float]:
    """Every room asks once, arriving in bursts; (results by room, seconds)."""
    for r in range(ROOMS):
        hist[r].append(user_turn(r, turn))
    t0 = now()
    tasks: dict[int, asyncio.Task[Result]] = {}
    for rooms, pause in bursts(turn):
        for r in rooms:
            tasks[r] = asyncio.create_task(ask(r, turn, list(hist[r])))
        await asyncio.sleep(pause)
    results = [await tasks[r] for r in range(ROOMS)]
    spent = now() - t0
    for r, res in enumerate(results):
        hist[r].append(ChatMessage("assistant", res["text"]))
    return results, spent


def pct(values: list[float], q: float) -> float:
    vs = sorted(values)
    return vs[min(len(vs) - 1, round(q * (len(vs) - 1)))]


def summary(results: list[Result], spent: float) -> dict[str, float]:
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    return {
        "tok_s": round(sum(r["completion"] for r in results) / spent, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p95_s": round(pct(ttfts, 0.95), 3),
        "evaluated": sum(r["evaluated"] for r in results),
        "cached": sum(r["cached"] for r in results),
        "requests": len(results),
    }


async def main() -> None:
    binary, _number = ls.cached_binary() or ls.build()
    threads = EngineSettings().resolved_threads()[0]
    timeout = aiohttp.ClientTimeout(total=3600)
    with tempfile.TemporaryDirectory(prefix="hb-rooms-kv-") as tmp:
        kv_dir = Path(tmp)
        results: dict[str, list[Result]] = {"engine": [], "server": []}
        spent = {"engine": 0.0, "server": 0.0}
        hist = {side: [[PERSONAS[r % 3]] for r in range(ROOMS)] for side in results}
        engine = LocalEngine(model_path(), engine_settings(kv_dir))
        await engine.start()
        server = ls.start(binary, model_path(), parallel=8, n_ctx=16384, threads=threads)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:

                async def s_ask(r: int, t: int, m: list[ChatMessage]) -> Result:
                    return await server_ask(http, server.url, r, t, m)

                async def e_ask(r: int, t: int, m: list[ChatMessage]) -> Result:
                    return await engine_ask(engine, r, t, m)

                asks = {"engine": e_ask, "server": s_ask}
                for turn in range(TURNS):
                    order = ["engine", "server"] if turn % 2 == 0 else ["server", "engine"]
                    for side in order:
                        res, secs = await one_turn(asks[side], hist[side], turn)
                        results[side] += res
                        spent[side] += secs
                        log(f"turn {turn + 1} {side}: {summary(res, secs)}")
            main_load = [round(x, 2) for x in os.getloadavg()]
            # Restart both sides; the engine's snapshot directory survives, the server's RAM not.
            await engine.stop()
            server.stop()
            engine = LocalEngine(model_path(), engine_settings(kv_dir))
            await engine.start()
            server = ls.start(binary, model_path(), parallel=8, n_ctx=16384, threads=threads)
            restart: dict[str, dict[str, float]] = {}
            async with aiohttp.ClientSession(timeout=timeout) as http:
                for side in ("engine", "server"):
                    res, secs = await one_turn(asks_after(side, engine, http, server.url),
                                               hist[side], TURNS)  # fmt: skip
                    restart[side] = summary(res, secs)
                    log(f"after restart {side}: {restart[side]}")
                    log(f"  evaluated by room: {[r['evaluated'] for r in res]}")
                    log(f"  cached by room: {[r['cached'] for r in res]}")
            state = await engine.inspect()
            log(f"engine after restart: restored personas {engine.restored_personas}, "
                f"{ {k: state[k] for k in ('restores', 'evictions', 'snapshots', 'pinned')} }")
        finally:
            await engine.stop()
            server.stop()
    e, s = (summary(results[x], spent[x]) for x in ("engine", "server"))
    emit(
        {
            "engine": e,
            "server": s,
            "ttft_p95_ratio": round(e["ttft_p95_s"] / s["ttft_p95_s"], 2),
            "evaluated_ratio": round(e["evaluated"] / max(1, s["evaluated"]), 2),
            "tok_s_ratio": round(e["tok_s"] / s["tok_s"], 2),
            "restart": restart,
            "restart_ttft_ratio": round(
                restart["engine"]["ttft_p50_s"] / restart["server"]["ttft_p50_s"], 3
            ),
            "workload": f"{ROOMS} rooms, 3 personas of ~1,000 tokens, {TURNS} turns + 1 after "
            f"restart, {REPLY_TOKENS}-token replies, seeded bursts of 3-8 rooms",
            "threads": threads,
            "engine_llama_cpp": llama_cpp_build(),
            "server_llama_cpp": ls.server_build(binary),
            "server_args": f"-np 8 -c 16384 -t {threads} -tb {threads}",
            "load_average_main": main_load,
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
    )


def asks_after(
    side: str, engine: LocalEngine, http: aiohttp.ClientSession, url: str
) -> Callable[[int, int, list[ChatMessage]], Awaitable[Result]]:
    if side == "engine":
        return lambda r, t, m: engine_ask(engine, r, t, m)
    return lambda r, t, m: server_ask(http, url, r, t, m)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=TURNS)
    ap.add_argument("--rooms", type=int, default=ROOMS)
    args = ap.parse_args()
    TURNS, ROOMS = args.turns, args.rooms
    asyncio.run(main())
