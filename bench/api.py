"""The OpenAI-compatible API vs the engine driven in process: aggregate tok/s, 8 clients.

One local engine (the bundled model) serves both sides, which alternate round
by round so load from other processes drifts over both alike:

* **engine**: 8 concurrent ``engine.generate`` calls in this process;
* **api**: 8 concurrent streaming ``/v1/chat/completions`` requests to the
  API server (in this process, like the bridge) from clients in a separate
  process (aiohttp, reading the SSE stream), each with its own session id.

Each request: a ~300-token persona prompt and a short question, answered with
exactly MAX_TOKENS tokens (``ignore_eos``). aggregate tok/s = completion
tokens / the side's own round times. Goal: api >= 0.9 x engine (the HTTP
layer costs little). One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys

import aiohttp
from _common import emit, log, model_path, now, persona_prompt

from hivebridge.inference.api import ApiModels, ApiServer, ApiSettings, ApiToken
from hivebridge.inference.local import EngineSettings, LocalModels
from hivebridge.inference.local.models import ModelSource, scan_sources
from hivebridge.inference.types import ChatMessage, SamplingParams, collect

CLIENTS = 8
ROUNDS = 4
MAX_TOKENS = 64
KEY = "bench-api-token-0123456789"
PERSONA = persona_prompt("Captain Mira", 14)


def question(client: int, rnd: int, side: str) -> str:
    return f"Sailor {client} ({side}, round {rnd}): tell me one thing about the tides."


# --- the client process ------------------------------------------------------------------


async def client_round(url: str, rnd: int) -> int:
    """One round: CLIENTS concurrent streamed requests; returns completion tokens."""

    async def one(http: aiohttp.ClientSession, c: int) -> int:
        body = {
            "model": "smollm2",
            "messages": [
                {"role": "system", "content": PERSONA},
                {"role": "user", "content": question(c, rnd, "api")},
            ],
            "max_tokens": MAX_TOKENS,
            "temperature": 0.7,
            "seed": c * 31 + rnd,
            "stream": True,
            "ignore_eos": True,
        }
        headers = {"Authorization": f"Bearer {KEY}", "x-session-id": f"client{c}"}
        tokens = 0
        async with http.post(f"{url}/chat/completions", json=body, headers=headers) as resp:
            resp.raise_for_status()
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                data = json.loads(line[5:])
                if data.get("usage"):
                    tokens = int(data["usage"]["completion_tokens"])
        return tokens

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        counts = await asyncio.gather(*(one(http, c) for c in range(CLIENTS)))
    assert all(n == MAX_TOKENS for n in counts), counts
    return sum(counts)


def client_main(url: str) -> None:
    """Read round numbers on stdin, answer each with the tokens received."""
    for line in sys.stdin:
        tokens = asyncio.run(client_round(url, int(line)))
        print(tokens, flush=True)


# --- the server side ---------------------------------------------------------------------


async def main() -> None:
    name = "smollm2"
    settings = EngineSettings(n_ctx=16 * 1536, n_seq_max=16, max_seq_tokens=1536)
    models = LocalModels(
        lambda: scan_sources([ModelSource(name, model_path(), default=True)], None), settings
    )
    await models.rescan()
    engine = await models.load(name)
    server = ApiServer(ApiModels(models), [ApiToken("bench", KEY)], ApiSettings(port=0))
    await server.start()
    client = subprocess.Popen(  # noqa: ASYNC220 - one helper, stopped below
        [sys.executable, __file__, "--client", server.base_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    spent = {"engine": 0.0, "api": 0.0}
    tokens = {"engine": 0, "api": 0}

    async def engine_round(rnd: int) -> int:
        async def one(c: int) -> int:
            msgs = [ChatMessage("system", PERSONA), ChatMessage("user", question(c, rnd, "eng"))]
            params = SamplingParams(
                max_tokens=MAX_TOKENS, temperature=0.7, seed=c * 31 + rnd, repeat_penalty=1.0
            )
            gen = engine.generate(msgs, params, session=f"engine{c}", ignore_eos=True)
            await collect(gen)
            return gen.stats.completion_tokens

        counts = await asyncio.gather(*(one(c) for c in range(CLIENTS)))
        assert all(n == MAX_TOKENS for n in counts), counts
        return sum(counts)

    async def api_round(rnd: int) -> int:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(f"{rnd}\n")
        client.stdin.flush()
        line = await asyncio.to_thread(client.stdout.readline)
        return int(line)

    try:
        await engine_round(-1)  # warm: the persona prefix is pinned, the threads are up
        await api_round(-1)
        for rnd in range(ROUNDS):
            order = ("engine", "api") if rnd % 2 == 0 else ("api", "engine")
            for side in order:
                t0 = now()
                got = await (engine_round(rnd) if side == "engine" else api_round(rnd))
                spent[side] += now() - t0
                tokens[side] += got
            log(f"round {rnd}: engine {tokens['engine'] / spent['engine']:.1f} tok/s, "
                f"api {tokens['api'] / spent['api']:.1f} tok/s")  # fmt: skip
    finally:
        if client.stdin is not None:
            client.stdin.close()
        try:
            client.wait(timeout=30)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()
        await server.stop()
        await models.close()
    rates = {side: tokens[side] / spent[side] for side in spent}
    emit(
        {
            "api_tok_s": round(rates["api"], 1),
            "engine_tok_s": round(rates["engine"], 1),
            "ratio": round(rates["api"] / rates["engine"], 3),
            "goal_ratio_min": 0.9,
            "clients": CLIENTS,
            "workload": f"{ROUNDS} rounds x {CLIENTS} clients x {MAX_TOKENS} tokens, "
            "~300-token persona prompt, streamed",
            "threads": settings.resolved_threads()[0],
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    ROUNDS = args.rounds
    if args.client:
        client_main(args.client)
    else:
        asyncio.run(main())
