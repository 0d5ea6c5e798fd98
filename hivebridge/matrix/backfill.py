"""Backfill: fetch a room's messages that never reached the bridge, and store them.

The homeserver pushes every event to the appservice, retrying while the bridge
is down, but it can still miss some: a database restored from a backup, a
registration changed, a homeserver that gave up. Those messages are absent
from the conversation history personas see. A backfill pages back through the
room's history as one of our users in it and stores each ``m.room.message``
not stored yet, marked handled: it becomes history, and nobody answers it now
(answering is for messages within ``replies.resume_max_age_s``; see
docs/operations.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from mautrix.api import Method, Path
from mautrix.appservice import IntentAPI

from ..db.messages import MessageStore
from .content import stored_from_event
from .sender import with_retries

#: Events asked for per page of ``/messages``.
PAGE = 100
#: Most events one backfill reads unless told otherwise.
DEFAULT_LIMIT = 1000
MAX_LIMIT = 100_000


@dataclass(frozen=True, slots=True)
class BackfillResult:
    room_id: str
    #: Messages read from the homeserver (newest first, back to the limit or the start).
    read: int
    #: Of those, stored now (the others were stored already).
    stored: int
    #: The room's first message was reached: nothing older exists.
    complete: bool
    #: Timestamp (ms) of the oldest message read; None when the room had none.
    oldest_ts: int | None

    @property
    def text(self) -> str:
        if self.read == 0:
            return f"Backfilled {self.room_id}: the room has no messages."
        how_far = "back to the room's start" if self.complete else "up to the limit"
        oldest = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime((self.oldest_ts or 0) / 1000))
        return (
            f"Backfilled {self.room_id}: read {self.read} message(s) {how_far} (oldest "
            f"{oldest}); {self.stored} were missing and are stored now, as history."
        )


async def backfill(
    intent: IntentAPI,
    room_id: str,
    messages: MessageStore,
    *,
    persona_of: Callable[[str], str | None],
    limit: int = DEFAULT_LIMIT,
) -> BackfillResult:
    """Read back through ``room_id`` (``intent``'s user must be in it) and store what is
    missing; ``persona_of(sender)`` names the persona that sent a message, if any."""
    read = stored = 0
    oldest: int | None = None
    token: str | None = None
    query = json.dumps({"types": ["m.room.message"]})
    while read < limit:
        params: dict[str, Any] = {"dir": "b", "limit": str(min(PAGE, limit - read))}
        params["filter"] = query
        if token:
            params["from"] = token

        async def page(params: dict[str, Any] = params) -> Any:
            return await intent.api.request(
                Method.GET, Path.v3.rooms[room_id].messages, query_params=params
            )

        data = await with_retries(page, what="backfill")
        chunk = data.get("chunk") if isinstance(data, dict) else None
        if not isinstance(chunk, list) or not chunk:
            return BackfillResult(room_id, read, stored, True, oldest)
        for raw in chunk:
            if not isinstance(raw, dict):
                continue
            row = stored_from_event(raw, persona=persona_of(str(raw.get("sender", ""))))
            if row is None:
                continue
            read += 1
            oldest = row.ts if oldest is None else min(oldest, row.ts)
            if await messages.insert(replace(row, handled=True)):
                stored += 1
        token = data.get("end")
        if not isinstance(token, str) or not token:
            return BackfillResult(room_id, read, stored, True, oldest)
    return BackfillResult(room_id, read, stored, False, oldest)
