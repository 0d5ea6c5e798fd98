"""Endpoints added at run time (``!add_endpoint``); config endpoints are not stored.

The ``api_key`` column holds what the user gave: the key itself, or ``env:NAME``
naming an environment variable of the bridge, which keeps the key out of the
database (and out of the room, where the command was typed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mautrix.util.async_db import Database


@dataclass(frozen=True, slots=True)
class StoredEndpoint:
    name: str
    url: str
    api_key: str | None = field(default=None, repr=False)  # never in reprs or logs
    created_by: str | None = None
    created_at: int = 0
    #: An owner allowed its private host (``!add_endpoint … --private``).
    private: bool = False


class EndpointStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def all(self) -> list[StoredEndpoint]:
        rows = await self.db.fetch(
            "SELECT name, url, api_key, created_by, created_at, private FROM endpoints "
            "ORDER BY name"
        )
        return [
            StoredEndpoint(
                r["name"],
                r["url"],
                r["api_key"],
                r["created_by"],
                int(r["created_at"]),
                bool(r["private"]),
            )
            for r in rows
        ]

    async def get(self, name: str) -> StoredEndpoint | None:
        return next((e for e in await self.all() if e.name == name), None)

    async def put(self, endpoint: StoredEndpoint) -> None:
        """Insert or replace by name."""
        await self.db.execute(
            "INSERT INTO endpoints (name, url, api_key, created_by, created_at, private) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO UPDATE SET url=excluded.url, "
            "api_key=excluded.api_key, created_by=excluded.created_by, "
            "created_at=excluded.created_at, private=excluded.private",
            endpoint.name,
            endpoint.url,
            endpoint.api_key,
            endpoint.created_by,
            endpoint.created_at or int(time.time() * 1000),
            endpoint.private,
        )

    async def remove(self, name: str) -> bool:
        removed = await self.db.fetchval("DELETE FROM endpoints WHERE name=$1 RETURNING name", name)
        return removed is not None
