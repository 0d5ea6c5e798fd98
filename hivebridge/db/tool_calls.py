"""Tool calls and their results, stored with the reply that made them.

Written as each call finishes (keyed by the answered message and persona,
like its reply job) and tied to the final reply's event once that is out, so
a later prompt can put the calls back before the reply they led to.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Database

_COLUMNS = (
    "event_id, persona, room_id, hop, call_id, tool, arguments, note, result, outcome, "
    "duration_ms, reply_event_id, created_at"
)


@dataclass(frozen=True, slots=True)
class StoredToolCall:
    event_id: str
    persona: str
    room_id: str
    hop: int
    call_id: str
    tool: str
    arguments: dict[str, Any]
    note: str
    result: str
    outcome: str
    duration_ms: int
    reply_event_id: str | None
    created_at: int

    @classmethod
    def from_row(cls, row: Any) -> StoredToolCall:
        try:
            args = json.loads(row["arguments"])
        except ValueError:
            args = {}
        return cls(
            event_id=row["event_id"],
            persona=row["persona"],
            room_id=row["room_id"],
            hop=int(row["hop"]),
            call_id=row["call_id"],
            tool=row["tool"],
            arguments=args if isinstance(args, dict) else {},
            note=row["note"] or "",
            result=row["result"],
            outcome=row["outcome"],
            duration_ms=int(row["duration_ms"]),
            reply_event_id=row["reply_event_id"],
            created_at=int(row["created_at"]),
        )


class ToolCallStore:
    """The only writer of ``tool_calls``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, call: StoredToolCall) -> None:
        await self.db.execute(
            f"INSERT INTO tool_calls ({_COLUMNS}) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            call.event_id,
            call.persona,
            call.room_id,
            call.hop,
            call.call_id,
            call.tool,
            json.dumps(call.arguments, ensure_ascii=False),
            call.note,
            call.result,
            call.outcome,
            call.duration_ms,
            call.reply_event_id,
            call.created_at or int(time.time() * 1000),
        )

    async def forget_unfinished(self, event_id: str, persona: str) -> None:
        """A resumed reply runs its tools again: drop what the first run left."""
        await self.db.execute(
            "DELETE FROM tool_calls WHERE event_id=$1 AND persona=$2 AND reply_event_id IS NULL",
            event_id,
            persona,
        )

    async def set_reply(self, event_id: str, persona: str, reply_event_id: str) -> None:
        """The reply is out: its calls belong before it in later prompts."""
        await self.db.execute(
            "UPDATE tool_calls SET reply_event_id=$3 WHERE event_id=$1 AND persona=$2",
            event_id,
            persona,
            reply_event_id,
        )

    async def for_replies(
        self, room_id: str, reply_event_ids: Sequence[str]
    ) -> dict[str, list[StoredToolCall]]:
        """The calls behind each of these replies, in the order they were made."""
        if not reply_event_ids:
            return {}
        wanted = set(reply_event_ids)
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM tool_calls WHERE room_id=$1 AND reply_event_id IS NOT NULL "
            "ORDER BY created_at, hop, id",
            room_id,
        )
        out: dict[str, list[StoredToolCall]] = {}
        for row in rows:
            if row["reply_event_id"] in wanted:
                out.setdefault(row["reply_event_id"], []).append(StoredToolCall.from_row(row))
        return out

    async def for_job(self, event_id: str, persona: str) -> list[StoredToolCall]:
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM tool_calls WHERE event_id=$1 AND persona=$2 ORDER BY hop, id",
            event_id,
            persona,
        )
        return [StoredToolCall.from_row(r) for r in rows]
