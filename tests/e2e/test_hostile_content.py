"""Content a model, an endpoint or a homeserver should not be trusted with, through a
real Synapse: runaway replies, redacted and edited messages."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from hivebridge.app import Bridge
from hivebridge.conversation.formatting import MAX_REPLY_PIECES, REPLY_CUT_NOTE
from hivebridge.db.personas import Persona
from hivebridge.devserver.client import HumanClient, is_edit, shown_text
from hivebridge.inference.types import (
    Backend,
    ChatMessage,
    Generation,
    SamplingParams,
    collect,
)
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


CANARY = "canary-91b2-DO-NOT-LEAK"


class Recording:
    """Wraps each persona's backend to keep every prompt it is given."""

    def __init__(self, bridge: Bridge) -> None:
        self.prompts: list[tuple[str, list[ChatMessage]]] = []
        self._inner = bridge.parts.replies.backend_for
        bridge.parts.replies.backend_for = self.backend_for

    def backend_for(self, persona: Persona) -> Backend:
        inner, prompts = self._inner(persona), self.prompts

        class Recorded:
            def __getattr__(self, name: str) -> Any:
                return getattr(inner, name)

            def generate(
                self,
                messages: Sequence[ChatMessage],
                params: SamplingParams,
                *,
                session: str | None = None,
            ) -> Generation:
                prompts.append((persona.name, list(messages)))
                return inner.generate(messages, params, session=session)

        return Recorded()  # type: ignore[return-value]

    def of(self, persona: str) -> str:
        """The last prompt ``persona`` was given, as one text."""
        found = [msgs for name, msgs in self.prompts if name == persona]
        assert found, self.prompts
        return "\n".join(m.content or "" for m in found[-1])


async def redact(owner: HumanClient, room: str, event_id: str) -> None:
    txn = f"r{time.time_ns()}"
    await owner.request("PUT", f"/rooms/{quote(room)}/redact/{quote(event_id)}/{txn}", {})


async def test_a_redacted_message_reaches_no_prompt_and_leaves_no_trace(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    """Before: the redacted text stayed in its row and in every later prompt, local and
    remote; an edited message reached models with its first text."""
    endpoint = FakeOpenAI(model="remote-m")
    await endpoint.start()
    recording = Recording(bridge)
    try:
        model = await remote_model(bridge, endpoint, "gpu9")
        async with homeserver.owner() as owner:
            room, remote = await persona_in_room(owner, bridge, "farsight", model)
            local = bridge.config.persona_mxid("homely")
            bot = bridge.config.bot_mxid
            answer = await command(owner, room, f"!persona spawn homely --room {room}", bot)
            assert answer.startswith("Spawned"), answer
            await owner.wait_for_members(room, {local})

            pasted = await owner.send_text(room, f"oops, my api key is {CANARY}")
            colour = await owner.send_text(room, "my favourite colour is blue")
            await owner.send(
                room,
                {
                    "msgtype": "m.text",
                    "body": "* my favourite colour is green",
                    "m.new_content": {"msgtype": "m.text", "body": "my favourite colour is green"},
                    "m.relates_to": {"rel_type": "m.replace", "event_id": colour},
                },
            )
            await reply_to(owner, bridge, room, remote, "farsight, what did I just say?")
            seen = endpoint.requests[-1].body
            assert CANARY in json.dumps(seen)  # the test can see a leak
            assert "green" in json.dumps(seen) and "blue" not in json.dumps(seen)
            # The room's conversation cached in the local engine (a persona's reply
            # could repeat the canary; this cannot).
            cached = bridge.parts.models.backend(bridge.parts.default_model).generate(
                [ChatMessage("user", f"oops, my api key is {CANARY}")],
                SamplingParams(max_tokens=2, temperature=0.0),
                session=f"{room}|{local}",
            )
            await collect(cached)
            assert await kv_holds_canary(bridge)

            await redact(owner, room, pasted)
            deadline = time.monotonic() + 30
            while (row := await bridge.parts.messages.get(pasted)) is None or row.content:
                assert time.monotonic() < deadline, "the redaction never arrived"
                await asyncio.sleep(0.2)
            await bridge.parts.handler.drain()
            assert not await kv_holds_canary(bridge)  # no cached KV holds its tokens

            await reply_to(owner, bridge, room, remote, "farsight, and now?")
            await reply_to(owner, bridge, room, local, "homely, and now?")
    finally:
        await endpoint.stop()
    after = [r.body for r in endpoint.requests if CANARY not in json.dumps(r.body)]
    assert endpoint.requests[-1].body in after  # the remote endpoint no longer gets it
    assert CANARY not in recording.of("farsight") and "and now" in recording.of("farsight")
    assert CANARY not in recording.of("homely") and "and now" in recording.of("homely")
    rows = await bridge.parts.db.fetch("SELECT * FROM messages")
    assert rows and not [dict(r) for r in rows if CANARY in repr(dict(r))]

    summaries = await bridge.parts.db.fetch("SELECT * FROM summaries")
    assert not [dict(r) for r in summaries if CANARY in repr(dict(r))]


async def kv_holds_canary(bridge: Bridge) -> bool:
    """Whether a local engine's sequences or snapshots hold the canary's tokens."""
    for engine in bridge.parts.models.engines().values():
        canary = engine.tokenize(f" {CANARY}")[2:-2]
        assert canary
        held = await engine.call(
            lambda s: (
                [list(seq.tokens) for seq in s.pool.seqs]
                + [list(e.tokens) for e in (s.store._entries.values() if s.store else ())]
            )
        )
        if any(_contains(t, canary) for t in held):
            return True
    return False


def _contains(tokens: list[int], part: list[int]) -> bool:
    return any(tokens[i : i + len(part)] == part for i in range(len(tokens) - len(part) + 1))
