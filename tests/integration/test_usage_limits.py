"""Usage rows, !stats figures, request rates and daily budgets on real SQLite and PostgreSQL.

The clock is the only thing faked: limits run on a wall clock, and a test cannot
wait a minute (or a day) for a bucket to refill.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hivebridge.config import ConfigError, LimitsConfig, load_config
from hivebridge.db import open_database
from hivebridge.db.messages import MessageStore, StoredMessage
from hivebridge.db.usage import RateLimitStore, UsageRecord, UsageStore
from hivebridge.personas.limits import Limits

OWNER = "@boss:x"
NOON = datetime(2026, 11, 22, 12, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def role_of(mxid: str) -> str:
    return "owner" if mxid == OWNER else "user"


def limits_on(db: object, clock: Clock, **cfg: object) -> Limits:
    return Limits(
        LimitsConfig(**cfg),  # type: ignore[arg-type]
        UsageStore(db),  # type: ignore[arg-type]
        RateLimitStore(db),  # type: ignore[arg-type]
        role_of,  # type: ignore[arg-type]
        clock=clock,
    )


def usage(
    day: str,
    user: str,
    tokens: int,
    *,
    persona: str | None = "ada",
    kind: str = "reply",
    model: str = "m1",
    room: str = "!r:x",
) -> UsageRecord:
    return UsageRecord(0, day, user, room, persona, model, kind, tokens // 2, tokens - tokens // 2)  # type: ignore[arg-type]


async def test_report_counts_totals_today_and_groups(db_url: str) -> None:
    db = await open_database(db_url)
    try:
        store = UsageStore(db)
        await store.record(usage("2026-11-21", "@a:x", 100))
        await store.record(usage("2026-11-22", "@a:x", 10))
        await store.record(usage("2026-11-22", "@b:x", 7, persona=None, kind="ask", model="m2"))
        for i, (sender, persona) in enumerate(
            [("@a:x", None), ("@a:x", None), ("@bot:x", None), ("@hive_ada:x", "ada")]
        ):
            ts = int(NOON * 1000) - i * 8 * 3_600_000
            msg = StoredMessage(f"$m{i}", "!r:x", sender, "m.text", "hi", {}, None, None, ts)
            await MessageStore(db).insert(replace(msg, persona=persona))
        r = await store.report("2026-11-22", bot_mxid="@bot:x")
        assert (r.messages, r.messages_today) == (2, 2)  # people only: not the bot or personas
        assert (r.replies, r.replies_today, r.asks, r.asks_today) == (2, 1, 1, 1)
        assert (r.tokens, r.tokens_today) == (117, 17)
        assert [(t.key, t.requests, t.tokens, t.tokens_today) for t in r.top_users] == [
            ("@a:x", 2, 110, 10),
            ("@b:x", 1, 7, 7),
        ]
        assert [(t.key, t.requests) for t in r.personas] == [("ada", 2)]
        assert [(t.key, t.requests) for t in r.models] == [("m1", 2), ("m2", 1)]
        assert await store.tokens_on("2026-11-22", "user_id", "@a:x") == 10
        assert await store.tokens_on("2026-11-22", "room_id", "!r:x") == 17
        assert await store.tokens_on("2026-11-21", "persona", "ada") == 100
    finally:
        await db.stop()


async def test_rate_limit_notifies_once_and_survives_restart(db_url: str) -> None:
    clock = Clock()
    db = await open_database(db_url)
    try:
        limits = limits_on(db, clock, requests_per_minute=2)
        await limits.load()
        assert (await limits.check("@u:x", "!r:x", "ada")).allowed
        assert (await limits.check("@u:x", "!r:x", "bob", spend=False)).allowed  # same message
        assert (await limits.check("@u:x", "!r:x", "ada")).allowed
        refused = await limits.check("@u:x", "!r:x", "ada")
        assert not refused.allowed and refused.notify
        assert refused.message == (
            "@u:x: you are over the limit of 2 requests per minute; try again in 30 seconds."
        )
        again = await limits.check("@u:x", "!r:x", "ada")
        assert not again.allowed and not again.notify and again.message == ""  # silence
        for _ in range(5):  # owners are exempt; other users have buckets of their own
            assert (await limits.check(OWNER, "!r:x")).allowed
        assert (await limits.check("@v:x", "!r:x")).allowed
    finally:
        await db.stop()

    # After a restart the bucket is still empty: the counter was persisted.
    db = await open_database(db_url)
    try:
        limits = limits_on(db, clock, requests_per_minute=2)
        assert await limits.load() == 2
        assert not (await limits.check("@u:x", "!r:x")).allowed
        clock.now += 31
        assert (await limits.check("@u:x", "!r:x")).allowed
        await db.execute("UPDATE rate_limits SET state='not json' WHERE key=$1", "user:@v:x")
        assert await limits_on(db, clock, requests_per_minute=2).load() == 1  # skipped, no crash
    finally:
        await db.stop()


async def test_daily_budgets_of_user_room_and_persona(db_url: str) -> None:
    clock = Clock()
    db = await open_database(db_url)
    try:
        limits = limits_on(
            db,
            clock,
            requests_per_minute=0,
            user_tokens_per_day=100,
            room_tokens_per_day=150,
            persona_tokens_per_day=0,  # 0: unlimited
        )
        record = dict(room_id="!r:x", persona="ada", model="m1", kind="reply")
        await limits.record(user="@u:x", prompt_tokens=60, completion_tokens=40, **record)  # type: ignore[arg-type]
        over = await limits.check("@u:x", "!r:x", "ada")
        assert not over.allowed and over.notify
        assert "@u:x: your daily token budget (100 tokens) is used up" in over.message
        assert "try again in 12 h" in over.message
        assert not (await limits.check("@u:x", "!r:x", "ada")).notify  # said once
        assert (await limits.check("@w:x", "!r:x", "ada")).allowed
        await limits.record(user="@w:x", prompt_tokens=50, completion_tokens=0, **record)  # type: ignore[arg-type]
        room = await limits.check("@w:x", "!r:x", "ada")
        assert not room.allowed and "this room's daily token budget (150 tokens)" in room.message
        assert (await limits.check("@w:x", "!elsewhere:x", "ada")).allowed
        assert (await limits.check(OWNER, "!r:x", "ada")).allowed  # owners exempt
        clock.now += 12 * 3600 + 1  # a new UTC day: budgets start over
        assert (await limits.check("@u:x", "!r:x", "ada")).allowed

        persona_cap = limits_on(db, clock, requests_per_minute=0, persona_tokens_per_day=5)
        await persona_cap.record(user="@w:x", prompt_tokens=5, completion_tokens=1, **record)  # type: ignore[arg-type]
        capped = await persona_cap.check(None, "!r:x", "ada")  # a persona speaking
        assert not capped.allowed and "ada's daily token budget (5 tokens)" in capped.message
        assert (await persona_cap.check(None, "!r:x", "bob")).allowed
    finally:
        await db.stop()


def test_config_reads_endpoints_and_limits(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "homeserver: {address: 'http://h:8008', domain: x}\n"
        "endpoints:\n"
        "  - {name: gpu1, url: 'http://gpu1:8000/v1', api_key: sk-file, api_key_env: GPU1_KEY}\n"
        "limits: {requests_per_minute: 3, burst: 5, room_tokens_per_day: 1000}\n"
        "inference: {fallback_model: SmolLM2-135M-Instruct}\n"
    )
    config = load_config(path, env={})
    (ep,) = config.endpoints
    assert (ep.name, ep.url, ep.resolved_key({})) == ("gpu1", "http://gpu1:8000/v1", "sk-file")
    assert ep.resolved_key({"GPU1_KEY": "sk-env"}) == "sk-env"  # the environment wins
    assert "sk-file" not in repr(config)
    assert (config.limits.requests_per_minute, config.limits.burst) == (3.0, 5)
    assert config.limits.room_tokens_per_day == 1000 and config.limits.exempt_owners
    assert config.inference.fallback_model == "SmolLM2-135M-Instruct"
    for bad, key in (
        ("endpoints: [{name: Bad Name, url: 'http://h'}]", "endpoints[0].name"),
        ("endpoints: [{name: a, url: 'ftp://h'}]", "endpoints[0].url"),
        (
            "endpoints: [{name: a, url: 'http://h'}, {name: a, url: 'http://i'}]",
            "endpoints[1].name",
        ),
        ("endpoints: [{url: 'http://h'}]", "endpoints[0].name"),
        ("limits: {requests_per_minute: -1}", "limits.requests_per_minute"),
        ("limits: {burst: 0}", "limits.burst"),
        ("limits: {user_tokens_per_day: lots}", "limits.user_tokens_per_day"),
    ):
        path.write_text("homeserver: {address: 'http://h:8008', domain: x}\n" + bad + "\n")
        with pytest.raises(ConfigError) as err:
            load_config(path, env={})
        assert err.value.key == key, (bad, str(err.value))


async def test_overrides_by_user_room_and_persona(db_url: str) -> None:
    from hivebridge.config import LimitOverride

    clock = Clock()
    db = await open_database(db_url)
    try:
        limits = limits_on(
            db,
            clock,
            requests_per_minute=1,
            user_tokens_per_day=100,
            overrides=(
                LimitOverride(user="@vip:x", requests_per_minute=3, tokens_per_day=0),
                LimitOverride(room="!busy:x", requests_per_minute=2),
                LimitOverride(persona="costly", requests_per_minute=0, tokens_per_day=10),
                LimitOverride(room="!quiet:x", tokens_per_day=20),
            ),
        )
        await limits.load()

        async def allowed(user: str, room: str, persona: str = "ada", n: int = 10) -> int:
            """How many requests in a row are let through."""
            for i in range(n):
                if not (await limits.check(user, room, persona)).allowed:
                    return i
            return n

        assert await allowed("@u:x", "!r:x", n=1) == 1  # the default: 1 a minute
        refused = await limits.check("@u:x", "!r:x", "ada")
        assert "limit of 1 requests per minute" in refused.message
        assert await allowed("@vip:x", "!r:x") == 3  # the user's own rate, wherever
        assert await allowed("@vip:x", "!busy:x") == 0  # ... its bucket is spent
        assert await allowed("@w:x", "!busy:x") == 2  # each user in that room: 2 a minute
        assert await allowed("@w:x", "!other:x") == 1  # elsewhere the default, its own bucket
        assert await allowed("@w:x", "!r:x", "costly") == 10  # no rate for that persona

        record = dict(model="m1", kind="reply")
        await limits.record(
            user="@vip:x",
            room_id="!r:x",
            persona="ada",
            prompt_tokens=500,
            completion_tokens=0,
            **record,
        )  # type: ignore[arg-type]
        clock.now += 61
        assert (await limits.check("@vip:x", "!r:x", "ada")).allowed  # 0: unlimited budget
        await limits.record(
            user="@w:x",
            room_id="!r:x",
            persona="costly",
            prompt_tokens=10,
            completion_tokens=0,
            **record,
        )  # type: ignore[arg-type]
        over = await limits.check("@z:x", "!r:x", "costly")
        assert not over.allowed and "costly's daily token budget (10 tokens)" in over.message
        await limits.record(
            user="@y:x",
            room_id="!quiet:x",
            persona="ada",
            prompt_tokens=20,
            completion_tokens=0,
            **record,
        )  # type: ignore[arg-type]
        quiet = await limits.check("@z:x", "!quiet:x", "ada")
        assert not quiet.allowed and "this room's daily token budget (20 tokens)" in quiet.message
        assert (await limits.check("@z:x", "!r:x", "ada")).allowed
    finally:
        await db.stop()


async def test_personas_answering_personas_cost_no_human_anything(db_url: str) -> None:
    """A human starts a chain; the personas' answers to each other are recorded as asked
    by the persona, so the human's rate and budget pay for the first answer only, and
    !stats lists the people apart from the personas."""
    from hivebridge.db.usage import users_like

    clock = Clock()
    db = await open_database(db_url)
    try:
        limits = limits_on(db, clock, requests_per_minute=2, user_tokens_per_day=100)
        record = dict(room_id="!r:x", model="m1", kind="reply")
        assert (await limits.check("@u:x", "!r:x", "a")).allowed  # the human asks a
        await limits.record(
            user="@u:x", persona="a", prompt_tokens=30, completion_tokens=10, **record
        )  # type: ignore[arg-type]
        for n in range(20):  # a and b answer each other: the asker is a persona
            asker, answerer = ("@hive_a:x", "b") if n % 2 == 0 else ("@hive_b:x", "a")
            assert (await limits.check(None, "!r:x", answerer)).allowed
            await limits.record(
                user=asker, persona=answerer, prompt_tokens=30, completion_tokens=10, **record
            )  # type: ignore[arg-type]
        assert (await limits.check("@u:x", "!r:x", "a")).allowed  # 1 of 2 requests, 40 tokens
        assert await UsageStore(db).tokens_on("2026-11-22", "user_id", "@u:x") == 40

        r = await UsageStore(db).report(
            "2026-11-22", bot_mxid="@hive_bot:x", ours=users_like("hive_", "x")
        )
        assert [(t.key, t.requests) for t in r.top_users] == [("@u:x", 1)]
        assert sorted((t.key, t.requests) for t in r.persona_askers) == [
            ("@hive_a:x", 10),
            ("@hive_b:x", 10),
        ]
        assert r.replies == 21
        # A user whose name only looks like ours (another server, or an escaped "_") is a person.
        await limits.record(
            user="@hive_x:y", persona="a", prompt_tokens=1, completion_tokens=0, **record
        )  # type: ignore[arg-type]
        await limits.record(
            user="@hiveZx:x", persona="a", prompt_tokens=1, completion_tokens=0, **record
        )  # type: ignore[arg-type]
        r = await UsageStore(db).report(
            "2026-11-22", bot_mxid="@hive_bot:x", ours=users_like("hive_", "x")
        )
        assert {t.key for t in r.top_users} == {"@u:x", "@hive_x:y", "@hiveZx:x"}
    finally:
        await db.stop()


def test_config_reads_limit_overrides(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    head = "homeserver: {address: 'http://h:8008', domain: x}\n"
    path.write_text(
        head + "limits:\n  overrides:\n"
        "    - {user: '@vip:x', requests_per_minute: 60, burst: 20, tokens_per_day: 0}\n"
        "    - {room: '!busy:x', requests_per_minute: 2}\n"
        "    - {persona: costly, tokens_per_day: 5000}\n"
    )
    overrides = load_config(path, env={}).limits.overrides
    assert [(o.scope, o.key) for o in overrides] == [
        ("user", "@vip:x"),
        ("room", "!busy:x"),
        ("persona", "costly"),
    ]
    for bad, key in (
        ("[{requests_per_minute: 1}]", "limits.overrides[0]"),
        ("[{user: '@a:x', room: '!r:x'}]", "limits.overrides[0]"),
        ("[{user: alice}]", "limits.overrides[0].user"),
        ("[{room: '#alias:x'}]", "limits.overrides[0].room"),
        ("[{persona: 'Bad Name'}]", "limits.overrides[0].persona"),
        ("[{user: '@a:x', burst: 0}]", "limits.overrides[0].burst"),
        ("[{user: '@a:x'}, {user: '@a:x'}]", "limits.overrides[1]"),
    ):
        path.write_text(head + f"limits: {{overrides: {bad}}}\n")
        with pytest.raises(ConfigError) as err:
            load_config(path, env={})
        assert err.value.key == key, (bad, str(err.value))
