"""Run the project's alembic migrations from inside the application."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:`` URL; None for other databases and ``sqlite::memory:``."""
    if not url.startswith("sqlite:"):
        return None
    path = url.removeprefix("sqlite:")
    if path.startswith("///"):  # sqlite:///x.db means /x.db (FACTS: mautrix semantics)
        path = path[2:]
    return None if path == ":memory:" else Path(path)


def create_private(path: Path) -> None:
    """Create a new SQLite file 0600 (its directory 0700) before SQLite first opens it.

    SQLite gives its journal and WAL files the database file's mode, so every
    file holding messages is private from its first byte.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def sqlalchemy_url(url: str) -> str:
    """Translate a mautrix-style URL into the async SQLAlchemy URL alembic needs."""
    if url.startswith("sqlite:"):
        path = sqlite_path(url)
        return "sqlite+aiosqlite://" if path is None else f"sqlite+aiosqlite:///{path}"
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
    path = sqlite_path(url)
    if path is not None:
        create_private(path)
    command.upgrade(_alembic_config(url), revision)


async def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision``; alembic's env runs its own event loop in a thread."""
    await asyncio.to_thread(upgrade_sync, url, revision)


def current_heads() -> list[str]:
    from alembic.script import ScriptDirectory

    return list(ScriptDirectory.from_config(_alembic_config("sqlite::memory:")).get_heads())
