"""Per-room settings the bridge keeps: active or stopped, where context starts, mode."""

from __future__ import annotations

import time
from dataclasses import dataclass

from mautrix.util.async_db import Database


@dataclass(frozen=True, slots=True)
class RoomSettings:
    room_id: str
    active: bool = True
    context_since: int = 0
    #: "room": one conversation; "thread": a message in a thread sees that thread only.
    mode: str = "room"


class RoomStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, room_id: str) -> RoomSettings:
        row = await self.db.fetchrow(
            "SELECT room_id, active, context_since, mode FROM rooms WHERE room_id=$1", room_id
        )
        if row is None:
            return RoomSettings(room_id)
        return RoomSettings(
            row["room_id"], bool(row["active"]), int(row["context_since"]), str(row["mode"])
        )

    async def _ensure(self, room_id: str) -> None:
        await self.db.execute(
            "INSERT INTO rooms (room_id, created_at) VALUES ($1, $2) "
            "ON CONFLICT (room_id) DO NOTHING",
            room_id,
            int(time.time() * 1000),
        )

    async def set_active(self, room_id: str, active: bool) -> None:
        await self._ensure(room_id)
        await self.db.execute("UPDATE rooms SET active=$2 WHERE room_id=$1", room_id, active)

    async def reset_context(self, room_id: str, since_ts: int) -> None:
        await self._ensure(room_id)
        await self.db.execute(
            "UPDATE rooms SET context_since=$2 WHERE room_id=$1", room_id, since_ts
        )

    async def set_mode(self, room_id: str, mode: str) -> None:
        """``room`` or ``thread`` (see :class:`RoomSettings`); checked by the caller."""
        await self._ensure(room_id)
        await self.db.execute("UPDATE rooms SET mode=$2 WHERE room_id=$1", room_id, mode)
