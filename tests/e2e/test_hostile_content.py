"""Content a model, an endpoint or a homeserver should not be trusted with, through a
real Synapse: runaway replies, redacted and edited messages."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hivebridge.app import Bridge
from hivebridge.conversation.formatting import MAX_REPLY_PIECES, REPLY_CUT_NOTE
from hivebridge.devserver.client import HumanClient, is_edit, shown_text
from hivebridge.personas.replies import ReplyDone
from tests.e2e.conftest import Homeserver
from tests.e2e.test_personas import command
from tests.support.fake_openai import FakeOpenAI

Event = dict[str, Any]

#: Synapse's limit on one event's JSON.
MAX_EVENT_BYTES = 65_536


async def remote_model(bridge: Bridge, endpoint: FakeOpenAI, name: str) -> str:
    """Add ``endpoint`` straight to the running bridge; the catalogue name of its model."""
    await bridge.parts.inference.add_endpoint(name, endpoint.base_url)
    await bridge.parts.catalogue.sync()
    found = [e.name for e in bridge.parts.catalogue.entries() if name in e.endpoints]
    assert found, bridge.parts.catalogue.entries()
    return found[0]


async def persona_in_room(
    owner: HumanClient, bridge: Bridge, name: str, model: str
) -> tuple[str, str]:
    """A new group room with the bot and persona ``name`` answering from ``model``."""
    bot = bridge.config.bot_mxid
    room = await owner.create_room([bot], name=name)
    await owner.wait_for_members(room, {owner.user_id, bot})
    answer = await command(owner, room, f"!persona spawn {name} --model {model} --room {room}", bot)
    assert answer.startswith("Spawned"), answer
    persona = bridge.config.persona_mxid(name)
    await owner.wait_for_members(room, {persona})
    return room, persona


async def reply_to(
    owner: HumanClient, bridge: Bridge, room: str, persona: str, text: str
) -> ReplyDone:
    """Address ``persona`` and wait until its reply is finished (final edit included)."""
    done: asyncio.Queue[ReplyDone] = asyncio.Queue()

    async def on_done(d: ReplyDone) -> None:
        if d.persona.mxid == persona:
            done.put_nowait(d)

    undo = bridge.parts.replies.observe(on_done)
    try:
        await owner.send_text(room, text, **{"m.mentions": {"user_ids": [persona]}})
        return await asyncio.wait_for(done.get(), 120)
    finally:
        undo()


def event_bytes(event: Event) -> int:
    return len(json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode())


async def test_a_runaway_reply_is_split_into_a_few_events_none_over_64_kib(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    """Before: the whole 300 kB answer was one event; Synapse refused it (413) and the
    room got "could not answer" instead."""
    paragraph = "The endpoint keeps talking and talking about nothing at all. " * 8 + "\n\n"
    endpoint = FakeOpenAI(model="chatty", answer=paragraph * 600)
    await endpoint.start()
    try:
        model = await remote_model(bridge, endpoint, "chatty")
        async with homeserver.owner() as owner:
            room, persona = await persona_in_room(owner, bridge, "chatty", model)
            done = await reply_to(owner, bridge, room, persona, "chatty, say something long")
            assert done.error is None and done.reply_event_id is not None
            await owner.sync_once(500)
            events = [e for e in owner.timeline[room] if e.get("sender") == persona]
    finally:
        await endpoint.stop()
    originals = [e for e in events if e["type"] == "m.room.message" and not is_edit(e)]
    assert 2 <= len(originals) <= MAX_REPLY_PIECES, len(originals)
    assert all(event_bytes(e) < MAX_EVENT_BYTES for e in events)
    shown = [shown_text(events, e["event_id"]) for e in originals]
    assert shown[0].startswith("The endpoint keeps talking")
    assert shown[-1].endswith(REPLY_CUT_NOTE.strip()), shown[-1][-80:]
    assert not any("could not answer" in s for s in shown)
