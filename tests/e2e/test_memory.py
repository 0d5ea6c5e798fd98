"""Conversation memory through a real Synapse and the real bundled model.

The prompts the model receives are captured by a thin wrapping Backend (the
real local engine answers), so the assertions are about what the bridge put
into the prompt, never about the small model's wisdom.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hivebridge.app import Bridge
from hivebridge.config import Config, SummariesConfig
from hivebridge.db.personas import Persona
from hivebridge.devserver.client import HumanClient
from hivebridge.inference.types import Backend, ChatMessage, Generation, SamplingParams
from hivebridge.personas.replies import ReplyDone
from tests.e2e.conftest import Homeserver

Event = dict[str, Any]


class RecordingBackend:
    """Passes every request to the real backend and keeps the messages it was given."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.prompts: list[tuple[str | None, list[ChatMessage]]] = []

    def generate(
        self, messages: Sequence[ChatMessage], params: SamplingParams, *, session: str | None = None
    ) -> Generation:
        self.prompts.append((session, list(messages)))
        return self.inner.generate(messages, params, session=session)

    def replies(self) -> list[list[ChatMessage]]:
        return [m for s, m in self.prompts if s is None or not s.endswith("|summary")]


@dataclass
class Timings:
    first_visible_s: list[float] = field(default_factory=list)
    edits: list[int] = field(default_factory=list)

    def report(self, label: str) -> None:
        if self.first_visible_s:
            print(
                f"\n[{label}] {len(self.edits)} replies: edits per reply "
                f"mean {statistics.mean(self.edits):.2f} max {max(self.edits)}; "
                f"time to first visible text median "
                f"{statistics.median(self.first_visible_s):.2f}s "
                f"max {max(self.first_visible_s):.2f}s"
            )


@asynccontextmanager
async def running(
    config: Config, registration: Path
) -> AsyncIterator[tuple[Bridge, RecordingBackend]]:
    """A bridge whose replies (and summaries) go through a RecordingBackend."""
    bridge = Bridge(config, registration)
    await bridge.start()
    try:
        recorder = RecordingBackend(bridge.parts.models.backend(bridge.parts.default_model))

        def backend_for(persona: Persona) -> Backend:
            return recorder

        bridge.parts.replies.backend_for = backend_for
        yield bridge, recorder
    finally:
        await bridge.stop()


def is_original_text(sender: str) -> Any:
    def check(e: Event) -> bool:
        content = e.get("content", {})
        return (
            e.get("type") == "m.room.message"
            and e.get("sender") == sender
            and content.get("msgtype") == "m.text"
            and content.get("m.relates_to", {}).get("rel_type") != "m.replace"
        )

    return check


def notices_from(client: HumanClient, room: str, sender: str) -> list[Event]:
    return [
        e
        for e in client.timeline.get(room, [])
        if e.get("sender") == sender and e.get("content", {}).get("msgtype") == "m.notice"
    ]


async def say(
    client: HumanClient, room: str, persona: str, text: str, bridge: Bridge, timings: Timings
) -> Event:
    """Send one turn and wait for the persona's answer (its first, unedited event)."""
    original = is_original_text(persona)
    seen = {e["event_id"] for e in client.timeline.get(room, []) if original(e)}
    finished: list[ReplyDone] = []

    async def on_done(done: ReplyDone) -> None:
        finished.append(done)

    undo = bridge.parts.replies.observe(on_done)
    try:
        await client.send_text(room, text)
        reply = await client.wait_for(
            room, lambda e: original(e) and e["event_id"] not in seen, timeout=120
        )
        assert not reply["content"]["body"].startswith("⚠️"), reply["content"]["body"]
        await bridge.parts.handler.drain()
    finally:
        undo()
    live = finished[-1]
    assert live is not None and live.first_visible_s is not None
    timings.first_visible_s.append(live.first_visible_s)
    timings.edits.append(live.edits)
    return reply


async def command(client: HumanClient, room: str, persona: str, body: str) -> str:
    """A command in the DM: the persona answers it with a notice (no bot in the room)."""
    seen = len(notices_from(client, room, persona))
    await client.send_text(room, body)
    deadline = time.monotonic() + 30
    while len(notices_from(client, room, persona)) <= seen:
        assert time.monotonic() < deadline, f"no answer to {body!r}"
        await client.sync_once(500)
    return str(notices_from(client, room, persona)[seen]["content"]["body"])


async def open_dm(
    homeserver: Homeserver, config: Config, name: str
) -> tuple[HumanClient, str, str]:
    persona = config.persona_mxid(config.default_persona.name)
    client = await homeserver.human(name)
    room = await client.create_room([persona], direct=True)
    await client.wait_for_members(room, {client.user_id, persona})
    return client, room, persona


@asynccontextmanager
async def dm(
    homeserver: Homeserver, config: Config, name: str
) -> AsyncIterator[tuple[HumanClient, str, str]]:
    """A fresh human in a DM with the default persona (the bridge must be running)."""
    client, room, persona = await open_dm(homeserver, config, name)
    async with client:
        yield client, room, persona


def texts(messages: Sequence[ChatMessage]) -> str:
    return "\n".join(m.content for m in messages)


FACT = "My cat is called Quintessa and she is orange."
SMALL_TALK = [
    "What is a good name for a boat?",
    "Tell me one fact about the moon.",
    "Which fruit is yellow?",
    "Say hello in French.",
    "What is two plus two?",
    "Name a famous painter.",
    "Which ocean is the largest?",
    "What do bees make?",
    "Name a planet.",
    "What colour is the sky?",
    "Suggest a breakfast.",
    "Name a musical instrument.",
    "What is the capital of Italy?",
]


