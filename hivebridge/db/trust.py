"""Users trusted at run time (``!trust``); config-trusted users are not stored."""

from __future__ import annotations

import time

from mautrix.util.async_db import Database


class TrustStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def all(self) -> set[str]:
        return {r["mxid"] for r in await self.db.fetch("SELECT mxid FROM trusted_users")}

    async def grant(self, mxid: str, granted_by: str) -> bool:
        """False when the user was already trusted."""
        added = await self.db.fetchval(
            "INSERT INTO trusted_users (mxid, granted_by, granted_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (mxid) DO NOTHING RETURNING mxid",
            mxid,
            granted_by,
            int(time.time() * 1000),
        )
        return added is not None

    async def revoke(self, mxid: str) -> bool:
        """False when the user was not trusted here."""
        removed = await self.db.fetchval(
            "DELETE FROM trusted_users WHERE mxid=$1 RETURNING mxid", mxid
        )
        return removed is not None
