"""Shared fixtures: real databases (SQLite and PostgreSQL).

With CI=true a test that needs PostgreSQL or Synapse fails instead of skipping.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
POSTGRES_SERVER = os.environ.get(
    "HIVEBRIDGE_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/postgres"
)


def skip_or_fail(reason: str) -> None:
    """Skip on a developer machine without the service; fail in CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required, never skipped)")
    pytest.skip(reason)


async def _admin_execute(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_SERVER, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    name = f"hb_test_{secrets.token_hex(6)}"
    try:
        asyncio.run(_admin_execute(f'CREATE DATABASE "{name}"'))
    except (OSError, ImportError) as e:
        skip_or_fail(f"PostgreSQL not reachable at {POSTGRES_SERVER}: {e}")
    except Exception as e:
        skip_or_fail(f"PostgreSQL not usable at {POSTGRES_SERVER}: {e}")
    base = POSTGRES_SERVER.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def sqlite_url(tmp_path: object) -> Iterator[str]:
    yield f"sqlite:{tmp_path}/hivebridge.db"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Runs a test once on SQLite and once on PostgreSQL."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture(scope="session")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second real local model (the bundled one re-quantised to Q8_0), made once."""
    from tests.support.models import quantized_copy

    return quantized_copy(tmp_path_factory.mktemp("models") / "smollm2-q8.gguf")
