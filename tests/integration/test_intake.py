"""The appservice endpoint, as Synapse calls it, over real HTTP and a real database."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from mautrix.appservice.state_store.asyncpg import PgASStateStore
from mautrix.types import Event

from hivebridge.db import open_database
from hivebridge.db.messages import MessageStore, StoredMessage
from hivebridge.db.summaries import SummaryStore
from hivebridge.db.txns import TxnStore
from hivebridge.devserver.process import free_port
from hivebridge.matrix import intake as intake_module
from hivebridge.matrix.intake import Intake

HS_TOKEN = "hs-token-for-tests-0123456789"


class Running:
    def __init__(self, intake: Intake, port: int, seen: list[tuple[str, bool]]) -> None:
        self.intake, self.port, self.seen = intake, port, seen

    def url(self, txn: str) -> str:
        return f"http://127.0.0.1:{self.port}/_matrix/app/v1/transactions/{txn}"


async def start_intake(db_url: str, **kwargs: Any) -> Running:
    db = await open_database(db_url)
    state_store = PgASStateStore(db)
    await state_store.upgrade_table.upgrade(db)
    seen: list[tuple[str, bool]] = []

    def on_event(event: Event, stored: StoredMessage | None) -> None:
        seen.append((str(event.event_id), stored is not None))

    intake = Intake(
        messages=MessageStore(db),
        txns=TxnStore(db),
        server="http://127.0.0.1:9",  # never called here
        domain="hive.test",
        as_token="as-token-for-tests-0123456789",
        hs_token=HS_TOKEN,
        bot_localpart="hive_bot",
        id="hivebridge",
        state_store=state_store,
        **kwargs,
    )
    port = free_port()
    await intake.start("127.0.0.1", port, sink=on_event)
    return Running(intake, port, seen)


async def stop_intake(running: Running) -> None:
    db = running.intake.messages.db
    await running.intake.stop()
    await db.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def txn_body(*event_ids: str) -> dict[str, Any]:
    return {
        "events": [
            {
                "type": "m.room.message",
                "event_id": eid,
                "room_id": "!room:hive.test",
                "sender": "@alice:hive.test",
                "origin_server_ts": 1_700_000_000_000 + i,
                "content": {"msgtype": "m.text", "body": f"hello {eid}"},
            }
            for i, eid in enumerate(event_ids)
        ]
    }


async def put(http: aiohttp.ClientSession, url: str, body: Any, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.put(url, json=body, headers=headers) as resp:
        return resp.status


async def test_missing_or_wrong_token_is_refused_and_stores_nothing(
    db_url: str, http: aiohttp.ClientSession
) -> None:
    running = await start_intake(db_url)
    try:
        assert await put(http, running.url("1"), txn_body("$a"), None) == 401
        assert await put(http, running.url("1"), txn_body("$a"), "wrong-token") == 403
        status = await put(http, running.url("1") + "?access_token=wrong", txn_body("$a"), None)
        assert status == 401
        assert await running.intake.messages.count() == 0
        assert await running.intake.txns.count() == 0
        assert running.seen == []
    finally:
        await stop_intake(running)


ROUTES = [
    ("PUT", "/_matrix/app/v1/transactions/t1"),
    ("PUT", "/transactions/t2"),
    ("GET", "/_matrix/app/v1/users/@hive_x:hive.test"),
    ("GET", "/users/@hive_x:hive.test"),
    ("GET", "/_matrix/app/v1/rooms/%23alias:hive.test"),
    ("GET", "/rooms/%23alias:hive.test"),
    ("POST", "/_matrix/app/v1/ping"),
]


async def test_every_route_takes_the_token_from_the_header_only_in_constant_time(
    db_url: str, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: mautrix's ping/users/rooms routes compared with ``!=`` and took ?access_token=."""
    compared: list[bytes] = []
    real = intake_module.hmac.compare_digest

    def compare_digest(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(intake_module.hmac, "compare_digest", compare_digest)
    running = await start_intake(db_url)
    base = f"http://127.0.0.1:{running.port}"
    body = {"events": [], "transaction_id": "p"}
    try:
        for method, path in ROUTES:
            url = base + path
            async with http.request(method, f"{url}?access_token={HS_TOKEN}", json=body) as r:
                assert r.status == 401, (method, path)
                if path.startswith("/_matrix/app/v1/transactions"):
                    assert "Authorization header" in (await r.json())["error"]
            wrong = {"Authorization": "Bearer wrong-token"}
            async with http.request(method, url, json=body, headers=wrong) as r:
                assert r.status in (401, 403), (method, path)
            compared.clear()
            right = {"Authorization": f"Bearer {HS_TOKEN}"}
            async with http.request(method, url, json=body, headers=right) as r:
                assert r.status not in (401, 403), (method, path)
            assert compared == [HS_TOKEN.encode()], (method, path)
    finally:
        await stop_intake(running)


async def test_origin_server_ts_is_clamped_to_the_receive_time(
    db_url: str, http: aiohttp.ClientSession
) -> None:
    """Before: a future timestamp sorted its event after every later one (it stayed the
    "newest" message of the room), and 2**70 failed the transaction (500) for good."""
    running = await start_intake(db_url)
    try:
        body = txn_body("$normal", "$future", "$huge", "$negative")
        before = int(time.time() * 1000)
        year = 365 * 24 * 3600 * 1000
        stamps = [before - 1000, before + 10 * year, 2**70, -5]
        for event, ts in zip(body["events"], stamps, strict=True):
            event["origin_server_ts"] = ts
        assert await put(http, running.url("ts1"), body, HS_TOKEN) == 200
        after = int(time.time() * 1000)
        later = txn_body("$later")
        later["events"][0]["origin_server_ts"] = int(time.time() * 1000)
        assert await put(http, running.url("ts2"), later, HS_TOKEN) == 200
        rows = {
            eid: await running.intake.messages.get(eid)
            for eid in ("$normal", "$future", "$huge", "$negative", "$later")
        }
        assert rows["$normal"] is not None and rows["$normal"].ts == before - 1000
        for eid in ("$future", "$huge", "$negative"):
            row = rows[eid]
            assert row is not None and before <= row.ts <= after, (eid, row)
        recent = await running.intake.messages.recent("!room:hive.test", 0, 10)
        assert recent[-1].event_id == "$later"  # the newest is the one that came last
    finally:
        await stop_intake(running)


async def test_same_transaction_twice_and_after_restart_is_processed_once(
    db_url: str, http: aiohttp.ClientSession
) -> None:
    running = await start_intake(db_url)
    try:
        assert await put(http, running.url("7"), txn_body("$a", "$b"), HS_TOKEN) == 200
        assert await put(http, running.url("7"), txn_body("$a", "$b"), HS_TOKEN) == 200
        assert running.seen == [("$a", True), ("$b", True)]
        assert await running.intake.messages.count() == 2
    finally:
        await stop_intake(running)

    restarted = await start_intake(db_url)  # fresh process state, same database
    try:
        assert await put(http, restarted.url("7"), txn_body("$a", "$b"), HS_TOKEN) == 200
        assert restarted.seen == []
        # A new transaction repeating a stored event: delivered, but not routed again.
        assert await put(http, restarted.url("8"), txn_body("$b", "$c"), HS_TOKEN) == 200
        assert restarted.seen == [("$b", False), ("$c", True)]
        assert await restarted.intake.messages.count() == 3
        # A homeserver that numbers transactions anew (Synapse on SQLite after a
        # restart) reuses an id for new events: they are processed, not dropped.
        assert await put(http, restarted.url("7"), txn_body("$d"), HS_TOKEN) == 200
        assert ("$d", True) in restarted.seen
    finally:
        await stop_intake(restarted)


async def test_malformed_events_are_skipped_not_fatal(
    db_url: str, http: aiohttp.ClientSession
) -> None:
    running = await start_intake(db_url)
    try:
        body = {
            "events": [
                {"type": "m.room.message", "content": "not a dict"},
                {"type": "m.room.message", "event_id": 5, "room_id": [], "content": {}},
                "garbage",
                *txn_body("$ok")["events"],
            ]
        }
        assert await put(http, running.url("9"), body, HS_TOKEN) == 200
        assert await running.intake.messages.count() == 1
        assert ("$ok", True) in running.seen
        async with http.put(
            running.url("10"), data=b"{not json", headers={"Authorization": f"Bearer {HS_TOKEN}"}
        ) as resp:
            assert resp.status == 400
    finally:
        await stop_intake(running)


CANARY = "canary-7f3a-SECRET-paste"


def event(eid: str, sender: str, content: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "event_id": eid,
        "room_id": "!room:hive.test",
        "sender": sender,
        "origin_server_ts": 1_700_000_000_000,
        "content": content,
        **extra,
    }


def edit(eid: str, sender: str, target: str, text: str) -> dict[str, Any]:
    return event(
        eid,
        sender,
        {
            "msgtype": "m.text",
            "body": f"* {text}",
            "m.new_content": {"msgtype": "m.text", "body": text},
            "m.relates_to": {"rel_type": "m.replace", "event_id": target},
        },
    )


def redaction(eid: str, sender: str, target: str, *, v11: bool = False) -> dict[str, Any]:
    raw = {
        "type": "m.room.redaction",
        "event_id": eid,
        "room_id": "!room:hive.test",
        "sender": sender,
        "origin_server_ts": 1_700_000_000_500,
        "content": {"redacts": target} if v11 else {},
    }
    if not v11:
        raw["redacts"] = target
    return raw


async def test_edits_update_the_original_and_redactions_leave_no_trace(
    db_url: str, http: aiohttp.ClientSession
) -> None:
    """Before: an edit was a row of its own (prompts kept the original text), and a
    redaction changed nothing: the text stayed in the row, its edits and its quotes."""
    alice, mallory = "@alice:hive.test", "@mallory:hive.test"
    running = await start_intake(db_url, is_own_user=lambda m: m.startswith("@hive_"))
    summaries = SummaryStore(running.intake.messages.db)
    running.intake.summaries = summaries
    store = running.intake.messages
    try:
        first = event("$typo", alice, {"msgtype": "m.text", "body": "helo wrld"})
        fixed = edit("$fix", alice, "$typo", "hello world")
        forged = edit("$forged", mallory, "$typo", "mallory was here")
        assert (
            await put(http, running.url("e1"), {"events": [first, fixed, forged]}, HS_TOKEN) == 200
        )
        row = await store.get("$typo")
        assert (
            row is not None and row.body == "hello world" and row.content["body"] == "hello world"
        )
        edit_row = await store.get("$fix")
        assert edit_row is not None and edit_row.body == "" and "hello" not in str(edit_row.content)

        secret = event("$key", alice, {"msgtype": "m.text", "body": f"my key is {CANARY}"})
        again = edit("$key-edit", alice, "$key", f"my key is {CANARY} (really)")
        quote = event(
            "$reply",
            "@bob:hive.test",
            {
                "msgtype": "m.text",
                "body": f"> <{alice}> my key is {CANARY}\n\nplease redact that",
                "format": "org.matrix.custom.html",
                "formatted_body": f"<mx-reply>{CANARY}</mx-reply>please redact that",
                "m.relates_to": {"m.in_reply_to": {"event_id": "$key"}},
            },
        )
        body = {"events": [secret, again, quote]}
        assert await put(http, running.url("e2"), body, HS_TOKEN) == 200
        await summaries.put(
            "!room:hive.test", "", f"Alice shared {CANARY}.", 1_700_000_000_000, "$key"
        )
        assert (
            await put(
                http, running.url("e3"), {"events": [redaction("$no", mallory, "$key")]}, HS_TOKEN
            )
            == 200
        )
        row = await store.get("$key")
        assert row is not None and CANARY in row.body  # mallory may not redact alice's message
        redact = redaction("$red", alice, "$key", v11=db_url.startswith("sqlite"))
        assert await put(http, running.url("e4"), {"events": [redact]}, HS_TOKEN) == 200

        db = running.intake.messages.db
        rows = await db.fetch("SELECT * FROM messages")
        assert rows and not [dict(r) for r in rows if CANARY in repr(dict(r))]
        row = await store.get("$key")
        assert row is not None and row.body == "" and row.content == {}
        reply = await store.get("$reply")
        assert reply is not None and reply.body == "please redact that"
        assert await summaries.get("!room:hive.test") is None
        assert [e for e, _ in running.seen if e == "$red"]  # delivered on, for the handler
    finally:
        await stop_intake(running)


async def test_pathologically_nested_body_is_400_and_a_deep_event_is_skipped(
    db_url: str, http: aiohttp.ClientSession
) -> None:
    """5,000 nested arrays made the JSON parser raise RecursionError: a 500 with a
    traceback. A deep event inside a sound transaction must not fail it either
    (Synapse would retry that transaction forever)."""
    running = await start_intake(db_url)
    try:
        deep = b'{"events": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        async with http.put(
            running.url("11"), data=deep, headers={"Authorization": f"Bearer {HS_TOKEN}"}
        ) as resp:
            assert resp.status == 400
            assert (await resp.json())["errcode"] == "M_NOT_JSON"
        nested: Any = "x"
        for _ in range(900):
            nested = [nested]
        body = txn_body("$deep", "$fine")
        body["events"][0]["content"]["nested"] = nested
        assert await put(http, running.url("12"), body, HS_TOKEN) == 200
        assert running.seen == [("$fine", True)]
        assert await running.intake.messages.count() == 1
    finally:
        await stop_intake(running)