def bridge_config(homeserver: Homeserver, tmp_path: Path, **inference: Any) -> Config:
    config = replace(homeserver.config, data_dir=str(tmp_path / "bridge"))
    if inference:
        config = replace(config, inference=replace(config.inference, **inference))
    return config


async def test_ten_turns_with_a_restart_keep_the_first_fact(
    homeserver: Homeserver, tmp_path: Path
) -> None:
    config = bridge_config(homeserver, tmp_path)
    timings = Timings()
    async with running(config, homeserver.registration) as (bridge, _):
        client, room, persona = await open_dm(homeserver, config, "memo")
        try:
            await say(client, room, persona, FACT, bridge, timings)
            for text in SMALL_TALK[:4]:
                await say(client, room, persona, text, bridge, timings)
        except BaseException:
            await client.close()
            raise
    # Turn 6 onwards on a fresh process: the memory is the database.
    async with client, running(config, homeserver.registration) as (bridge, recorder):
        for text in SMALL_TALK[4:9]:
            await say(client, room, persona, text, bridge, timings)
        tenth = recorder.replies()[-1]
        assert tenth[0].role == "system"
        assert "Quintessa" in texts(tenth), "turn 1 fell out of the prompt of turn 10"
        assert tenth[-1] == ChatMessage("user", SMALL_TALK[8])
        users = [m.content for m in tenth if m.role == "user"]
        assert users == [FACT, *SMALL_TALK[:9]]  # every turn, in order, once
        assert sum(m.role == "assistant" for m in tenth) == 9
    timings.report("10-turn DM, restart after turn 5")


async def test_long_conversation_is_folded_into_a_summary(
    homeserver: Homeserver, tmp_path: Path
) -> None:
    config = bridge_config(homeserver, tmp_path, context_tokens=200)
    config = replace(config, summaries=SummariesConfig(min_dropped_turns=2, max_tokens=48))
    timings = Timings()
    async with (
        running(config, homeserver.registration) as (bridge, recorder),
        dm(homeserver, config, "longtalk") as (client, room, persona),
    ):
        started = time.monotonic()
        await say(client, room, persona, FACT, bridge, timings)
        for text in SMALL_TALK:
            await say(client, room, persona, text, bridge, timings)
            await bridge.parts.summarizer.wait_idle(room)
            if bridge.parts.summarizer.written:
                break
        summary_s = time.monotonic() - started
        stored = await bridge.parts.summarizer.store.get(room)
        assert stored is not None and stored.summary.strip(), "no summary was written"
        # The summarizer read the oldest turns (the fact) through the persona's backend.
        asked = [m for s, m in recorder.prompts if s == f"{room}|summary"]
        assert asked and "Quintessa" in texts(asked[0])

        # The next prompt: summary in the system block, only the turns after it.
        history = bridge.parts.history
        me = bridge.parts.personas.get(persona)
        assert me is not None
        prompt, chapter = await history.next_prompt(me, room, None, group=False)
        assert chapter.summary is not None
        assert stored.summary.strip() in prompt.messages[0].content
        assert prompt.summary_tokens > 0
        assert all(t.ts > stored.up_to_ts for t in chapter.turns)
        assert FACT not in [t.body for t in chapter.turns]

        # The summary is what the next reply sees, and !summary / !context show it.
        await say(client, room, persona, "Thanks!", bridge, timings)
        assert stored.summary.strip() in recorder.replies()[-1][0].content
        shown = await command(client, room, persona, "!summary")
        assert stored.summary.strip() in shown
        ctx = await command(client, room, persona, "!context")
        assert "system:" in ctx and "turns:" in ctx
        assert f"summary: {prompt.summary_tokens}" in ctx
        print(
            f"\n[summary] written after {len(timings.edits)} turns, {summary_s:.1f}s; "
            f"{len(stored.summary)} chars: {stored.summary[:120]!r}"
        )
    timings.report("long DM with summaries")


async def test_rollback_removes_the_last_exchange(homeserver: Homeserver, tmp_path: Path) -> None:
    config = bridge_config(homeserver, tmp_path)
    timings = Timings()
    async with (
        running(config, homeserver.registration) as (bridge, recorder),
        dm(homeserver, config, "undo") as (client, room, persona),
    ):
        await say(client, room, persona, "Please remember the number 41.", bridge, timings)
        answer = await say(client, room, persona, "The secret word is pineapple.", bridge, timings)
        assert "pineapple" in texts(recorder.replies()[-1])

        bad = await command(client, room, persona, "!rollback lots")
        assert bad.startswith("Usage: !rollback")
        done = await command(client, room, persona, "!rollback")
        assert done.startswith("Rolled back 1 exchange (2 messages)"), done

        # Stored still, but out of the context: neither the prompt nor !context has it.
        assert await bridge.parts.messages.get(answer["event_id"]) is not None
        await say(client, room, persona, "What do you remember?", bridge, timings)
        last = recorder.replies()[-1]
        assert "pineapple" not in texts(last)
        assert answer["content"]["body"] not in [m.content for m in last[1:-1]]
        assert "Please remember the number 41." in texts(last)
        assert "Usage: !mode" in await command(client, room, persona, "!mode sideways")
        assert "Thread mode" in await command(client, room, persona, "!mode thread")
        assert (await bridge.parts.rooms.get(room)).mode == "thread"
    timings.report("rollback DM")
