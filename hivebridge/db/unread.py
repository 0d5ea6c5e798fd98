"""Encrypted events no user of ours could decrypt yet, while they wait for their key.

Intake writes one in the transaction that stores its neighbours and deletes it
once it was read or said to be unreadable; what a crash left here waits out the
rest of its time after the restart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Database
from mautrix.util.async_db.connection import LoggingConnection


@dataclass(frozen=True, slots=True)
class WaitingEvent:
    event: dict[str, Any]
    received_at: int  # ms


class UnreadStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(
        self, event: dict[str, Any], received_at: int, conn: LoggingConnection | None = None
    ) -> None:
        q = (
            "INSERT INTO encrypted_waiting (event_id, room_id, event, received_at) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (event_id) DO NOTHING"
        )
        await (conn or self.db).execute(
            q, str(event["event_id"]), str(event["room_id"]), json.dumps(event), received_at
        )

    async def remove(self, event_id: str) -> None:
        await self.db.execute("DELETE FROM encrypted_waiting WHERE event_id=$1", event_id)

    async def all(self) -> list[WaitingEvent]:
        rows = await self.db.fetch(
            "SELECT event, received_at FROM encrypted_waiting ORDER BY received_at, event_id"
        )
        return [WaitingEvent(json.loads(r["event"]), int(r["received_at"])) for r in rows]
