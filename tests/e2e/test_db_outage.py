"""PostgreSQL ends the bridge's sessions, idle and mid-work; Synapse and the bridge recover.

Real Synapse (the session's), the bridge in process on real PostgreSQL. The
server side of every bridge connection is terminated three times: while the
bridge is idle; while intake is inside the transaction that stores a pushed
event (held there by a lock the test takes, so the kill lands mid-way every
time); and while routing writes the persona's decision to answer. Synapse
retries the refused transaction on its own; routing redoes its work. In the end
every message is stored and routed exactly once, the persona answers the
question exactly once, and nothing is logged as an error.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from hivebridge import metrics
from hivebridge.app import Bridge
from hivebridge.config import DatabaseConfig
from tests.e2e.bridge_process import answers_to, dump, pg_fetch, room_history
from tests.e2e.conftest import Homeserver
from tests.e2e.test_exactly_once import addressed, wait_until
from tests.integration.test_db_outage import (
    terminate_bridge_sessions,
    terminate_others,
    wait_for_lock_waiters,
)

pytestmark = [pytest.mark.synapse, pytest.mark.model, pytest.mark.postgres]


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def not_addressed() -> float:
    return sample("hivebridge_routing_decisions_total", answer="no", reason="not_addressed")


async def cut_while_waiting_on(url: str, table: str, work: Callable[[], Awaitable[str]]) -> str:
    """Run ``work`` with ``table`` locked; once the bridge waits on the lock (mid-way
    through its own DB transaction), end every bridge session, then let go."""
    locker = await asyncpg.connect(url, timeout=5)
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")
        result = await work()
        await wait_for_lock_waiters(locker, 1)
        assert await terminate_others(locker) >= 1
        await tx.rollback()
    finally:
        await locker.close()
    return result


async def test_database_connections_cut_idle_and_mid_work(
    homeserver: Homeserver, postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    config = replace(
        homeserver.config,
        data_dir=str(tmp_path / "bridge"),
        database=DatabaseConfig(url=postgres_url),
    )
    persona = config.persona_mxid(config.default_persona.name)
    bridge = Bridge(config, homeserver.registration)
    await bridge.start()
    try:
        async with await homeserver.human("outage") as human:
            room = await human.create_room([persona, config.bot_mxid], name="db outage")
            await human.wait_for_members(room, {human.user_id, persona, config.bot_mxid})
            routed_before = not_addressed()
            refused_before = sample("hivebridge_matrix_transactions_total", outcome="rejected")

            assert await terminate_bridge_sessions(postgres_url) >= 1  # idle
            sent = [await human.send_text(room, f"chatter {i}") for i in range(3)]
            # Intake: stuck inside the transaction storing this event when cut.
            sent.append(
                await cut_while_waiting_on(
                    postgres_url,
                    "processed_txns",
                    lambda: human.send_text(room, "chatter during the cut"),
                )
            )

            async def all_routed() -> bool:
                rows = await pg_fetch(
                    postgres_url,
                    "SELECT event_id FROM messages WHERE event_id = ANY($1) AND handled",
                    sent,
                )
                return len(rows) == len(sent)

            # Synapse retries the refused transaction after its backoff (2 s at first).
            await wait_until(all_routed, 60, "the event pushed during the cut was never routed")
            assert sample("hivebridge_matrix_transactions_total", outcome="rejected") > (
                refused_before
            )

            # Routing: stuck writing the persona's decision to answer when cut.
            question = await cut_while_waiting_on(
                postgres_url,
                "reply_jobs",
                lambda: addressed(human, room, persona, "are you still there?"),
            )
            history: list[dict[str, Any]] = []

            async def answered() -> bool:
                nonlocal history
                history = await room_history(human, room)
                return bool(answers_to(history, persona, question))

            await wait_until(answered, 120, "no answer after the cut", poll=0.5)
            await bridge.parts.handler.drain()
            history = await room_history(human, room)

        assert len(answers_to(history, persona, question)) == 1, dump(history[-10:])
        rows = await pg_fetch(
            postgres_url, "SELECT event_id, handled FROM messages WHERE room_id = $1", room
        )
        handled = {r["event_id"]: r["handled"] for r in rows}
        assert all(handled.get(e) for e in [*sent, question]), handled
        # One decision per unaddressed message: none routed twice, none skipped.
        assert not_addressed() - routed_before == len(sent)
        jobs = await pg_fetch(
            postgres_url, "SELECT state FROM reply_jobs WHERE event_id = $1", question
        )
        assert [j["state"] for j in jobs] == ["done"]
        loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        assert not loud, [f"{r.name}: {r.getMessage()}" for r in loud[:5]]
    finally:
        await bridge.stop()
