"""Sending as a persona or the bot: stable transaction ids, typing, stored outbound."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from mautrix.appservice import IntentAPI
from mautrix.types import EventType, MessageType, TextMessageEventContent

from ..db.messages import MessageStore
from .intake import stored_from_event

log = logging.getLogger("hivebridge.sender")

#: MSC4295: how many more persona-to-persona hops a message may cause.
BOUNCE_LIMIT_KEY = "io.github.m13253.bounce_limit"


def stable_txn_id(*parts: str) -> str:
    """A transaction id derived from what the message answers.

    Synapse deduplicates sends by (user, txn id), so retrying a reply after a
    crash with the same id cannot post it twice.
    """
    return "hb" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


class Sender:
    def __init__(self, messages: MessageStore) -> None:
        self.messages = messages

    async def typing(self, intent: IntentAPI, room_id: str, on: bool) -> None:
        try:
            await intent.set_typing(room_id, timeout=30_000 if on else 0)  # type: ignore[arg-type]
        except Exception as e:  # typing is cosmetic; never fail a reply over it
            log.debug("typing failed in %s: %s", room_id, e)

    async def send_text(
        self,
        intent: IntentAPI,
        room_id: str,
        text: str,
        *,
        txn_id: str,
        notice: bool = False,
        html: str | None = None,
        persona: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        content = TextMessageEventContent(
            msgtype=MessageType.NOTICE if notice else MessageType.TEXT, body=text
        )
        if html:
            content.format = "org.matrix.custom.html"  # type: ignore[assignment]
            content.formatted_body = html
        for key, value in (extra or {}).items():
            content[key] = value
        event_id = await intent.send_message_event(
            room_id,  # type: ignore[arg-type]
            EventType.ROOM_MESSAGE,
            content,
            txn_id=txn_id,
        )
        # Stored unhandled: when the homeserver echoes it back, intake routes it
        # once, so other personas in the room can be addressed by it.
        row = stored_from_event(
            {
                "type": "m.room.message",
                "event_id": str(event_id),
                "room_id": room_id,
                "sender": str(intent.mxid),
                "content": content.serialize(),
                "origin_server_ts": int(time.time() * 1000),
            },
            persona=persona,
        )
        if row is not None:
            await self.messages.insert(row)
        return str(event_id)

    async def edit_text(
        self,
        intent: IntentAPI,
        room_id: str,
        event_id: str,
        text: str,
        *,
        txn_id: str,
        html: str | None = None,
    ) -> str:
        """Replace the text of ``event_id`` (m.replace); clients show the new content."""
        content = TextMessageEventContent(msgtype=MessageType.TEXT, body=text)
        if html:
            content.format = "org.matrix.custom.html"  # type: ignore[assignment]
            content.formatted_body = html
        # mautrix serializes an edit with m.new_content and the "* " fallback body.
        content.set_edit(event_id)  # type: ignore[arg-type]
        edit_id = await intent.send_message_event(
            room_id,  # type: ignore[arg-type]
            EventType.ROOM_MESSAGE,
            content,
            txn_id=txn_id,
        )
        return str(edit_id)
