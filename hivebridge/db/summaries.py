"""Chapter summaries: the running summary of a room (or thread) and what it covers.

One row per room and thread (``thread_root`` ``''`` for the room itself). The
summarizer is the only writer; prompts read it. A summary covers every turn of
its chapter up to and including ``up_to_event_id`` (sent at ``up_to_ts``), so a
prompt takes the summary plus only the turns after that event.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mautrix.util.async_db import Database
from mautrix.util.async_db.connection import LoggingConnection

ROOM = ""  # thread_root of a room's own summary


@dataclass(frozen=True, slots=True)
class ChapterSummary:
    room_id: str
    thread_root: str  # '' for the room
    summary: str
    up_to_ts: int
    up_to_event_id: str
    updated_at: int

    def valid_since(self, context_since: int) -> bool:
        """False when a ``!reset`` came after the summarized turns (it is forgotten)."""
        return self.up_to_ts >= context_since


class SummaryStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, room_id: str, thread_root: str = ROOM) -> ChapterSummary | None:
        row = await self.db.fetchrow(
            "SELECT room_id, thread_root, summary, up_to_ts, up_to_event_id, updated_at "
            "FROM summaries WHERE room_id=$1 AND thread_root=$2",
            room_id,
            thread_root,
        )
        if row is None:
            return None
        return ChapterSummary(
            room_id=row["room_id"],
            thread_root=row["thread_root"],
            summary=row["summary"],
            up_to_ts=int(row["up_to_ts"]),
            up_to_event_id=row["up_to_event_id"],
            updated_at=int(row["updated_at"]),
        )

    async def put(
        self,
        room_id: str,
        thread_root: str,
        summary: str,
        up_to_ts: int,
        up_to_event_id: str,
    ) -> ChapterSummary:
        """Write the room's (or thread's) summary, replacing the previous chapter."""
        now = int(time.time() * 1000)
        await self.db.execute(
            "INSERT INTO summaries (room_id, thread_root, summary, up_to_ts, up_to_event_id, "
            "updated_at) VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (room_id, thread_root) DO UPDATE SET summary=excluded.summary, "
            "up_to_ts=excluded.up_to_ts, up_to_event_id=excluded.up_to_event_id, "
            "updated_at=excluded.updated_at",
            room_id,
            thread_root,
            summary,
            up_to_ts,
            up_to_event_id,
            now,
        )
        return ChapterSummary(room_id, thread_root, summary, up_to_ts, up_to_event_id, now)

    async def delete_covering(
        self, room_id: str, ts: int, conn: LoggingConnection | None = None
    ) -> None:
        """Drop every summary of the room (and its threads) that covers a message sent at
        ``ts`` (a redacted one): the next summary is written from what is left."""
        await (conn or self.db).execute(
            "DELETE FROM summaries WHERE room_id=$1 AND up_to_ts >= $2", room_id, ts
        )

    async def delete(self, room_id: str, thread_root: str = ROOM) -> None:
        await self.db.execute(
            "DELETE FROM summaries WHERE room_id=$1 AND thread_root=$2", room_id, thread_root
        )
