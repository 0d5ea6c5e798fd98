"""Affinity hints reach the endpoint where its router reads them, one test per kind.

A fake OpenAI endpoint (aiohttp on 127.0.0.1) records each request's headers
and body; the bridge's router sends two rooms' requests through it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from hivebridge.inference.affinity import Affinity, session_id, slot_of
from hivebridge.inference.endpoints import RouterConfig
from hivebridge.inference.router import InferenceRouter
from hivebridge.inference.types import ChatMessage, SamplingParams, collect
from tests.support.fake_openai import FakeOpenAI, Received

SALT = b"0123456789abcdef-test-salt"
ROOM_A = "!roomA:example.org|@hive_mira:example.org"
ROOM_B = "!roomB:example.org|@hive_mira:example.org"
MSGS = [ChatMessage("user", "hi")]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(slots=6)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _send(fake: FakeOpenAI, affinity: Affinity | None) -> list[Received]:
    router = InferenceRouter(config=RouterConfig(session_salt=SALT))
    try:
        await router.add_endpoint("gpu1", fake.base_url, affinity=affinity)
        for session in (ROOM_A, ROOM_B, ROOM_A):
            gen = router.generate(
                MSGS, SamplingParams(max_tokens=4), session=session, model="gpu1/m"
            )
            assert await collect(gen) == "hello"
    finally:
        await router.aclose()
    assert len(fake.requests) == 3
    return fake.requests


def _leaks(received: Received) -> bool:
    text = repr(received.headers) + repr(received.body)
    return "room" in text or "example.org" in text or "mira" in text


async def test_default_is_the_x_session_id_header(fake: FakeOpenAI) -> None:
    a1, b, a2 = await _send(fake, None)
    ids = [r.headers.get("x-session-id") for r in (a1, b, a2)]
    assert ids[0] == session_id(SALT, ROOM_A) and ids[1] == session_id(SALT, ROOM_B)
    assert ids[0] == ids[2] != ids[1]  # stable per room and persona, different per room
    assert "user" not in a1.body and "id_slot" not in a1.body
    assert not any(_leaks(r) for r in (a1, b, a2))


async def test_a_named_header(fake: FakeOpenAI) -> None:
    a1, b, a2 = await _send(fake, Affinity(kind="header", header="x-session-token"))
    assert a1.headers["x-session-token"] == a2.headers["x-session-token"]
    assert a1.headers["x-session-token"] != b.headers["x-session-token"]
    assert "x-session-id" not in {k.lower() for k in a1.headers}
    assert not any(_leaks(r) for r in (a1, b, a2))


async def test_the_user_field(fake: FakeOpenAI) -> None:
    a1, b, a2 = await _send(fake, Affinity(kind="user"))
    assert a1.body["user"] == a2.body["user"] == session_id(SALT, ROOM_A)
    assert b.body["user"] == session_id(SALT, ROOM_B)
    assert "x-session-id" not in {k.lower() for k in a1.headers}
    assert not any(_leaks(r) for r in (a1, b, a2))


async def test_llama_server_id_slot_read_from_props(fake: FakeOpenAI) -> None:
    a1, b, a2 = await _send(fake, Affinity(kind="id_slot"))
    assert a1.body["id_slot"] == a2.body["id_slot"] == slot_of(session_id(SALT, ROOM_A), 6)
    assert b.body["id_slot"] == slot_of(session_id(SALT, ROOM_B), 6)
    assert 0 <= b.body["id_slot"] < 6
    assert a1.body["cache_prompt"] is True
    assert not any(_leaks(r) for r in (a1, b, a2))


async def test_id_slot_with_configured_slots(fake: FakeOpenAI) -> None:
    a1, _b, _a2 = await _send(fake, Affinity(kind="id_slot", slots=2))
    assert a1.body["id_slot"] == slot_of(session_id(SALT, ROOM_A), 2)


async def test_none_sends_no_hint(fake: FakeOpenAI) -> None:
    a1, _b, _a2 = await _send(fake, Affinity(kind="none"))
    assert "x-session-id" not in {k.lower() for k in a1.headers}
    assert "user" not in a1.body and "id_slot" not in a1.body


async def test_another_salt_gives_other_ids(fake: FakeOpenAI) -> None:
    assert session_id(SALT, ROOM_A) != session_id(b"another-salt-0123456", ROOM_A)
    assert len(session_id(SALT, ROOM_A)) == 32
