"""Time to first reply in an encrypted direct chat vs an unencrypted one.

A private Synapse and the bridge (encryption on, the bundled model, short
greedy replies). Each round a human opens a new direct chat with the persona,
once unencrypted (plain client) and once encrypted (her app encrypts: mautrix's
client crypto), alternating, and sends one message; then a second one in the same
room. Measured: from sending until her app shows the persona's first reply
(decrypted, for the encrypted chat). The first message of an encrypted chat pays
for the key exchange both ways (Olm sessions, Megolm session shared); the second
shows the steady cost. Prints one JSON line last: medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emit, log

from hivebridge.app import Bridge
from hivebridge.devserver.client import HumanClient, is_edit
from hivebridge.devserver.encrypting_client import EncryptingHuman
from hivebridge.devserver.stack import DevStack
from hivebridge.matrix.content import ANSWERS_KEY


def _answer(sender: str, asked: str) -> Any:
    return lambda e: (
        e.get("sender") == sender
        and e.get("type") == "m.room.message"
        and not is_edit(e)
        and e.get("content", {}).get(ANSWERS_KEY) == asked
    )


async def plain_round(stack: DevStack, persona: str, n: int) -> tuple[float, float]:
    synapse = stack.synapse
    async with await HumanClient.create(synapse.url, synapse.shared_secret, f"plain{n}") as h:
        room = await h.create_room([persona], direct=True)
        await h.wait_for_members(room, {h.user_id, persona})
        times = []
        for text in ("Hello! Who are you?", "And what can you do?"):
            started = time.monotonic()
            asked = await h.send_text(room, text)
            await h.wait_for(room, _answer(persona, asked), timeout=120)
            times.append(time.monotonic() - started)
        return times[0], times[1]


async def encrypted_round(stack: DevStack, persona: str, n: int) -> tuple[float, float]:
    synapse = stack.synapse
    h = await EncryptingHuman.create(synapse.url, synapse.shared_secret, f"enc{n}")
    async with h:
        room = await h.create_room([persona], direct=True)
        await h.wait_for_members(room, {h.user_id, persona})
        times = []
        for text in ("Hello! Who are you?", "And what can you do?"):
            started = time.monotonic()
            asked = await h.send_text(room, text)
            reply = await h.wait_for(room, _answer(persona, asked), timeout=120)
            times.append(time.monotonic() - started)
            assert reply["encrypted"]
        return times[0], times[1]


async def run(rounds: int, max_tokens: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hb-bench-e2ee-") as tmp:
        stack = DevStack(
            Path(tmp),
            configure=lambda c: replace(
                c,
                inference=replace(c.inference, max_tokens=max_tokens, temperature=0.0),
                limits=replace(c.limits, requests_per_minute=0),
            ),
        )
        await stack.start()
        bridge = Bridge(stack.config, stack.registration)
        try:
            await bridge.start()
            persona = stack.config.persona_mxid(stack.config.default_persona.name)
            plain: list[tuple[float, float]] = []
            encrypted: list[tuple[float, float]] = []
            for n in range(rounds):
                encrypted.append(await encrypted_round(stack, persona, n))
                plain.append(await plain_round(stack, persona, n))
                log(f"round {n + 1}: encrypted {encrypted[-1]}, plain {plain[-1]}")
        finally:
            await bridge.stop()
            stack.stop()

    def median(values: list[tuple[float, float]], i: int) -> float:
        return round(statistics.median(v[i] for v in values), 3)

    return {
        "bench": "encryption",
        "rounds": rounds,
        "max_tokens": max_tokens,
        "first_reply_plain_s": median(plain, 0),
        "first_reply_encrypted_s": median(encrypted, 0),
        "second_reply_plain_s": median(plain, 1),
        "second_reply_encrypted_s": median(encrypted, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    emit(asyncio.run(run(args.rounds, args.max_tokens)))


if __name__ == "__main__":
    main()
