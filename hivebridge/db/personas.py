"""Personas and the rooms each one is in."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from mautrix.util.async_db import Database


@dataclass(frozen=True, slots=True)
class Persona:
    name: str
    mxid: str
    displayname: str
    system_prompt: str
    avatar_url: str | None = None
    traits: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    profile: str | None = None
    created_at: int = 0
    created_by: str | None = None
    #: Tool names; None means the config's tools.default.
    tools: tuple[str, ...] | None = None
    #: None (auto), "required" or a tool name: what the first step of a reply must do.
    tool_choice: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> Persona:
        return cls(
            name=row["name"],
            mxid=row["mxid"],
            displayname=row["displayname"],
            system_prompt=row["system_prompt"],
            avatar_url=row["avatar_url"],
            traits=json.loads(row["traits"] or "{}"),
            model=row["model"],
            profile=row["profile"],
            created_at=int(row["created_at"]),
            created_by=row["created_by"],
            tools=_tools(row["tools"]),
            tool_choice=row["tool_choice"],
        )


def _tools(raw: str | None) -> tuple[str, ...] | None:
    if raw is None:
        return None
    try:
        names = json.loads(raw)
    except ValueError:
        return None
    return tuple(str(n) for n in names) if isinstance(names, list) else None


def _tools_json(tools: tuple[str, ...] | None) -> str | None:
    return None if tools is None else json.dumps(list(tools))


_COLUMNS = (
    "name, mxid, displayname, system_prompt, avatar_url, traits, model, profile, created_at, "
    "created_by, tools, tool_choice"
)


class PersonaStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, name: str) -> Persona | None:
        row = await self.db.fetchrow(f"SELECT {_COLUMNS} FROM personas WHERE name=$1", name)
        return Persona.from_row(row) if row else None

    async def by_mxid(self, mxid: str) -> Persona | None:
        row = await self.db.fetchrow(f"SELECT {_COLUMNS} FROM personas WHERE mxid=$1", mxid)
        return Persona.from_row(row) if row else None

    async def all(self) -> list[Persona]:
        rows = await self.db.fetch(f"SELECT {_COLUMNS} FROM personas ORDER BY name")
        return [Persona.from_row(r) for r in rows]

    async def insert(self, p: Persona) -> bool:
        """Store a new persona; False when the name is taken."""
        created = await self.db.fetchval(
            f"INSERT INTO personas ({_COLUMNS}) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) "
            "ON CONFLICT (name) DO NOTHING RETURNING name",
            p.name,
            p.mxid,
            p.displayname,
            p.system_prompt,
            p.avatar_url,
            json.dumps(p.traits, ensure_ascii=False),
            p.model,
            p.profile,
            p.created_at or int(time.time() * 1000),
            p.created_by,
            _tools_json(p.tools),
            p.tool_choice,
        )
        return created is not None

    async def update(self, p: Persona) -> None:
        await self.db.execute(
            "UPDATE personas SET displayname=$2, system_prompt=$3, avatar_url=$4, traits=$5, "
            "model=$6, profile=$7, tools=$8, tool_choice=$9 WHERE name=$1",
            p.name,
            p.displayname,
            p.system_prompt,
            p.avatar_url,
            json.dumps(p.traits, ensure_ascii=False),
            p.model,
            p.profile,
            _tools_json(p.tools),
            p.tool_choice,
        )

    async def delete(self, name: str) -> None:
        await self.db.execute("DELETE FROM personas WHERE name=$1", name)

    async def add_room(self, name: str, room_id: str) -> None:
        await self.db.execute(
            "INSERT INTO persona_rooms (persona, room_id, joined_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (persona, room_id) DO NOTHING",
            name,
            room_id,
            int(time.time() * 1000),
        )

    async def remove_room(self, name: str, room_id: str) -> None:
        await self.db.execute(
            "DELETE FROM persona_rooms WHERE persona=$1 AND room_id=$2", name, room_id
        )

    async def rooms_of(self, name: str) -> list[str]:
        rows = await self.db.fetch(
            "SELECT room_id FROM persona_rooms WHERE persona=$1 ORDER BY joined_at", name
        )
        return [r["room_id"] for r in rows]

    async def in_room(self, room_id: str) -> list[Persona]:
        rows = await self.db.fetch(
            f"SELECT {', '.join('p.' + c.strip() for c in _COLUMNS.split(','))} "
            "FROM personas p JOIN persona_rooms r ON r.persona = p.name WHERE r.room_id=$1 "
            "ORDER BY p.name",
            room_id,
        )
        return [Persona.from_row(r) for r in rows]
