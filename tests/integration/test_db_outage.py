"""The database connection cut under the bridge, on real PostgreSQL and real HTTP intake.

The server ends the bridge's sessions (``pg_terminate_backend``) while the pool
is idle and while transactions are in flight. What must hold: the process never
exits, every push gets 200 or a clean JSON 5xx (the homeserver retries that),
and once it retries every event is stored once and delivered to routing once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from typing import Any

import aiohttp
import asyncpg
import pytest

from hivebridge.db import open_database
from hivebridge.db.messages import StoredMessage
from hivebridge.db.resilience import is_connection_lost
from tests.integration.test_intake import HS_TOKEN, Running, start_intake, stop_intake, txn_body

pytestmark = pytest.mark.postgres

KILL = (
    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


async def terminate_others(conn: asyncpg.Connection) -> int:
    """End every other session on the database; returns once they are gone (or 5 s)."""
    return int(await conn.fetchval(KILL))


async def terminate_bridge_sessions(url: str) -> int:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return await terminate_others(conn)
    finally:
        await conn.close()


def terminate_blocking(url: str) -> int:
    """Kill the sessions with this event loop blocked, so it reads the server's goodbye
    only when the test lets it: the pool's idle connections are then surely stale."""
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(asyncio.run(terminate_bridge_sessions(url)))
    )
    thread.start()
    thread.join()
    return result[0]


async def wait_for_lock_waiters(conn: asyncpg.Connection, n: int) -> None:
    """Until ``n`` sessions of the database wait on a lock (the pushes are mid-way)."""
    query = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    for _ in range(1000):
        if await conn.fetchval(query) >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {n} transactions reached the lock")


class Homeserver:
    """Pushes transactions as Synapse does: the same id and body again until a 2xx."""

    def __init__(self, http: aiohttp.ClientSession, running: Running) -> None:
        self.http, self.running = http, running
        self.failures: list[tuple[int, Any]] = []

    async def push(self, txn: str, *event_ids: str) -> int:
        """Attempts it took; every refusal must be a clean Matrix error."""
        headers = {"Authorization": f"Bearer {HS_TOKEN}"}
        for attempt in range(1, 11):
            async with self.http.put(
                self.running.url(txn), json=txn_body(*event_ids), headers=headers
            ) as resp:
                body = await resp.json(content_type=None)
                if resp.status == 200:
                    assert body == {}
                    return attempt
                self.failures.append((resp.status, body))
            await asyncio.sleep(0.05 * attempt)
        raise AssertionError(f"transaction {txn} never accepted: {self.failures[-3:]}")

    async def push_during_cut(
        self, url: str, txns: list[tuple[str, ...]], *, cut_after: int
    ) -> None:
        """Push all at once; end the bridge's sessions once ``cut_after`` were accepted."""
        accepted = 0
        enough = asyncio.Event()

        async def one(txn: tuple[str, ...]) -> None:
            nonlocal accepted
            await self.push(*txn)
            accepted += 1
            if accepted >= cut_after:
                enough.set()

        pushes = asyncio.gather(*(one(t) for t in txns))
        await enough.wait()
        assert await terminate_bridge_sessions(url) >= 1
        await pushes


def assert_clean(failures: list[tuple[int, Any]]) -> None:
    for status, body in failures:
        assert status >= 500, (status, body)
        assert body == {"errcode": "M_UNKNOWN", "error": "Transaction failed"}, body


async def assert_exactly_once(running: Running, event_ids: list[str]) -> None:
    counts = Counter(eid for eid, stored in running.seen if stored)
    assert {e: counts[e] for e in event_ids} == dict.fromkeys(event_ids, 1)
    db = running.intake.messages.db
    rows = await db.fetch("SELECT event_id FROM messages WHERE event_id = ANY($1)", event_ids)
    assert sorted(r["event_id"] for r in rows) == sorted(event_ids)


