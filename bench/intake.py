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
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hivebridge.app import build
from hivebridge.config import AppserviceConfig, Config, DatabaseConfig, HomeserverConfig
from hivebridge.devserver.process import free_port

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
    config = Config(
        homeserver=HomeserverConfig(address="http://127.0.0.1:9", domain="bench.test"),
        appservice=AppserviceConfig(as_token="bench-as-token-0123456789", hs_token=HS_TOKEN),
        database=DatabaseConfig(url=db_url),
    )
    stack = AsyncExitStack()
    # The bridge's own graph, nothing started but the database: no model is loaded,
    # and no persona is in the rooms, so routing never asks one.
    parts = await build(config, Path("/nonexistent"), stack)
    intake, messages, handler = parts.intake, parts.messages, parts.handler
    port = free_port()
    await intake.start("127.0.0.1", port, sink=handler.on_event)
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
            await handler.drain()
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
        await handler.close()
        await intake.stop()
        await stack.aclose()


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
