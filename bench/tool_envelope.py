"""Parse rate of the reply envelope on the bundled model, with and without the grammar.

N prompts (a persona with get_weather, current_time and roll_dice; five kinds
of question; sampled at temperature 0.8 with seeds 0..N-1) are answered twice
by the local engine: once constrained by the grammar of the envelope's JSON
schema (what the bridge does), once with the same prompt and no grammar. A
generation "parses" when its raw output is one envelope (strict: no repair of
a cut-off). Also reported: decode speed both ways (the grammar's cost per token).

Prints progress to stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import Counter

from _common import emit, log, model_path

from hivebridge.inference.envelope import EnvelopeError, envelope_request, parse_envelope
from hivebridge.inference.local import EngineSettings, LocalEngine
from hivebridge.inference.types import ChatMessage, SamplingParams, collect
from hivebridge.personas.tools.builtin import current_time_tool, roll_dice_tool, weather_tool

TOOLS = (
    weather_tool("http://127.0.0.1:9", "%t", 1.0).spec(),
    current_time_tool().spec(),
    roll_dice_tool().spec(),
)
SYSTEM = ChatMessage("system", "You are Ada, a helpful assistant in a Matrix chat. Answer briefly.")
QUESTIONS = [
    "What is the weather in London?",
    "Hi! How are you today?",
    "What time is it in Tokyo?",
    "Roll two dice for me.",
    "Tell me a fun fact about owls.",
]


async def run(engine: LocalEngine, n: int, grammar: bool, max_tokens: int) -> dict[str, object]:
    ok = 0
    kinds: Counter[str] = Counter()
    cut = 0
    tokens = 0
    seconds = 0.0
    for i in range(n):
        msgs = [SYSTEM, ChatMessage("user", QUESTIONS[i % len(QUESTIONS)])]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i, tools=TOOLS)
        inner_msgs, inner = envelope_request(msgs, params)
        if not grammar:
            inner = inner.with_(response_format=None)
        gen = engine.generate(inner_msgs, inner, session=f"r{i % 4}")
        raw = await collect(gen)
        st = gen.stats
        tokens += st.completion_tokens
        seconds += max(0.0, st.total_s - (st.ttft_s or 0.0))
        cut += st.finish_reason == "length"
        try:
            kinds[parse_envelope(raw, TOOLS).kind] += 1
            ok += 1
        except EnvelopeError:
            kinds["no envelope"] += 1
        if i % 10 == 9:
            log(f"  {'grammar' if grammar else 'free'}: {i + 1}/{n}, {ok} parsed")
    return {
        "parsed": ok,
        "n": n,
        "rate": round(ok / n, 3),
        "kinds": dict(kinds),
        "cut_by_max_tokens": cut,
        "decode_tok_s": round(tokens / seconds, 1) if seconds else None,
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    engine = LocalEngine(
        model_path(),
        EngineSettings(n_ctx=8192, n_seq_max=8, max_seq_tokens=1024, threads=args.threads),
    )
    await engine.start()
    try:
        load = os.getloadavg()
        with_grammar = await run(engine, args.n, True, args.max_tokens)
        without = await run(engine, args.n, False, args.max_tokens)
    finally:
        await engine.stop()
    emit(
        {
            "bench": "tool_envelope",
            "model": engine.model_name,
            "n": args.n,
            "grammar": with_grammar,
            "no_grammar": without,
            "loadavg_start": [round(x, 2) for x in load],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        }
    )


if __name__ == "__main__":
    asyncio.run(main())
