"""A redaction in room order: a redacted message still waiting is not answered, and the
room's summaries and cached KV forget it (intake has blanked the row by then)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from mautrix.types import Event

from hivebridge.db.messages import StoredMessage
from hivebridge.handler.room_events import RoomEventHandler

ROOM = "!r:x"


def message(event_id: str, body: str) -> StoredMessage:
    return StoredMessage(event_id, ROOM, "@alice:x", "m.text", body, {"body": body}, None, None, 5)


class Store:
    def __init__(self, *rows: StoredMessage) -> None:
        self.rows = {r.event_id: r for r in rows}

    async def get(self, event_id: str) -> StoredMessage | None:
        return self.rows.get(event_id)


class Messages:
    """The message handler's side the room handler uses; one slow message holds the room."""

    def __init__(self, store: Store) -> None:
        self.messages = store
        self.commands = self
        self.answered: list[str] = []
        self.gate = asyncio.Event()
        self.busy = asyncio.Event()

    def is_command(self, body: str) -> bool:
        return body.startswith("!")

    def takes_command(self, msg: StoredMessage) -> bool:
        return self.is_command(msg.body)

    async def on_message(self, room_id: str, msg: StoredMessage, resumed: bool = False) -> None:
        if msg.event_id == "$slow":
            self.busy.set()
            await self.gate.wait()
        self.answered.append(msg.body)


class Handled:
    def __init__(self) -> None:
        self.marked: list[str] = []

    def add(self, event_id: str) -> None:
        self.marked.append(event_id)

    async def flush(self) -> None:
        pass


class Summaries:
    def __init__(self) -> None:
        self.forgot: list[tuple[str, int]] = []

    async def forget_since(self, room_id: str, ts: int) -> None:
        self.forgot.append((room_id, ts))


async def test_a_redacted_message_waiting_in_the_queue_is_not_answered() -> None:
    secret = message("$secret", "my key is hunter2")
    store = Store(message("$slow", "slow"), secret)
    messages, handled, summaries = Messages(store), Handled(), Summaries()
    forgot_kv: list[str] = []

    async def forget_kv(prefix: str) -> int:
        forgot_kv.append(prefix)
        return 0

    handler = RoomEventHandler(
        members=None,  # type: ignore[arg-type]
        membership=None,  # type: ignore[arg-type]
        messages=messages,  # type: ignore[arg-type]
        handled=handled,  # type: ignore[arg-type]
        summarizer=summaries,  # type: ignore[arg-type]
        forget_kv=forget_kv,
    )
    handler.on_event(_event("m.room.message", "$slow"), store.rows["$slow"])
    await messages.busy.wait()
    handler.on_event(_event("m.room.message", "$secret"), secret)
    # Intake blanks the row in the transaction that brings the redaction, then delivers it.
    store.rows["$secret"] = replace(secret, body="", content={})
    handler.on_event(_event("m.room.redaction", "$red", redacts="$secret"), None)
    messages.gate.set()
    await handler.drain()
    assert messages.answered == ["slow"]  # before: "my key is hunter2" was answered
    assert "$secret" in handled.marked
    assert summaries.forgot == [(ROOM, 5)] and forgot_kv == [f"{ROOM}|"]
    await handler.close()


def _event(kind: str, event_id: str, **extra: Any) -> Event:
    raw = {
        "type": kind,
        "event_id": event_id,
        "room_id": ROOM,
        "sender": "@alice:x",
        "origin_server_ts": 5,
        "content": {"msgtype": "m.text", "body": "x"} if kind == "m.room.message" else {},
        **extra,
    }
    return Event.deserialize(raw)
