"""Encrypted rooms are never silent with encryption off, through a real Synapse.

With ``encryption.enabled: false`` personas cannot read ``m.room.encrypted``
events (tests/e2e/test_encryption.py has them on). A persona invited into a
room whose state has ``m.room.encryption`` says so as it joins (the bot too);
one addressed by an encrypted event (any in a direct chat, a reply to it in a
group) says so once per room, and again never, not even after a restart. The
human sends real ``m.room.encrypted`` events with made-up ciphertext: the
bridge cannot tell the difference, since it cannot decrypt either.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mautrix.types import Event

from hivebridge import metrics
from hivebridge.app import Bridge
from hivebridge.devserver.client import MEGOLM
from hivebridge.devserver.client import Event as RawEvent
from hivebridge.handler.encrypted import (
    BOT_TEXT,
    DIRECT_TEXT,
    GROUP_TEXT,
    NOTICE_KEY,
    EncryptedRoomNotices,
)
from tests.e2e.bridge_process import room_history
from tests.e2e.conftest import Homeserver

pytestmark = [pytest.mark.synapse, pytest.mark.model, pytest.mark.timeout(300)]


@pytest.fixture
async def bridge(homeserver: Homeserver, tmp_path: Path) -> AsyncIterator[Bridge]:
    """The bridge with encryption off (the dev stack turns it on)."""
    base = homeserver.config
    config = replace(
        base,
        data_dir=str(tmp_path / "bridge"),
        encryption=replace(base.encryption, enabled=False),
    )
    running = Bridge(config, homeserver.registration)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


def ciphertext(**relates: Any) -> dict[str, Any]:
    """What a client sends in an encrypted room: megolm ciphertext (made up here)."""
    content: dict[str, Any] = {
        **MEGOLM,
        "ciphertext": secrets.token_urlsafe(96),
        "sender_key": secrets.token_urlsafe(32),
        "session_id": secrets.token_urlsafe(32),
        "device_id": "HUMANDEVICE",
    }
    if relates:
        content["m.relates_to"] = relates
    return content


def notices(history: list[RawEvent], sender: str) -> list[str]:
    return [
        str(e["content"].get("body"))
        for e in history
        if e.get("sender") == sender
        and e.get("type") == "m.room.message"
        and e.get("content", {}).get("msgtype") == "m.notice"
    ]


def counted(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def is_notice(sender: str, text: str):  # type: ignore[no-untyped-def]
    return lambda e: e.get("sender") == sender and e.get("content", {}).get("body") == text


async def test_persona_invited_to_an_encrypted_room_says_so(
    bridge: Bridge, homeserver: Homeserver
) -> None:
    config = bridge.config
    persona, bot = config.persona_mxid(config.default_persona.name), config.bot_mxid
    joins = counted("hivebridge_encrypted_room_notices_total", trigger="join")
    unanswered = counted("hivebridge_encrypted_messages_unanswered_total")
    async with await homeserver.human("crypt") as human:
        dm = await human.create_room([persona], direct=True, encrypted=True)
        await human.wait_for(dm, is_notice(persona, DIRECT_TEXT), timeout=60)
        # It said so on joining; an encrypted message now is counted, not noticed again.
        await human.send(dm, ciphertext(), "m.room.encrypted")
        room = await human.create_room([bot], encrypted=True, name="encrypted commands")
        await human.wait_for(room, is_notice(bot, BOT_TEXT), timeout=60)
        await bridge.parts.handler.drain()
        assert notices(await room_history(human, dm), persona) == [DIRECT_TEXT]
    assert counted("hivebridge_encrypted_room_notices_total", trigger="join") == joins + 2
    assert counted("hivebridge_encrypted_messages_unanswered_total") == unanswered + 1


async def test_encrypted_message_gets_one_notice_per_room(
    bridge: Bridge, homeserver: Homeserver
) -> None:
    config = bridge.config
    name = config.default_persona.name
    persona = config.persona_mxid(name)
    sent = counted("hivebridge_encrypted_room_notices_total", trigger="message")
    async with await homeserver.human("crypt") as human:
        dm = await human.create_room([persona], direct=True)
        await human.wait_for_members(dm, {human.user_id, persona})
        await human.set_state(dm, "m.room.encryption", MEGOLM)  # the client turns it on
        first = await human.send(dm, ciphertext(), "m.room.encrypted")
        await human.wait_for(dm, is_notice(persona, DIRECT_TEXT), timeout=60)
        await human.send(dm, ciphertext(), "m.room.encrypted")
        await bridge.parts.handler.drain()

        # After a restart (nothing remembered in memory) it still does not repeat itself:
        # the homeserver keeps that it was said, as the persona's room account data.
        p = bridge.parts
        fresh = EncryptedRoomNotices(p.intake, p.personas, p.members, p.messages, p.replies.sender)
        raw = {
            "type": "m.room.encrypted",
            "room_id": dm,
            "event_id": first,
            "sender": human.user_id,
            "origin_server_ts": 1,
            "content": ciphertext(),
        }
        await fresh.on_encrypted(dm, Event.deserialize(raw))
        intent = p.personas.intent(p.personas.get(persona))  # type: ignore[arg-type]
        assert (await intent.get_account_data(NOTICE_KEY, dm))["event_id"]  # type: ignore[arg-type]
        history = await room_history(human, dm)
        assert notices(history, persona) == [DIRECT_TEXT]
        # The notice came as an answer to the first encrypted message, before the second.
        kinds = [e["type"] for e in history if e["type"] in ("m.room.encrypted", "m.room.message")]
        assert kinds == ["m.room.encrypted", "m.room.message", "m.room.encrypted"]
    assert counted("hivebridge_encrypted_room_notices_total", trigger="message") == sent + 1


async def test_in_a_group_only_a_message_addressed_to_the_persona_is_noticed(
    bridge: Bridge, homeserver: Homeserver
) -> None:
    config = bridge.config
    persona, bot = config.persona_mxid(config.default_persona.name), config.bot_mxid
    async with await homeserver.human("crypt") as human:
        room = await human.create_room([persona, bot], name="group")
        await human.wait_for_members(room, {human.user_id, persona, bot})
        asked = await human.send_text(
            room, "Assistant, hello!", **{"m.mentions": {"user_ids": [persona]}}
        )
        answer = await human.wait_for(
            room,
            lambda e: (
                e.get("sender") == persona
                and e.get("content", {})
                .get("m.relates_to", {})
                .get("m.in_reply_to", {})
                .get("event_id")
                == asked
            ),
            timeout=120,
        )
        await human.set_state(room, "m.room.encryption", MEGOLM)
        await human.send(room, ciphertext(), "m.room.encrypted")  # to nobody in particular
        await human.send(
            room,
            ciphertext(**{"m.in_reply_to": {"event_id": answer["event_id"]}}),
            "m.room.encrypted",
        )
        await human.wait_for(room, is_notice(persona, GROUP_TEXT), timeout=60)
        await bridge.parts.handler.drain()
        history = await room_history(human, room)
    assert notices(history, persona) == [GROUP_TEXT]
    assert notices(history, bot) == []
    encrypted = [e["event_id"] for e in history if e["type"] == "m.room.encrypted"]
    order = [e["event_id"] for e in history]
    notice = next(e["event_id"] for e in history if e.get("content", {}).get("body") == GROUP_TEXT)
    # Nothing was said after the first (unaddressed) one; the notice follows the reply.
    assert order.index(encrypted[0]) < order.index(encrypted[1]) < order.index(notice)
