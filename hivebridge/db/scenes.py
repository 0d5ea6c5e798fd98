"""Scenes (``scenes``): one active scene per room, its turns so far, and how it ended.

Written at start, before each turn (so a restart neither repeats nor loses one) and
at the end; ``!scene status`` and the turn driver read it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Database

_COLUMNS = (
    "id, room_id, personas, turn_order, topic, max_turns, turns_taken, last_speaker, "
    "requested, requested_event, state, end_reason, started_by, stopped_by, started_at, ended_at"
)


@dataclass(frozen=True, slots=True)
class Scene:
    id: int
    room_id: str
    personas: tuple[str, ...]  # persona names, in speaking order
    order: str  # round_robin | mention
    topic: str
    max_turns: int
    turns_taken: int
    last_speaker: str | None
    requested: str | None
    #: The human message that addressed ``requested``: what it answers.
    requested_event: str | None
    state: str  # active | ended
    end_reason: str | None
    started_by: str
    stopped_by: str | None
    started_at: int  # ms
    ended_at: int | None

    @property
    def active(self) -> bool:
        return self.state == "active"

    @classmethod
    def from_row(cls, row: Any) -> Scene:
        try:
            names = json.loads(row["personas"])
        except ValueError:
            names = []
        return cls(
            id=int(row["id"]),
            room_id=row["room_id"],
            personas=tuple(str(n) for n in names) if isinstance(names, list) else (),
            order=row["turn_order"],
            topic=row["topic"] or "",
            max_turns=int(row["max_turns"]),
            turns_taken=int(row["turns_taken"]),
            last_speaker=row["last_speaker"],
            requested=row["requested"],
            requested_event=row["requested_event"],
            state=row["state"],
            end_reason=row["end_reason"],
            started_by=row["started_by"],
            stopped_by=row["stopped_by"],
            started_at=int(row["started_at"]),
            ended_at=int(row["ended_at"]) if row["ended_at"] is not None else None,
        )


class SceneStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self,
        room_id: str,
        personas: tuple[str, ...],
        order: str,
        topic: str,
        max_turns: int,
        started_by: str,
    ) -> Scene | None:
        """A new active scene; None when the room already has one."""
        scene_id = await self.db.fetchval(
            "INSERT INTO scenes (room_id, personas, turn_order, topic, max_turns, turns_taken, "
            "state, started_by, started_at) VALUES ($1, $2, $3, $4, $5, 0, 'active', $6, $7) "
            "ON CONFLICT (room_id) WHERE state = 'active' DO NOTHING RETURNING id",
            room_id,
            json.dumps(list(personas)),
            order,
            topic,
            max_turns,
            started_by,
            int(time.time() * 1000),
        )
        return None if scene_id is None else await self.get(int(scene_id))

    async def get(self, scene_id: int) -> Scene | None:
        row = await self.db.fetchrow(f"SELECT {_COLUMNS} FROM scenes WHERE id=$1", scene_id)
        return Scene.from_row(row) if row is not None else None

    async def active(self, room_id: str) -> Scene | None:
        row = await self.db.fetchrow(
            f"SELECT {_COLUMNS} FROM scenes WHERE room_id=$1 AND state='active'", room_id
        )
        return Scene.from_row(row) if row is not None else None

    async def all_active(self) -> list[Scene]:
        rows = await self.db.fetch(f"SELECT {_COLUMNS} FROM scenes WHERE state='active'")
        return [Scene.from_row(r) for r in rows]

    async def latest(self, room_id: str) -> Scene | None:
        """The room's newest scene, active or ended."""
        row = await self.db.fetchrow(
            f"SELECT {_COLUMNS} FROM scenes WHERE room_id=$1 ORDER BY id DESC LIMIT 1", room_id
        )
        return Scene.from_row(row) if row is not None else None

    async def take_turn(self, scene_id: int, speaker: str) -> bool:
        """Count one turn for ``speaker`` (before it speaks); False when the scene is over."""
        done = await self.db.fetchval(
            "UPDATE scenes SET turns_taken=turns_taken+1, last_speaker=$2, requested=NULL, "
            "requested_event=NULL "
            "WHERE id=$1 AND state='active' AND turns_taken < max_turns RETURNING id",
            scene_id,
            speaker,
        )
        return done is not None

    async def request(self, scene_id: int, persona: str | None, event_id: str | None) -> None:
        """``persona`` speaks next, answering ``event_id`` (a human addressed it there)."""
        await self.db.execute(
            "UPDATE scenes SET requested=$2, requested_event=$3 WHERE id=$1 AND state='active'",
            scene_id,
            persona,
            event_id,
        )

    async def end(self, scene_id: int, reason: str, stopped_by: str | None = None) -> bool:
        """End an active scene; False when it had ended already."""
        done = await self.db.fetchval(
            "UPDATE scenes SET state='ended', end_reason=$2, stopped_by=$3, ended_at=$4 "
            "WHERE id=$1 AND state='active' RETURNING id",
            scene_id,
            reason,
            stopped_by,
            int(time.time() * 1000),
        )
        return done is not None
