"""Database access: one module per aggregate, each the single owner of its facts."""

from __future__ import annotations

import logging

from mautrix.client.state_store.asyncpg.upgrade import upgrade_table as mx_upgrade_table
from mautrix.util.async_db import Database
from yarl import URL

from .migrations import upgrade
from .resilience import ResilientPostgres

__all__ = ["open_database"]

log = logging.getLogger("hivebridge.db")


async def open_database(url: str) -> Database:
    """Migrate, then open the runtime pool.

    Our schema is alembic's; mautrix's state store tables (mx_*) stay under
    mautrix's own upgrade table, as mautrix expects. PostgreSQL gets
    :class:`ResilientPostgres`, which survives connections cut under it.
    """
    await upgrade(url)  # creates a SQLite file 0600 first
    mau_log = logging.getLogger("mau.db")
    db: Database
    if URL(url).scheme in ("postgres", "postgresql"):
        db = ResilientPostgres(URL(url), upgrade_table=mx_upgrade_table, log=mau_log)
    else:
        db = Database.create(url, upgrade_table=mx_upgrade_table, log=mau_log)
    await db.start()
    log.debug("database ready")
    return db
