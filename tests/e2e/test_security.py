"""Hostile input through a real Synapse: oversized transactions, secrets in endpoint
keys, endpoints that would hijack local models, private hosts (docs/operations.md,
"Security model")."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from hivebridge.app import Bridge
from tests.e2e.conftest import Homeserver
from tests.e2e.test_personas import bot_room

#: 60 kB: under Synapse's 64 KiB event limit with the event's other fields.
BODY_BYTES = 60_000


async def test_a_full_transaction_of_large_events_is_taken_in_one_batch(
    homeserver: Homeserver, bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the bridge is slow with one transaction, Synapse queues the next 100
    events and then sends them as one transaction of about 6 MB. Over aiohttp's
    default 1 MiB limit it was refused with 413, and Synapse retried it forever."""
    intake = bridge.parts.intake
    process = intake.process_transaction
    sizes: list[int] = []
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_once(txn_id: str, events: list[Any]) -> bool:
        sizes.append(len(events))
        if not entered.is_set():
            entered.set()
            await release.wait()
        return await process(txn_id, events)

    async with homeserver.owner() as owner:
        room = await bot_room(owner, bridge)
        monkeypatch.setattr(intake, "process_transaction", slow_once)
        first = await owner.send_text(room, "the bridge is slow with this one")
        await asyncio.wait_for(entered.wait(), 30)
        sent = [
            await owner.send_text(room, f"{i:03d} " + "x" * (BODY_BYTES - 4)) for i in range(100)
        ]
        release.set()
        deadline = time.monotonic() + 120
        for event_id in [first, *sent]:
            while await bridge.parts.messages.get(event_id) is None:
                assert time.monotonic() < deadline, f"{event_id} never arrived"
                await asyncio.sleep(0.2)
    stored = await bridge.parts.messages.get(sent[-1])
    assert stored is not None and len(stored.body) == BODY_BYTES
    assert max(sizes) == 100, sizes  # one transaction carried all 100
