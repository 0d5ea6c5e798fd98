"""Bad input at the appservice endpoint: arbitrary events never crash intake.

Property-based: events with missing or wrong-typed fields, bogus relations,
arbitrary unicode and 64 KB bodies all get a 200 (or a clean 400 for a body
that is not a transaction), and every well-formed message among them is
stored exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.test_intake import HS_TOKEN, start_intake, stop_intake

json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
relation = st.one_of(
    json_value,
    st.fixed_dictionaries(
        {},
        optional={
            "rel_type": st.sampled_from(["m.replace", "m.thread", "m.annotation", 5, None]),
            "event_id": st.one_of(st.text(max_size=10), st.integers()),
            "m.in_reply_to": st.one_of(json_value, st.fixed_dictionaries({"event_id": json_value})),
        },
    ),
)
content = st.fixed_dictionaries(
    {},
    optional={
        "msgtype": st.one_of(st.sampled_from(["m.text", "m.notice", "m.emote"]), json_value),
        "body": st.one_of(st.text(), st.just("x" * 65536), json_value),
        "formatted_body": st.one_of(st.text(), json_value),
        "m.mentions": st.one_of(json_value, st.fixed_dictionaries({"user_ids": json_value})),
        "m.relates_to": relation,
        "io.github.m13253.bounce_limit": json_value,
    },
)
event = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(st.sampled_from(["m.room.message", "m.room.member"]), json_value),
        "event_id": st.one_of(st.text(min_size=1, max_size=12), json_value),
        "room_id": st.one_of(st.just("!fuzz:hive.test"), json_value),
        "sender": st.one_of(st.just("@eve:hive.test"), json_value),
        "origin_server_ts": json_value,
        "state_key": json_value,
        "content": st.one_of(content, json_value),
        "unsigned": json_value,
    },
)

_txn = itertools.count()


def well_formed_messages(events: list[Any]) -> set[str]:
    from hivebridge.matrix.content import stored_from_event

    return {
        row.event_id
        for e in events
        if isinstance(e, dict) and (row := stored_from_event(e)) is not None
    }


def test_arbitrary_events_never_crash_intake(sqlite_url: str) -> None:
    """A sync test driving its own loop, so hypothesis can call into the server."""
    loop = asyncio.new_event_loop()
    running = loop.run_until_complete(start_intake(sqlite_url))
    http = loop.run_until_complete(_session())
    stored: set[str] = set()

    async def push(events: list[Any]) -> int:
        async with http.put(running.url(f"fuzz{next(_txn)}"), json={"events": events}) as resp:
            return resp.status

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.one_of(event, json_value), max_size=5))
    def check(events: list[Any]) -> None:
        assert loop.run_until_complete(push(events)) == 200
        stored.update(well_formed_messages(events))

    try:
        check()
        loop.run_until_complete(running.intake.messages.db.fetchval("SELECT 1"))
        count = loop.run_until_complete(running.intake.messages.count())
        assert count == len(stored)
    finally:
        loop.run_until_complete(http.close())
        loop.run_until_complete(stop_intake(running))
        loop.close()


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {HS_TOKEN}"})
