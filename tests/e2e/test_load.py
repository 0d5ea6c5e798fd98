"""Load: 50 rooms x 20 messages from several humans at once, through real Synapse.

The bridge runs as a subprocess on PostgreSQL so its memory is its own. Two
rounds of 50 x 10 messages, a few of them addressed to the persona (short
replies): every message is stored exactly once, every addressed one answered
exactly once, and the bridge's resident memory does not keep growing from one
round to the next.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from hivebridge.devserver.client import HumanClient
from tests.e2e.bridge_process import (
    BridgeProcess,
    answers_to,
    bridge_config_yaml,
    dump,
    pg_fetch,
    pg_value,
    room_history,
)
from tests.e2e.conftest import Homeserver

HUMANS = 5
ROOMS = 50
PER_ROUND = 10  # messages per room per round; two rounds make 20
ROUNDS = int(os.environ.get("HIVEBRIDGE_LOAD_ROUNDS", "2"))  # more for a soak
ADDRESSED_PER_ROUND = 5  # rooms whose last message of each round addresses the persona
#: Growth of the bridge's RSS allowed from round 1 to round 2. Round 1 pays the
#: one-off costs (room state, caches, allocator arenas); a leak per message
#: would show as about as much again in round 2.
MAX_GROWTH_KIB = 16 * 1024


async def test_fifty_rooms_twenty_messages_each(
    homeserver: Homeserver, postgres_url: str, tmp_path: Path
) -> None:
    config = homeserver.config
    persona = config.persona_mxid(config.default_persona.name)
    bot = config.bot_mxid
    # Short replies from short prompts: the serial local model is not what is measured.
    yaml = bridge_config_yaml(
        config, postgres_url, tmp_path / "data", max_tokens=8, context_tokens=192
    )
    bridge = BridgeProcess.write(tmp_path, yaml, homeserver.registration)
    humans: list[HumanClient] = []
    try:
        await bridge.start()
        humans = [await homeserver.human("load") for _ in range(HUMANS)]
        setup_started = time.monotonic()

        async def make_room(i: int) -> tuple[HumanClient, str]:
            human = humans[i % HUMANS]
            return human, await human.create_room([persona, bot], name=f"load {i}")

        rooms = await asyncio.gather(*(make_room(i) for i in range(ROOMS)))
        await asyncio.gather(
            *(h.wait_for_members(r, {h.user_id, persona, bot}, timeout=90) for h, r in rooms)
        )
        print(f"\n{ROOMS} rooms set up in {time.monotonic() - setup_started:.1f}s")

        addressed: dict[str, tuple[HumanClient, str]] = {}  # event id -> (human, room)
        sent: list[str] = []

        async def talk(index: int, human: HumanClient, room: str, rnd: int) -> None:
            for n in range(PER_ROUND):
                last = n == PER_ROUND - 1
                if last and index % (ROOMS // ADDRESSED_PER_ROUND) == 0:
                    event_id = await human.send_text(
                        room,
                        f"Assistant, say hi to room {index}.",
                        **{"m.mentions": {"user_ids": [persona]}},
                    )
                    addressed[event_id] = (human, room)
                else:
                    event_id = await human.send_text(room, f"round {rnd} chat {n} in room {index}")
                sent.append(event_id)

        async def settled() -> None:
            """All sent messages stored and routed, every addressed one's job done."""
            deadline = time.monotonic() + 120
            while True:
                stored = await pg_value(
                    postgres_url,
                    "SELECT COUNT(*) FROM messages WHERE event_id = ANY($1::text[])",
                    sent,
                )
                open_work = await pg_value(
                    postgres_url,
                    "SELECT COUNT(*) FROM messages WHERE handled=false AND event_id = ANY($1)",
                    sent,
                )
                done = await pg_value(
                    postgres_url, "SELECT COUNT(*) FROM reply_jobs WHERE state='done'"
                )
                if stored == len(sent) and open_work == 0 and done >= len(addressed):
                    return
                assert time.monotonic() < deadline, (stored, open_work, done, len(sent))
                await asyncio.sleep(0.25)

        rss: list[int] = [bridge.rss_kib()]
        rates: list[float] = []
        for rnd in range(ROUNDS):
            started = time.monotonic()
            await asyncio.gather(
                *(talk(i, human, room, rnd) for i, (human, room) in enumerate(rooms))
            )
            elapsed = time.monotonic() - started
            rates.append(ROOMS * PER_ROUND / elapsed)
            await settled()
            settled_s = time.monotonic() - started
            rss.append(bridge.rss_kib())
            print(
                f"round {rnd + 1}: {ROOMS * PER_ROUND} messages sent in {elapsed:.1f}s "
                f"({rates[-1]:.0f}/s), stored, routed and answered after {settled_s:.1f}s; "
                f"bridge RSS {rss[-1] / 1024:.1f} MiB"
            )

        # Every message stored exactly once (event_id is the key: present = once).
        assert len(sent) == len(set(sent)) == ROOMS * PER_ROUND * ROUNDS
        rows = await pg_fetch(
            postgres_url,
            "SELECT event_id FROM messages WHERE event_id = ANY($1::text[])",
            sent,
        )
        assert sorted(r["event_id"] for r in rows) == sorted(sent)
        human_ids = [h.user_id for h in humans]
        stored_human = await pg_value(
            postgres_url, "SELECT COUNT(*) FROM messages WHERE sender = ANY($1::text[])", human_ids
        )
        assert stored_human == len(sent)

        # Every addressed message answered exactly once; nothing else answered.
        await asyncio.sleep(2)  # room for a would-be duplicate
        assert len(addressed) == ADDRESSED_PER_ROUND * ROUNDS
        answered = 0
        for event_id, (human, room) in addressed.items():
            history = await room_history(human, room)
            found = answers_to(history, persona, event_id)
            assert len(found) == 1, f"{event_id}: {len(found)} replies\n{dump(history[-12:])}"
            answered += 1
        persona_messages = await pg_value(
            postgres_url,
            "SELECT COUNT(*) FROM messages WHERE sender=$1 "
            'AND content NOT LIKE \'%"rel_type": "m.replace"%\'',
            persona,
        )
        assert persona_messages == len(addressed), persona_messages
        jobs = await pg_value(postgres_url, "SELECT COUNT(*) FROM reply_jobs WHERE state='done'")
        assert jobs == len(addressed)

        growth = rss[-1] - rss[1]
        print(
            f"load: {len(sent)} messages, {min(rates):.0f}-{max(rates):.0f} messages/s sent, "
            f"{answered} replies (each once); bridge RSS MiB at start and after each round: "
            f"{', '.join(f'{r / 1024:.1f}' for r in rss)} (after round 1: {growth / 1024:+.1f})"
        )
        assert growth < MAX_GROWTH_KIB * (ROUNDS - 1), f"RSS grew {growth / 1024:.1f} MiB"
    finally:
        for human in humans:
            await human.close()
        bridge.stop()
