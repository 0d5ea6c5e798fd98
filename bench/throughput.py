"""Aggregate completion tok/s, 1/4/8 concurrent rooms: the engine vs llama_cpp.server.

Workload (identical for both sides): each room is a multi-turn chat with a
persona (~300-token system prompt, two personas shared by the rooms) and a
short seeded history; it asks TURNS questions in a row, each answered with
exactly MAX_TOKENS tokens (end-of-generation suppressed: ``ignore_eos`` for the
engine, ``logit_bias`` -100 on the EOG tokens for the peer; both report
finish_reason "length", which is checked). N rooms run concurrently.
aggregate tok/s = completion tokens of all rooms / time, prefill included.

The peer is ``python -m llama_cpp.server`` (same model, --n_ctx 2048,
--interrupt_requests false, the same thread count as the engine), streaming
/v1/chat/completions over aiohttp. It serializes requests and keeps one
KV state, so it only reuses a prefix from the request it served last.
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
import json
import os
import signal
import socket
import subprocess
import sys

import aiohttp
from _common import emit, log, model_path, now, persona_prompt, user_turn

from hivebridge.inference.local import EngineSettings, LocalEngine
from hivebridge.inference.types import ChatMessage, SamplingParams, collect

LEVELS = (1, 4, 8)
TURNS = 6  # like bench/rooms.py; override with --turns
UNIFIED = False
PEER_PYTHONPATH: str | None = None  # e.g. a stock llama-cpp-python (llamafile kernels) for the peer
MAX_TOKENS = 64
PERSONAS = [
    ChatMessage("system", persona_prompt("Captain Mira", 10)),
    ChatMessage("system", persona_prompt("Navigator Olu", 10, seed=1)),
]
EOG_TOKENS = (0, 2, 4)  # SmolLM2: <|endoftext|>, <|im_end|>, <repo_name>; checked at start


def history(room: int) -> list[ChatMessage]:
    msgs = [PERSONAS[room % 2]]
    for t in range(2):  # a short seeded past so the prompt is a real conversation
        msgs.append(user_turn(room, 100 + t))
        msgs.append(ChatMessage("assistant", f"Aye, in my {room + t + 3} years I learned a lot."))
    return msgs


def sampling(room: int, turn: int) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, seed=room * 31 + turn)


# --- one turn of one room, per side --------------------------------------------------------


async def engine_turn(
    engine: LocalEngine, level: int, room: int, turn: int, msgs: list[ChatMessage]
) -> str:
    gen = engine.generate(msgs, sampling(room, turn), session=f"L{level}R{room}", ignore_eos=True)
    reply = await collect(gen)
    assert gen.stats.finish_reason == "length", gen.stats
    assert gen.stats.completion_tokens == MAX_TOKENS, gen.stats
    return reply


async def new_engine(threads: int, kv_unified: bool) -> LocalEngine:
    settings = EngineSettings(
        n_ctx=8192 if kv_unified else 16 * 1536,  # partitioned: 16 x 1,536 cells
        n_seq_max=16,
        max_seq_tokens=1536,
        threads=threads,
        kv_unified=kv_unified,
    )
    engine = LocalEngine(model_path(), settings)
    await engine.start()
    await collect(engine.generate([ChatMessage("user", "hi")], SamplingParams(max_tokens=2)))
    return engine


# --- peer side ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def peer_request(
    http: aiohttp.ClientSession, url: str, msgs: list[ChatMessage], params: SamplingParams
) -> tuple[str, str | None]:
    body = {
        "messages": [{"role": m.role, "content": m.content} for m in msgs],
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "repeat_penalty": params.repeat_penalty,
        "seed": params.seed,
        "stream": True,
        "logit_bias": {str(t): -100.0 for t in EOG_TOKENS},
    }
    parts: list[str] = []
    finish: str | None = None
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            choice = json.loads(data)["choices"][0]
            parts.append(choice.get("delta", {}).get("content") or "")
            finish = choice.get("finish_reason") or finish
    return "".join(parts), finish


def llamafile_build(env: dict[str, str]) -> bool:
    """Whether the llama_cpp that ``env`` imports was built with llamafile kernels."""
    probe = "from hivebridge.inference.local.model import llamafile_kernels as k; print(k())"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip() == "True"


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = now() + timeout
    async with aiohttp.ClientSession() as http:
        while now() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("llama_cpp.server exited early")
            try:
                async with http.get(f"{url}/v1/models") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError("llama_cpp.server did not come up")


async def run_level(level: int, threads: int, url: str, sides: list[str]) -> dict[str, float]:
    """Interleave the sides round by round (all rooms ask one question per round).

    Load from other processes drifts over minutes; alternating ~10-60 s rounds
    exposes every side to the same conditions. Each side's rate = its
    completion tokens / the sum of its own round times.
    """
    engines = {
        s: await new_engine(threads, s == "engine_unified_kv") for s in sides if s != "peer"
    }
    timeout = aiohttp.ClientTimeout(total=3600)
    spent = dict.fromkeys(sides, 0.0)
    hist = {s: [history(r) for r in range(level)] for s in sides}
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await peer_request(http, url, [ChatMessage("user", "hi")], SamplingParams(max_tokens=2))
            for turn in range(TURNS):
                order = sides if turn % 2 == 0 else sides[::-1]
                for side in order:
                    msgs = hist[side]
                    for r in range(level):
                        msgs[r].append(user_turn(r, turn))
                    t0 = now()
                    if side == "peer":
                        results = await asyncio.gather(
                            *(
                                peer_request(http, url, msgs[r], sampling(r, turn))
                                for r in range(level)
                            )
                        )
                        assert all(f == "length" for _, f in results), results  # MAX_TOKENS each
                        replies = [text for text, _ in results]
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


async def main() -> None:
    path = model_path()
    threads = EngineSettings().resolved_threads()[0]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
        "--port", str(port), "--n_ctx", "2048", "--interrupt_requests", "false",
        "--n_threads", str(threads), "--n_threads_batch", str(threads),
    ]  # fmt: skip
    env = dict(os.environ)
    if PEER_PYTHONPATH:
        env["PYTHONPATH"] = PEER_PYTHONPATH
    peer_llamafile = llamafile_build(env)
    log("starting peer:", " ".join(cmd), f"(llamafile kernels: {peer_llamafile})")
    proc = subprocess.Popen(  # noqa: ASYNC220 - one server, stopped by its PID below
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    sides = ["engine", "peer"] + (["engine_unified_kv"] if UNIFIED else [])
    results: dict[str, dict[str, float]] = {side: {} for side in sides}
    load: list[float] = []
    try:
        await wait_ready(url, proc)
        for level in LEVELS:
            rates = await run_level(level, threads, url, sides)
            for side, rate in rates.items():
                results[side][str(level)] = round(rate, 2)
            load.append(round(os.getloadavg()[0], 2))
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    engine, peer = results["engine"], results["peer"]
    emit(
        {
            "engine": engine,
            "peer": peer,
            "ratio_vs_peer_1": round(engine["1"] / peer["1"], 2),
            "ratio_vs_peer_8": round(engine["8"] / peer["8"], 2),
            "ratio_vs_single_8": round(engine["8"] / engine["1"], 2),
            **({"engine_unified_kv": results["engine_unified_kv"]} if UNIFIED else {}),
            "workload": f"{TURNS} turns x {MAX_TOKENS} tokens per room, ~330-token personas",
            "threads": threads,
            # Builds: the engine's llama.cpp is built without llamafile kernels (Makefile).
            "engine_llamafile": llamafile_build(dict(os.environ)),
            "peer_llamafile": peer_llamafile,
            "loadavg_1m_after_level": load,  # other work on the box adds noise
        }
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=TURNS, help="questions per room")
    ap.add_argument("--unified", action="store_true", help="also run kv_unified=True")
    ap.add_argument("--peer-pythonpath", help="PYTHONPATH for the peer (another llama_cpp build)")
    args = ap.parse_args()
    TURNS, UNIFIED, PEER_PYTHONPATH = args.turns, args.unified, args.peer_pythonpath
    asyncio.run(main())
