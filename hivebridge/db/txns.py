"""Processed appservice transactions, so a retried transaction is handled once."""

from __future__ import annotations

import time

from mautrix.util.async_db import Database
from mautrix.util.async_db.connection import LoggingConnection


class TxnStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def is_processed(self, txn_id: str) -> bool:
        row = await self.db.fetchval("SELECT 1 FROM processed_txns WHERE txn_id=$1", txn_id)
        return row is not None

    async def count(self) -> int:
        return int(await self.db.fetchval("SELECT COUNT(*) FROM processed_txns"))

    async def mark_processed(self, txn_id: str, conn: LoggingConnection | None = None) -> None:
        q = (
            "INSERT INTO processed_txns (txn_id, processed_at) VALUES ($1, $2) "
            "ON CONFLICT (txn_id) DO NOTHING"
        )
        await (conn or self.db).execute(q, txn_id, int(time.time() * 1000))
