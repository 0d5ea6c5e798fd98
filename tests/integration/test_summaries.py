"""Chapter summaries, rollback and room mode on real SQLite and real PostgreSQL.

The stores and the prompt's history selection (ConversationHistory.chapter) run on a
real database. The model is faked here (a scripted Backend: the boundary) so
the summarizer's scheduling, failure and storage rules are tested exactly; the
e2e test (tests/e2e/test_memory.py) runs the same path on the real model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

from hivebridge.config import Config, HomeserverConfig, InferenceConfig, SummariesConfig
from hivebridge.conversation import Turn
from hivebridge.db import open_database
from hivebridge.db.messages import MessageStore, StoredMessage
from hivebridge.db.personas import Persona, PersonaStore
from hivebridge.db.rooms import RoomStore
from hivebridge.db.summaries import SummaryStore
from hivebridge.inference.types import (
    ChatMessage,
    GenerationStats,
    InferenceError,
    SamplingParams,
)
from hivebridge.personas.directory import PersonaDirectory
from hivebridge.personas.history import ConversationHistory
from hivebridge.personas.replies import ReplyService
from hivebridge.personas.summaries import Summarizer

ROOM = "!room:hs"
HUMAN = "@alice:hs"
PERSONA = Persona(
    name="assistant", mxid="@hive_assistant:hs", displayname="Assistant", system_prompt="Be kind."
)


class ScriptedGeneration:
    def __init__(self, text: str, fail: bool, gate: asyncio.Event | None) -> None:
        self.stats = GenerationStats()
        self._text, self._fail, self._gate = text, fail, gate

    def __aiter__(self) -> AsyncIterator[str]:
        return self._run()

    async def _run(self) -> AsyncIterator[str]:
        if self._gate is not None:
            await self._gate.wait()
        if self._fail:
            raise InferenceError("model exploded")
        yield self._text

    async def aclose(self) -> None:
        pass


class ScriptedBackend:
    """Answers every request with a fixed text (or fails); records what it was asked."""

    name = "scripted"

    def __init__(self, text: str = "", *, fail: bool = False) -> None:
        self.text, self.fail = text, fail
        self.gate: asyncio.Event | None = None
        self.requests: list[list[ChatMessage]] = []

    def generate(
        self, messages: Sequence[ChatMessage], params: SamplingParams, *, session: str | None = None
    ) -> ScriptedGeneration:
        self.requests.append(list(messages))
        return ScriptedGeneration(self.text, self.fail, self.gate)


class NoMembers:
    """The room members, as far as display names go: nobody is known."""

    async def displayname(self, room_id: str, mxid: str) -> None:
        return None


def config(**summaries: Any) -> Config:
    return Config(
        homeserver=HomeserverConfig(address="http://127.0.0.1:1", domain="hs"),
        inference=InferenceConfig(context_tokens=120),
        summaries=SummariesConfig(**summaries),
    )


def words(text: str) -> int:
    return len(text.split())


def msg(
    i: int, *, me: bool = False, body: str | None = None, thread: str | None = None
) -> StoredMessage:
    return StoredMessage(
        event_id=f"$e{i:02d}",
        room_id=ROOM,
        sender=PERSONA.mxid if me else HUMAN,
        msgtype="m.text",
        body=body or f"message number {i} " + "word " * 10,
        content={"msgtype": "m.text", "body": "x"},
        thread_root=thread,
        in_reply_to=None,
        ts=1000 + i,
        persona=PERSONA.name if me else None,
    )


async def setup(
    db_url: str, cfg: Config
) -> tuple[Any, ConversationHistory, ReplyService, Summarizer]:
    db = await open_database(db_url)
    directory = PersonaDirectory(cfg, PersonaStore(db), cast(Any, None))
    directory.remember(PERSONA)
    summarizer = Summarizer(cfg, SummaryStore(db), words)
    backend = ScriptedBackend("Alice likes green tea.")
    history = ConversationHistory(
        cfg,
        directory,
        cast(Any, NoMembers()),
        MessageStore(db),
        RoomStore(db),
        SummaryStore(db),
        words,
    )
    replies = ReplyService(
        cfg,
        directory,
        history,
        history.messages,
        cast(Any, None),
        cast(Any, None),
        cast(Any, None),
        summarizer,
        backend_for=lambda p: backend,
        model_name=lambda stats, default: default,
    )
    return db, history, replies, summarizer


async def test_summary_store_round_trip_and_upsert(db_url: str) -> None:
    db = await open_database(db_url)
    try:
        store = SummaryStore(db)
        assert await store.get(ROOM) is None
        await store.put(ROOM, "", "first chapter", 10, "$a")
        await store.put(ROOM, "", "second chapter — ünïcode", 20, "$b")
        await store.put(ROOM, "$thread", "a thread", 15, "$t")
        got = await store.get(ROOM)
        assert got is not None and got.summary == "second chapter — ünïcode"
        assert (got.up_to_ts, got.up_to_event_id) == (20, "$b")
        assert got.valid_since(20) and not got.valid_since(21)
        thread = await store.get(ROOM, "$thread")
        assert thread is not None and thread.summary == "a thread"
        await store.delete(ROOM)
        assert await store.get(ROOM) is None
        assert await store.get(ROOM, "$thread") is not None
    finally:
        await db.stop()


async def test_rollback_flag_and_mode_are_stored(db_url: str) -> None:
    db = await open_database(db_url)
    try:
        messages, rooms = MessageStore(db), RoomStore(db)
        for i in range(4):
            await messages.insert(msg(i, me=i % 2 == 1))
        await messages.remove_from_context(["$e02", "$e03"])
        await messages.remove_from_context([])
        assert [m.event_id for m in await messages.in_context(ROOM, 0, 10)] == ["$e00", "$e01"]
        assert len(await messages.recent(ROOM, 0, 10)) == 4  # history stays stored
        assert (await rooms.get(ROOM)).mode == "room"
        await rooms.set_mode(ROOM, "thread")
        assert (await rooms.get(ROOM)).mode == "thread"
    finally:
        await db.stop()


async def test_dropped_turns_become_the_chapter_summary(db_url: str) -> None:
    db, history, replies, summarizer = await setup(
        db_url, config(min_dropped_turns=2, input_tokens=1000)
    )
    try:
        for i in range(12):
            await history.messages.insert(msg(i, me=i % 2 == 1))
        new = msg(12)
        await history.messages.insert(new)
        prompt, chapter = await history.prompt_for(PERSONA, new, group=False)
        assert chapter.summary is None and prompt.turns_dropped >= 2
        replies._maybe_summarize(PERSONA, ROOM, prompt, chapter)
        assert summarizer.running(ROOM)
        # One job per room: a second trigger while it runs is refused.
        assert not summarizer.schedule(
            replies.backend_for(PERSONA), PERSONA, ROOM, "", prompt.dropped, None
        )
        await summarizer.wait_idle(ROOM)
        stored = await summarizer.store.get(ROOM)
        assert stored is not None and stored.summary == "Alice likes green tea."
        covered = prompt.dropped[-1]
        assert stored.up_to_event_id == covered.event_id

        # The next prompt: the summary in the system block, only later turns after it.
        prompt2, chapter2 = await history.prompt_for(PERSONA, new, group=False)
        assert chapter2.summary is not None
        assert "Alice likes green tea." in prompt2.messages[0].content
        assert prompt2.summary_tokens > 0
        assert all(t.ts > covered.ts for t in chapter2.turns)
        assert prompt2.messages[-1].content == new.body

        # A !reset after the summarized turns forgets the summary too.
        await history.rooms.reset_context(ROOM, 1011)
        _, chapter3 = await history.prompt_for(PERSONA, new, group=False)
        assert chapter3.summary is None
        assert [t.event_id for t in chapter3.turns] == ["$e11", "$e12"]  # the new one too
    finally:
        await db.stop()


async def test_a_failed_summary_leaves_raw_history(db_url: str) -> None:
    db, history, _replies, summarizer = await setup(db_url, config(min_dropped_turns=1))
    try:
        for i in range(6):
            await history.messages.insert(msg(i, me=i % 2 == 1))
        failing = ScriptedBackend(fail=True)
        turns = (await history.chapter(ROOM, None, PERSONA)).turns
        assert summarizer.schedule(failing, PERSONA, ROOM, "", turns[:2], None)
        await summarizer.wait_idle()
        empty = ScriptedBackend("   ")
        assert summarizer.schedule(empty, PERSONA, ROOM, "", turns[:2], None)
        await summarizer.wait_idle()
        assert summarizer.failed == 2 and summarizer.written == 0
        assert await summarizer.store.get(ROOM) is None
        assert len((await history.chapter(ROOM, None, PERSONA)).turns) == 6
    finally:
        await db.stop()


async def test_close_cancels_a_running_job(db_url: str) -> None:
    db, history, _replies, summarizer = await setup(db_url, config())
    try:
        await history.messages.insert(msg(0))
        slow = ScriptedBackend("never")
        slow.gate = asyncio.Event()
        turn = Turn("$e00", HUMAN, "alice", False, "hi", 1000)
        assert summarizer.schedule(slow, PERSONA, ROOM, "", [turn], None)
        await asyncio.sleep(0)
        await summarizer.close()
        assert not summarizer.running(ROOM)
        assert await summarizer.store.get(ROOM) is None
    finally:
        await db.stop()


async def test_thread_mode_sees_the_thread_and_rollback_uses_the_flag(db_url: str) -> None:
    db, history, _, _ = await setup(db_url, config())
    try:
        store = history.messages
        await store.insert(msg(0, body="root of the thread"))
        await store.insert(msg(1, me=True, body="main timeline answer"))
        await store.insert(msg(2, body="in the thread", thread="$e00"))
        await store.insert(msg(3, me=True, body="thread answer", thread="$e00"))
        room = [t.event_id for t in (await history.chapter(ROOM, "$e00", PERSONA)).turns]
        assert room == ["$e00", "$e01", "$e02", "$e03"]  # room mode: one conversation
        await history.rooms.set_mode(ROOM, "thread")
        thread = await history.chapter(ROOM, "$e00", PERSONA)
        assert [t.event_id for t in thread.turns] == ["$e00", "$e02", "$e03"]
        main = await history.chapter(ROOM, None, PERSONA)
        assert [t.event_id for t in main.turns] == ["$e00", "$e01"]
        # Rolled-back messages leave every prompt.
        await store.remove_from_context(["$e02", "$e03"])
        thread = await history.chapter(ROOM, "$e00", PERSONA)
        assert [t.event_id for t in thread.turns] == ["$e00"]
    finally:
        await db.stop()


async def test_context_commands_on_stored_history(db_url: str) -> None:
    from hivebridge.commands.base import CommandContext, CommandTable
    from hivebridge.commands.context import ContextCommands

    db, history, _replies, summarizer = await setup(db_url, config())
    try:
        for i in range(4):
            await history.messages.insert(msg(i, me=i % 2 == 1))
        await summarizer.store.put(ROOM, "", "Alice likes tea.", 999, "$before")
        table = CommandTable()

        class Members:
            async def joined(self, room_id: str) -> list[str]:
                return [HUMAN, PERSONA.mxid]

        ContextCommands(
            history, history.rooms, history.messages, history.personas, cast(Any, Members())
        ).register(table)
        answers: list[str] = []

        async def reply(text: str) -> None:
            answers.append(text)

        async def run(body: str) -> str:
            await table.run(CommandContext(ROOM, HUMAN, "user", "$cmd", reply), body)
            return answers[-1]

        ctx = await run("!context")
        assert ctx.startswith("Next prompt for Assistant:")
        assert "• summary: " in ctx and "(no summary yet)" not in ctx
        assert "• turns: " in ctx and "(4 messages)" in ctx
        assert "Alice likes tea." in await run("!summary")
        assert (await run("!rollback 0")).startswith("Usage: !rollback")
        assert (await run("!rollback x y")).startswith("!rollback: too many arguments")
        assert (await run("!rollback")).startswith("Rolled back 1 exchange (2 messages)")
        assert [m.event_id for m in await history.messages.in_context(ROOM, 0, 10)] == [
            "$e00",
            "$e01",
        ]
        assert (await run("!rollback 5")).startswith("Rolled back 1 exchange")
        assert (await run("!rollback")).startswith("Nothing to roll back")
        assert "(0 messages)" in await run("!context")
        assert (await run("!context nobody")).startswith("No persona named")
        assert (await run("!mode")).startswith("This room is in room mode.")
        assert await run("!mode Thread") == (
            "Thread mode: a message in a thread sees only that thread's history."
        )
        assert (await run("!mode sideways")) == "Usage: !mode room|thread"
    finally:
        await db.stop()