async def test_stale_pool_connections_never_exit_and_reads_recover(postgres_url: str) -> None:
    """Each idle connection was cut; the loop then reads the goodbye 0..3 turns before
    the query: a handed-out dead socket, or asyncpg's stuck "another operation (2) is
    in progress" (which mautrix alone answers with sys.exit(26))."""
    db = await open_database(postgres_url)
    try:
        await db.execute("CREATE TABLE outage_probe (n integer PRIMARY KEY)")
        for turns in range(4):
            await asyncio.gather(*(db.fetchval("SELECT 1") for _ in range(3)))  # warm the pool
            assert terminate_blocking(postgres_url) >= 1
            for _ in range(turns):
                await asyncio.sleep(0)
            assert await db.fetchval("SELECT $1::int", turns) == turns
            # A write runs on a fresh connection or fails as lost; never half-done twice.
            try:
                await db.execute("INSERT INTO outage_probe VALUES ($1)", turns)
            except Exception as e:
                assert is_connection_lost(e), repr(e)
                await db.execute("INSERT INTO outage_probe VALUES ($1)", turns)
        assert await db.fetchval("SELECT count(*) FROM outage_probe") == 4
    finally:
        await db.stop()


async def test_intake_rides_out_connections_cut_idle_and_mid_transaction(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    running = await start_intake(postgres_url)
    try:
        async with aiohttp.ClientSession() as http:
            hs = Homeserver(http, running)
            assert await hs.push("before", "$b0", "$b1") == 1
            expected = ["$b0", "$b1"]

            # Idle: every pooled connection is cut, then a burst arrives at once.
            burst = [(f"idle{i}", f"$i{i}a", f"$i{i}b") for i in range(12)]
            assert terminate_blocking(postgres_url) >= 1
            await asyncio.gather(*(hs.push(*t) for t in burst))
            expected += [e for t in burst for e in t[1:]]

            # Traffic: sessions are ended while pushes are in flight (after the first few).
            for r in range(3):
                traffic = [(f"r{r}t{i}", f"$r{r}t{i}a", f"$r{r}t{i}b") for i in range(24)]
                await hs.push_during_cut(postgres_url, traffic, cut_after=4)
                expected += [e for t in traffic for e in t[1:]]
            traffic_txns = 3 * 24

            # Busy: transactions wait on a lock mid-way (their messages inserted, the
            # txn row not yet) when their sessions are ended.
            locker = await asyncpg.connect(postgres_url, timeout=5)
            try:
                tx = locker.transaction()
                await tx.start()
                await locker.execute("LOCK TABLE processed_txns IN SHARE ROW EXCLUSIVE MODE")
                busy = [(f"busy{i}", f"$m{i}a", f"$m{i}b") for i in range(6)]
                pushes = asyncio.gather(*(hs.push(*t) for t in busy))
                await wait_for_lock_waiters(locker, len(busy))
                assert await terminate_others(locker) >= len(busy)
                await tx.rollback()
            finally:
                await locker.close()
            attempts = await pushes
            expected += [e for t in busy for e in t[1:]]
            assert min(attempts) >= 2, "each cut transaction was refused, then retried"

            # After the outage: new events and a retried (duplicate) transaction, once.
            assert await hs.push("after", "$a0") == 1
            assert await hs.push("after", "$a0") == 1
            expected.append("$a0")

        assert_clean(hs.failures)
        await assert_exactly_once(running, expected)
        # A lost connection is an operational event: one warning line, no traceback.
        loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        assert not loud, [f"{r.name}: {r.getMessage()}" for r in loud[:5]]
        total = 2 + len(burst) + traffic_txns + len(busy)
        assert await running.intake.txns.count() == total
    finally:
        await stop_intake(running)


async def test_a_commit_whose_answer_was_lost_is_delivered_on_retry(postgres_url: str) -> None:
    """The COMMIT lands but its connection dies before the answer: the push fails, and
    the homeserver's retry finds the transaction processed. It must still be routed."""
    running = await start_intake(postgres_url)
    intake = running.intake
    store = intake._store
    cut = asyncio.Event()

    async def commit_then_lose(
        txn_id: str, rows: list[StoredMessage], *rest: Any
    ) -> dict[str, StoredMessage]:
        fresh = await store(txn_id, rows, *rest)
        if not cut.is_set():
            cut.set()
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle")
        return fresh

    intake._store = commit_then_lose  # type: ignore[method-assign]
    try:
        async with aiohttp.ClientSession() as http:
            hs = Homeserver(http, running)
            assert await hs.push("t1", "$c0", "$c1") == 2
            assert await hs.push("t1", "$c0", "$c1") == 1  # a later duplicate: nothing again
        assert cut.is_set()
        assert_clean(hs.failures)
        await assert_exactly_once(running, ["$c0", "$c1"])
    finally:
        await stop_intake(running)
