"""Stable numeric ids for model names, and aliases for them (tables ``models``, ``aliases``).

An id, once given to a name, is never reused or changed, so ``!persona set x model 3``
keeps meaning the same model after restarts and after endpoints come and go.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mautrix.util.async_db import Database


@dataclass(frozen=True, slots=True)
class ModelRow:
    id: int
    name: str
    first_seen: int  # ms since the epoch


@dataclass(frozen=True, slots=True)
class AliasRow:
    alias: str
    model_id: int
    created_by: str | None


class CatalogueStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def ensure_model(self, name: str) -> int:
        """The id of ``name``, given a new one the first time it is seen."""
        await self.db.execute(
            "INSERT INTO models (name, first_seen) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            name,
            int(time.time() * 1000),
        )
        model_id = await self.db.fetchval("SELECT id FROM models WHERE name=$1", name)
        return int(model_id)

    async def models(self) -> list[ModelRow]:
        rows = await self.db.fetch("SELECT id, name, first_seen FROM models ORDER BY id")
        return [ModelRow(int(r["id"]), r["name"], int(r["first_seen"])) for r in rows]

    async def aliases(self) -> list[AliasRow]:
        rows = await self.db.fetch("SELECT alias, model_id, created_by FROM aliases ORDER BY alias")
        return [AliasRow(r["alias"], int(r["model_id"]), r["created_by"]) for r in rows]

    async def set_alias(self, alias: str, model_id: int, created_by: str | None) -> None:
        """Create or re-point an alias."""
        await self.db.execute(
            "INSERT INTO aliases (alias, model_id, created_by, created_at) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (alias) DO UPDATE SET model_id=excluded.model_id, "
            "created_by=excluded.created_by, created_at=excluded.created_at",
            alias,
            model_id,
            created_by,
            int(time.time() * 1000),
        )

    async def remove_alias(self, alias: str) -> bool:
        removed = await self.db.fetchval(
            "DELETE FROM aliases WHERE alias=$1 RETURNING alias", alias
        )
        return removed is not None
