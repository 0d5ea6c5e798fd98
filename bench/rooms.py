"""8 rooms x 6 turns, interleaved: what fraction of prompt tokens is really evaluated?

Rooms share two personas (~300-token system prompts). Each turn, all 8 rooms ask
at once (continuous batching interleaves them); a room's next prompt is its
history plus the reply it got, so only the new suffix should need evaluation.

Prints progress to stderr and one JSON line on stdout.
"""

from __future__ import annotations

import asyncio

from _common import emit, log, model_path, now, persona_prompt, user_turn

from hivebridge.inference.local import EngineSettings, LocalEngine
from hivebridge.inference.types import ChatMessage, SamplingParams, collect

ROOMS, TURNS = 8, 6
PERSONAS = [
    ChatMessage("system", persona_prompt("Captain Mira", 10)),
    ChatMessage("system", persona_prompt("Navigator Olu", 10, seed=1)),
]


async def main() -> None:
    engine = LocalEngine(
        model_path(), EngineSettings(n_ctx=16 * 2048, n_seq_max=16, max_seq_tokens=2048)
    )
    await engine.start()
    histories = [[PERSONAS[r % 2]] for r in range(ROOMS)]
    totals = {"prompt": 0, "evaluated": 0, "cached": 0, "completion": 0}
    t0 = now()
    for turn in range(TURNS):
        gens = []
        for r in range(ROOMS):
            histories[r].append(user_turn(r, turn))
            params = SamplingParams(max_tokens=48, temperature=0.7, seed=r * 100 + turn)
            gens.append(engine.generate(histories[r], params, session=f"!room{r}:hs|@p{r % 2}:hs"))
        replies = await asyncio.gather(*(collect(g) for g in gens))
        for r, (gen, reply) in enumerate(zip(gens, replies, strict=True)):
            histories[r].append(ChatMessage("assistant", reply))
            s = gen.stats
            totals["prompt"] += s.prompt_tokens
            totals["evaluated"] += s.evaluated_tokens
            totals["cached"] += s.cached_tokens
            totals["completion"] += s.completion_tokens
        log(f"turn {turn + 1}: {totals} ({now() - t0:.1f}s)")
    state = await engine.inspect()
    log(f"engine state: {state}")
    await engine.stop()
    emit(
        {
            "rooms": ROOMS,
            "turns": TURNS,
            "evaluated_tokens": totals["evaluated"],
            "cached_tokens": totals["cached"],
            "total_prompt_tokens": totals["prompt"],
            "completion_tokens": totals["completion"],
            "evaluated_fraction": round(totals["evaluated"] / max(1, totals["prompt"]), 4),
            "wall_s": round(now() - t0, 2),
        }
    )


if __name__ == "__main__":
    asyncio.run(main())
