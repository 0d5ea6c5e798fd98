"""Reply jobs: a persona's decision to answer a message, persisted before the work starts.

Routing decides in memory; a crash between that decision and the final edit
would otherwise lose the answer (the message is resumed, but its routing may
already be marked done) or, worse, answer it twice (the message is routed
again and decides again). One row per (answered event, persona) makes the
decision a fact: created ``pending`` before the first token, given the reply's
event id as soon as its first send lands, and settled ``done`` (final edit
sent) or ``failed`` (a permanent failure, already told to the room). At start
the pending ones are resumed; routing never re-decides a pair that has a row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from mautrix.util.async_db import Database

JobState = Literal["pending", "done", "failed"]

_COLUMNS = "event_id, persona, room_id, state, bounce_limit, reply_event_id, created_at, updated_at"


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class ReplyJob:
    """One persona's answer to one event."""

    event_id: str  # the event answered
    persona: str  # persona name
    room_id: str
    state: JobState
    bounce_limit: int  # what the reply carries (MSC4295), fixed when it was decided
    reply_event_id: str | None  # the reply message, once its first send landed
    created_at: int  # ms
    updated_at: int  # ms

    @classmethod
    def from_row(cls, row: Any) -> ReplyJob:
        return cls(
            event_id=row["event_id"],
            persona=row["persona"],
            room_id=row["room_id"],
            state=row["state"],
            bounce_limit=int(row["bounce_limit"]),
            reply_event_id=row["reply_event_id"],
            created_at=int(row["created_at"]),
            updated_at=int(row["updated_at"]),
        )


class ReplyJobStore:
    """The only writer of ``reply_jobs``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, event_id: str, persona: str, room_id: str, bounce_limit: int) -> bool:
        """Persist the decision; False when a job for this pair already exists.

        The primary key makes a second decision for the same pair a no-op, so
        whoever gets False must not start the work (someone has, or did).
        """
        now = _now_ms()
        created = await self.db.fetchval(
            f"INSERT INTO reply_jobs ({_COLUMNS}) VALUES ($1, $2, $3, 'pending', $4, NULL, $5, $5) "
            "ON CONFLICT (event_id, persona) DO NOTHING RETURNING event_id",
            event_id,
            persona,
            room_id,
            bounce_limit,
            now,
        )
        return created is not None

    async def set_reply_event(self, event_id: str, persona: str, reply_event_id: str) -> None:
        """The reply's first send landed: a resume edits this event instead of posting."""
        await self.db.execute(
            "UPDATE reply_jobs SET reply_event_id=$3, updated_at=$4 "
            "WHERE event_id=$1 AND persona=$2",
            event_id,
            persona,
            reply_event_id,
            _now_ms(),
        )

    async def finish(
        self, event_id: str, persona: str, state: JobState, reply_event_id: str | None = None
    ) -> None:
        """Settle a job: ``done`` with the reply's event id, or ``failed``."""
        await self.db.execute(
            "UPDATE reply_jobs SET state=$3, reply_event_id=COALESCE($4, reply_event_id), "
            "updated_at=$5 WHERE event_id=$1 AND persona=$2",
            event_id,
            persona,
            state,
            reply_event_id,
            _now_ms(),
        )

    async def get(self, event_id: str, persona: str) -> ReplyJob | None:
        row = await self.db.fetchrow(
            f"SELECT {_COLUMNS} FROM reply_jobs WHERE event_id=$1 AND persona=$2",
            event_id,
            persona,
        )
        return ReplyJob.from_row(row) if row else None

    async def for_event(self, event_id: str) -> dict[str, ReplyJob]:
        """Every persona's job for one event, by persona name."""
        rows = await self.db.fetch(f"SELECT {_COLUMNS} FROM reply_jobs WHERE event_id=$1", event_id)
        return {r["persona"]: ReplyJob.from_row(r) for r in rows}

    async def pending(self, since_ms: int) -> list[ReplyJob]:
        """Unfinished jobs decided at or after ``since_ms``, oldest first.

        Older pending jobs stay stored (for the record) but are not resumed: an
        answer that late would confuse more than it helps.
        """
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM reply_jobs WHERE state='pending' AND created_at >= $1 "
            "ORDER BY created_at, event_id, persona",
            since_ms,
        )
        return [ReplyJob.from_row(r) for r in rows]

    async def count(self, state: JobState | None = None) -> int:
        if state is None:
            return int(await self.db.fetchval("SELECT COUNT(*) FROM reply_jobs"))
        return int(await self.db.fetchval("SELECT COUNT(*) FROM reply_jobs WHERE state=$1", state))
