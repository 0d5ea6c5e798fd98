"""Alembic environment: runs hivebridge's migrations on SQLite or PostgreSQL.

Called in-process by ``hivebridge.db.migrations.upgrade`` (which passes the URL
in the config's attributes) or by the ``alembic`` CLI (which reads
HIVEBRIDGE_DATABASE_URL or ``-x url=...``). It never touches logging: the app
owns its log configuration.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from hivebridge.db.migrations import sqlalchemy_url

config = context.config
url: str = str(
    config.attributes.get("hivebridge_url")
    or context.get_x_argument(as_dictionary=True).get("url")
    or os.environ.get("HIVEBRIDGE_DATABASE_URL")
    or ""
)
if not url:
    raise SystemExit("alembic: set HIVEBRIDGE_DATABASE_URL or pass -x url=...")


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=None,
        # mautrix owns its mx_* tables and keeps its own version table.
        version_table="hivebridge_alembic_version",
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(sqlalchemy_url(url))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=sqlalchemy_url(url), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
