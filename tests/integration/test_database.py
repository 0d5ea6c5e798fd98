"""Migrations and stores on real SQLite and real PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from hivebridge.db import open_database
from hivebridge.db.messages import MessageStore, StoredMessage
from hivebridge.db.personas import Persona, PersonaStore
from hivebridge.db.rooms import RoomStore
from hivebridge.db.txns import TxnStore

TABLES = {
    "encrypted_waiting",
    "personas",
    "persona_rooms",
    "rooms",
    "messages",
    "processed_txns",
    "trusted_users",
    "models",
    "aliases",
    "endpoints",
    "usage",
    "rate_limits",
    "summaries",
    "reply_jobs",
    "tool_calls",
    "scenes",
}


def message(event_id: str, ts: int = 1, room: str = "!r:x") -> StoredMessage:
    return StoredMessage(
        event_id=event_id,
        room_id=room,
        sender="@alice:x",
        msgtype="m.text",
        body=f"body of {event_id} — ünïcode",
        content={"msgtype": "m.text", "body": "b"},
        thread_root=None,
        in_reply_to=None,
        ts=ts,
    )


async def test_migrations_create_schema_and_mautrix_keeps_its_own(db_url: str) -> None:
    db = await open_database(db_url)
    try:
        for table in TABLES | {"hivebridge_alembic_version"}:
            assert await db.table_exists(table), table
        version = await db.fetchval("SELECT version_num FROM hivebridge_alembic_version")
        assert version == "0007"
    finally:
        await db.stop()
    # Running again on a migrated database is a no-op, not an error.
    db = await open_database(db_url)
    await db.stop()


async def test_message_stored_once_by_event_id(db_url: str) -> None:
    db = await open_database(db_url)
    try:
        store = MessageStore(db)
        assert await store.insert(message("$a"))
        assert not await store.insert(message("$a"))
        assert await store.count() == 1
        got = await store.get("$a")
        assert got is not None and got.body == "body of $a — ünïcode"
        assert [m.event_id for m in await store.unhandled(0)] == ["$a"]
        await store.mark_handled("$a")
        assert await store.unhandled(0) == []
    finally:
        await db.stop()


async def test_recent_is_oldest_first_and_bounded(db_url: str) -> None:
    db = await open_database(db_url)
    try:
        store = MessageStore(db)
        for i in range(5):
            await store.insert(message(f"$m{i}", ts=100 + i))
        recent = await store.recent("!r:x", since_ts=101, limit=3)
        assert [m.event_id for m in recent] == ["$m2", "$m3", "$m4"]
    finally:
        await db.stop()


async def test_txns_personas_rooms(db_url: str) -> None:
    db = await open_database(db_url)
    try:
        txns = TxnStore(db)
        assert not await txns.is_processed("1")
        await txns.mark_processed("1")
        await txns.mark_processed("1")
        assert await txns.is_processed("1")

        personas = PersonaStore(db)
        p = Persona(
            name="ada",
            mxid="@hive_ada:x",
            displayname="Ada",
            system_prompt="Be Ada.",
            traits={"openness": 0.9},
        )
        assert await personas.insert(p)
        assert not await personas.insert(p)
        await personas.add_room("ada", "!r:x")
        assert [q.name for q in await personas.in_room("!r:x")] == ["ada"]
        got = await personas.by_mxid("@hive_ada:x")
        assert got is not None and got.traits == {"openness": 0.9}
        await personas.delete("ada")
        assert await personas.rooms_of("ada") == []  # cascades

        rooms = RoomStore(db)
        assert (await rooms.get("!r:x")).active
        await rooms.set_active("!r:x", False)
        await rooms.reset_context("!r:x", 42)
        settings = await rooms.get("!r:x")
        assert not settings.active and settings.context_since == 42
    finally:
        await db.stop()


async def test_cli_migrate(db_url: str, tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "homeserver:\n  address: http://127.0.0.1:8008\n  domain: example.org\n"
        f"database:\n  url: {db_url}\ndata_dir: {tmp_path}\n"
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "hivebridge", "-c", str(cfg), "migrate"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    db = await open_database(db_url)
    try:
        assert await db.table_exists("messages")
    finally:
        await db.stop()
