"""Intake throughput: transactions pushed at the appservice endpoint as Synapse would.

Messages need no reply (no persona in the rooms), so this measures the bridge's
own path: HTTP, hs_token check, transaction dedupe, storing every message once,
per-room ordering and routing, on PostgreSQL (or SQLite with --sqlite).
Prints one JSON line last: events_per_s, db, and the counts behind it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mautrix.appservice.state_store.asyncpg import PgASStateStore

from hivebridge.commands.base import CommandTable
from hivebridge.config import Config, HomeserverConfig
from hivebridge.db import open_database
from hivebridge.db.messages import MessageStore
from hivebridge.db.personas import PersonaStore
from hivebridge.db.rooms import RoomStore
from hivebridge.db.trust import TrustStore
from hivebridge.db.txns import TxnStore
from hivebridge.devserver.synapse import free_port
from hivebridge.events import EventRouter
from hivebridge.matrix.intake import Intake
from hivebridge.matrix.sender import Sender
from hivebridge.personas import PersonaDirectory
from hivebridge.replies import ReplyService
from hivebridge.roles import Roles

PG_SERVER = "postgres://postgres@127.0.0.1:5432/postgres"
HS_TOKEN = "bench-hs-token-0123456789"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def transaction(txn: int, per_txn: int, rooms: int) -> dict[str, Any]:
    events = []
    for i in range(per_txn):
        n = txn * per_txn + i
        events.append(
            {
                "type": "m.room.message",
                "event_id": f"$bench{n}",
                "room_id": f"!room{n % rooms}:bench.test",
                "sender": f"@user{n % 17}:bench.test",
                "origin_server_ts": 1_700_000_000_000 + n,
                "content": {"msgtype": "m.text", "body": f"message number {n} in the benchmark"},
            }
        )
    return {"events": events}


async def run(
    db_url: str, label: str, txns: int, per_txn: int, rooms: int, conc: int
) -> dict[str, Any]:
    config = Config(homeserver=HomeserverConfig(address="http://127.0.0.1:9", domain="bench.test"))
    db = await open_database(db_url)
    state_store = PgASStateStore(db)
    await state_store.upgrade_table.upgrade(db)
    messages = MessageStore(db)
    router: EventRouter | None = None

    def on_event(event: Any, stored: Any) -> None:
        assert router is not None
        router.on_event(event, stored)

    intake = Intake(
        messages=messages,
        txns=TxnStore(db),
        on_event=on_event,
        is_own_user=lambda mxid: mxid.startswith("@hive_"),
        server=config.homeserver.address,
        domain=config.homeserver.domain,
        as_token="bench-as-token-0123456789",
        hs_token=HS_TOKEN,
        bot_localpart=config.appservice.bot_localpart,
        id="hivebridge",
        state_store=state_store,
    )
    personas = PersonaDirectory(config, PersonaStore(db), intake)
    rooms_store = RoomStore(db)
    sender = Sender(messages)

    def no_backend(_: Any) -> Any:
        raise RuntimeError("no persona should answer in the intake benchmark")

    replies = ReplyService(config, personas, messages, rooms_store, sender, no_backend, len)
    router = EventRouter(
        config,
        intake,
        personas,
        messages,
        rooms_store,
        Roles(config.permissions, TrustStore(db)),
        CommandTable(),
        sender,
        replies,
    )
    port = free_port()
    await intake.start("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}/_matrix/app/v1/transactions/"
    bodies = [transaction(t, per_txn, rooms) for t in range(txns)]
    sem = asyncio.Semaphore(conc)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {HS_TOKEN}"}) as http:

            async def push(t: int) -> None:
                async with sem, http.put(f"{url}{t}", json=bodies[t]) as resp:
                    assert resp.status == 200, resp.status

            started = time.perf_counter()
            await asyncio.gather(*(push(t) for t in range(txns)))
            received = time.perf_counter() - started
            await router.drain()
            routed = time.perf_counter() - started
        total = txns * per_txn
        stored = await messages.count()
        unhandled = len(await messages.unhandled(0))
        assert stored == total, (stored, total)
        assert unhandled == 0, unhandled
        return {
            "events_per_s": round(total / routed, 1),
            "received_per_s": round(total / received, 1),
            "db": label,
            "events": total,
            "transactions": txns,
            "rooms": rooms,
            "stored": stored,
            "seconds": round(routed, 3),
        }
    finally:
        await router.close()
        await intake.stop()
        await db.stop()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sqlite", action="store_true", help="use SQLite instead of PostgreSQL")
    p.add_argument("--transactions", type=int, default=200)
    p.add_argument("--per-txn", type=int, default=50)
    p.add_argument("--rooms", type=int, default=50)
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args()
    if args.sqlite:
        import tempfile

        url, label, cleanup = f"sqlite:{tempfile.mkdtemp()}/bench.db", "sqlite", None
    else:
        name = f"hb_bench_{secrets.token_hex(4)}"
        admin = await asyncpg.connect(PG_SERVER)
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.close()
        url, label, cleanup = f"{PG_SERVER.rsplit('/', 1)[0]}/{name}", "postgresql", name
    try:
        log(f"pushing {args.transactions} x {args.per_txn} events into {args.rooms} rooms")
        result = await run(
            url, label, args.transactions, args.per_txn, args.rooms, args.concurrency
        )
    finally:
        if cleanup:
            admin = await asyncpg.connect(PG_SERVER)
            await admin.execute(f'DROP DATABASE IF EXISTS "{cleanup}" WITH (FORCE)')
            await admin.close()
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
