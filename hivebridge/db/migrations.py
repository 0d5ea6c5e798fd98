"""Run the project's alembic migrations from inside the application."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig


def sqlalchemy_url(url: str) -> str:
    """Translate a mautrix-style URL into the async SQLAlchemy URL alembic needs."""
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:")
        if path.startswith("///"):  # sqlite:///x.db means /x.db (FACTS: mautrix semantics)
            path = path[2:]
        if path == ":memory:":
            return "sqlite+aiosqlite://"
        return f"sqlite+aiosqlite:///{path}"
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+asyncpg://" + url.removeprefix(scheme)
    raise ValueError(f"unsupported database URL scheme in {url.split(':', 1)[0]!r}")


#: The alembic environment (env.py, versions/), shipped inside the package so that
#: an installed wheel finds it as surely as a checkout does.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "alembic"


def script_location() -> Path:
    """The alembic environment to run: the package's own, or HIVEBRIDGE_MIGRATIONS if set."""
    override = os.environ.get("HIVEBRIDGE_MIGRATIONS")
    if override:
        return Path(override)
    return MIGRATIONS_DIR


def _alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.attributes["hivebridge_url"] = url
    return cfg


def upgrade_sync(url: str, revision: str = "head") -> None:
    command.upgrade(_alembic_config(url), revision)


async def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision``; alembic's env runs its own event loop in a thread."""
    await asyncio.to_thread(upgrade_sync, url, revision)


def current_heads() -> list[str]:
    from alembic.script import ScriptDirectory

    return list(ScriptDirectory.from_config(_alembic_config("sqlite::memory:")).get_heads())
