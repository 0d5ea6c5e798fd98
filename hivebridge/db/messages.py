"""Every m.room.message seen in a room, stored once by event id."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Database, Scheme
from mautrix.util.async_db.connection import LoggingConnection


@dataclass(frozen=True, slots=True)
class StoredMessage:
    event_id: str
    room_id: str
    sender: str
    msgtype: str | None
    body: str
    content: dict[str, Any]
    thread_root: str | None
    in_reply_to: str | None
    ts: int
    persona: str | None = None
    handled: bool = False

    @classmethod
    def from_row(cls, row: Any) -> StoredMessage:
        return cls(
            event_id=row["event_id"],
            room_id=row["room_id"],
            sender=row["sender"],
            msgtype=row["msgtype"],
            body=row["body"],
            content=json.loads(row["content"]),
            thread_root=row["thread_root"],
            in_reply_to=row["in_reply_to"],
            ts=row["ts"],
            persona=row["persona"],
            handled=bool(row["handled"]),
        )


_COLUMNS = (
    "event_id, room_id, sender, msgtype, body, content, thread_root, in_reply_to, ts, persona, "
    "handled"
)


def _values(msg: StoredMessage) -> tuple[Any, ...]:
    return (
        msg.event_id,
        msg.room_id,
        msg.sender,
        msg.msgtype,
        msg.body,
        json.dumps(msg.content, ensure_ascii=False),
        msg.thread_root,
        msg.in_reply_to,
        msg.ts,
        msg.persona,
        msg.handled,
    )


class MessageStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(self, msg: StoredMessage, conn: LoggingConnection | None = None) -> bool:
        """Store a message; False when its event id was already stored."""
        q = (
            f"INSERT INTO messages ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, "
            "$11) ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
        )
        inserted = await (conn or self.db).fetchval(q, *_values(msg))
        return inserted is not None

    async def insert_many(self, rows: list[StoredMessage], conn: LoggingConnection) -> set[str]:
        """Store a batch; returns the event ids that were new.

        On PostgreSQL one statement carries the whole batch (unnest), so a
        transaction of 50 events is one round trip, not 50.
        """
        if not rows:
            return set()
        if self.db.scheme != Scheme.POSTGRES:
            return {r.event_id for r in rows if await self.insert(r, conn)}
        cols = list(zip(*(_values(r) for r in rows), strict=True))
        q = (
            f"INSERT INTO messages ({_COLUMNS}) SELECT * FROM unnest($1::text[], $2::text[], "
            "$3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], "
            "$9::bigint[], $10::text[], $11::boolean[]) "
            "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
        )
        return {r["event_id"] for r in await conn.fetch(q, *(list(c) for c in cols))}

    async def get(
        self, event_id: str, conn: LoggingConnection | None = None
    ) -> StoredMessage | None:
        row = await (conn or self.db).fetchrow(
            f"SELECT {_COLUMNS} FROM messages WHERE event_id=$1", event_id
        )
        return StoredMessage.from_row(row) if row else None

    async def update_body(self, event_id: str, body: str) -> None:
        """The final text of a message we edited while streaming."""
        await self.db.execute("UPDATE messages SET body=$2 WHERE event_id=$1", event_id, body)

    async def redact(
        self, room_id: str, event_id: str, conn: LoggingConnection | None = None
    ) -> int | None:
        """Blank a redacted message: no text and no content left, out of every prompt.

        Only a message of ``room_id`` (a redaction acts in its own room). Returns
        the message's ``ts`` (which summaries covered it), None when unknown.
        """
        ts = await (conn or self.db).fetchval(
            "SELECT ts FROM messages WHERE event_id=$1 AND room_id=$2", event_id, room_id
        )
        if ts is None:
            return None
        await (conn or self.db).execute(
            "UPDATE messages SET body='', content='{}', in_context=false WHERE event_id=$1",
            event_id,
        )
        return int(ts)

    async def replies_to(
        self, room_id: str, event_id: str, conn: LoggingConnection | None = None
    ) -> list[StoredMessage]:
        """The messages of ``room_id`` that reply to ``event_id`` (they may quote it)."""
        rows = await (conn or self.db).fetch(
            f"SELECT {_COLUMNS} FROM messages WHERE room_id=$1 AND in_reply_to=$2",
            room_id,
            event_id,
        )
        return [StoredMessage.from_row(r) for r in rows]

    async def set_text(
        self,
        event_id: str,
        body: str,
        content: dict[str, Any],
        conn: LoggingConnection | None = None,
    ) -> None:
        """Replace a message's text and content (an edit, or a quote of a redacted one)."""
        await (conn or self.db).execute(
            "UPDATE messages SET body=$2, content=$3 WHERE event_id=$1",
            event_id,
            body,
            json.dumps(content, ensure_ascii=False),
        )

    async def mark_handled_many(self, event_ids: list[str]) -> None:
        await self.db.executemany(
            "UPDATE messages SET handled=true WHERE event_id=$1", [(e,) for e in event_ids]
        )

    async def mark_handled(self, event_id: str) -> None:
        await self.db.execute("UPDATE messages SET handled=true WHERE event_id=$1", event_id)

    async def unhandled(self, since_ts: int) -> list[StoredMessage]:
        """Messages whose routing never finished (a crash), oldest first."""
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM messages WHERE handled=false AND ts >= $1 "
            "ORDER BY ts, event_id",
            since_ts,
        )
        return [StoredMessage.from_row(r) for r in rows]

    async def recent(self, room_id: str, since_ts: int, limit: int) -> list[StoredMessage]:
        """The last ``limit`` messages of a room after ``since_ts``, oldest first."""
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM messages WHERE room_id=$1 AND ts >= $2 "
            "ORDER BY ts DESC, event_id DESC LIMIT $3",
            room_id,
            since_ts,
            limit,
        )
        return [StoredMessage.from_row(r) for r in reversed(rows)]

    async def in_context(self, room_id: str, since_ts: int, limit: int) -> list[StoredMessage]:
        """Like :meth:`recent`, without messages taken out of the context by !rollback."""
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM messages WHERE room_id=$1 AND ts >= $2 "
            "AND in_context=true ORDER BY ts DESC, event_id DESC LIMIT $3",
            room_id,
            since_ts,
            limit,
        )
        return [StoredMessage.from_row(r) for r in reversed(rows)]

    async def search(
        self, room_id: str, words: list[str], sender: str | None, limit: int
    ) -> list[StoredMessage]:
        """Messages of one room holding every word (any case), newest first.

        ``sender`` narrows it to senders whose user id or persona name contains
        it. Every pattern is a bound parameter with LIKE's wildcards escaped.
        """
        conditions = ["room_id=$1"]
        params: list[Any] = [room_id]
        for word in words:
            params.append(f"%{_like_escape(word.lower())}%")
            conditions.append(f"LOWER(body) LIKE ${len(params)} ESCAPE '\\'")
        if sender:
            params.append(f"%{_like_escape(sender.lower())}%")
            n = len(params)
            conditions.append(
                f"(LOWER(sender) LIKE ${n} ESCAPE '\\' OR LOWER(persona) LIKE ${n} ESCAPE '\\')"
            )
        params.append(limit)
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM messages WHERE {' AND '.join(conditions)} "
            f"ORDER BY ts DESC, event_id DESC LIMIT ${len(params)}",
            *params,
        )
        return [StoredMessage.from_row(r) for r in rows]

    async def remove_from_context(self, event_ids: list[str]) -> None:
        """!rollback: prompts stop seeing these messages; they stay stored."""
        if event_ids:
            await self.db.executemany(
                "UPDATE messages SET in_context=false WHERE event_id=$1",
                [(e,) for e in event_ids],
            )

    async def count(self, room_id: str | None = None) -> int:
        if room_id is None:
            return int(await self.db.fetchval("SELECT COUNT(*) FROM messages"))
        return int(
            await self.db.fetchval("SELECT COUNT(*) FROM messages WHERE room_id=$1", room_id)
        )


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
