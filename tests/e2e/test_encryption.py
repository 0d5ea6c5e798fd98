"""Personas in encrypted rooms, end to end: a real Synapse, the bridge with encryption
on, and a human whose app encrypts (mautrix's client crypto, its own device)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mautrix.types import TrustState

from hivebridge.app import Bridge
from hivebridge.devserver.client import is_edit
from hivebridge.matrix.content import ANSWERS_KEY
from tests.e2e.bridge_process import room_history
from tests.e2e.conftest import Homeserver

pytestmark = [pytest.mark.synapse, pytest.mark.model, pytest.mark.timeout(300)]


def _answer(sender: str, asked: str):  # type: ignore[no-untyped-def]
    return lambda e: (
        e.get("sender") == sender
        and e.get("type") == "m.room.message"
        and not is_edit(e)
        and e.get("content", {}).get(ANSWERS_KEY) == asked
    )


async def _plain_from(client: Any, room_id: str, sender: str) -> list[dict[str, Any]]:
    """What ``sender`` put into the room unencrypted, as the homeserver stores it."""
    history = await room_history(client, room_id)
    return [e for e in history if e.get("sender") == sender and e["type"] == "m.room.message"]


async def test_encrypted_dm_gets_an_encrypted_reply(homeserver: Homeserver, bridge: Bridge) -> None:
    config = bridge.config
    persona = config.persona_mxid(config.default_persona.name)
    async with await homeserver.encrypting_human("enc") as alice:
        room = await alice.create_room([persona], direct=True)
        await alice.wait_for_members(room, {alice.user_id, persona})
        asked = await alice.send_text(room, "Hello! Who are you?")
        reply = await alice.wait_for(room, _answer(persona, asked), timeout=120)
        assert reply["encrypted"], reply
        assert reply["content"]["body"].strip()
        # The bridge read the question: it is stored as a message, decrypted.
        stored = await bridge.parts.messages.get(asked)
        assert stored is not None and stored.body == "Hello! Who are you?"


async def test_encrypted_group_with_two_personas_and_the_bot(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    config, p = bridge.config, bridge.parts
    assistant, bot = config.persona_mxid(config.default_persona.name), config.bot_mxid
    async with await homeserver.encrypting_human("group") as alice:
        room = await alice.create_room([bot, assistant])
        await alice.wait_for_members(room, {alice.user_id, bot, assistant})
        poet, _ = await p.lifecycle.spawn(
            "poet",
            displayname="Poet",
            system_prompt="You are a poet. Answer in two short lines.",
            model=None,
            room_id=room,
            created_by=alice.user_id,
        )
        await alice.wait_for_members(room, {poet.mxid})
        # A command to the bot, encrypted: the bot reads it and answers encrypted.
        await alice.send_text(room, "!help")
        help_reply = await alice.wait_for(room, lambda e: e.get("sender") == bot, timeout=60)
        assert help_reply["encrypted"] and "persona" in help_reply["content"]["body"]
        # Each persona answers when mentioned, encrypted.
        for mxid, name in ((assistant, "Assistant"), (poet.mxid, "Poet")):
            asked = await alice.send_text(
                room,
                f"{name}, what do you like about the sea?",
                **{"m.mentions": {"user_ids": [mxid]}},
            )
            reply = await alice.wait_for(room, _answer(mxid, asked), timeout=120)
            assert reply["encrypted"], reply
        await p.handler.drain()
        # Nothing of ours went into the room in plain text.
        for ours in (assistant, poet.mxid, bot):
            assert await _plain_from(alice.plain, room, ours) == []


async def _devices(human: Any, user_id: str) -> list[str]:
    """The devices the homeserver lists for ``user_id`` (what every client sees)."""
    data = await human.plain.request("POST", "/keys/query", {"device_keys": {user_id: []}})
    return sorted(data["device_keys"].get(user_id, {}))


async def test_restart_keeps_the_devices_and_the_room_keys(
    homeserver: Homeserver, tmp_path: Path
) -> None:
    config = replace(homeserver.config, data_dir=str(tmp_path / "bridge"))
    persona = config.persona_mxid(config.default_persona.name)
    first = Bridge(config, homeserver.registration)
    await first.start()
    try:
        async with await homeserver.encrypting_human("restart") as alice:
            room = await alice.create_room([persona], direct=True)
            await alice.wait_for_members(room, {alice.user_id, persona})
            asked = await alice.send_text(room, "Before the restart: hello!")
            await alice.wait_for(room, _answer(persona, asked), timeout=120)
            await first.parts.handler.drain()
            devices = await _devices(alice, persona)
            # One device: a new one replaced those of earlier bridges (fresh databases).
            assert devices == [first.parts.encryption.device_id(persona)]  # type: ignore[union-attr]
            await first.stop()

            second = Bridge(config, homeserver.registration)
            await second.start()
            try:
                assert second.parts.encryption is not None
                assert second.parts.encryption.device_id(persona) == devices[0]
                # The same Megolm session as before: the room key came before the restart.
                asked = await alice.send_text(room, "After the restart: still there?")
                reply = await alice.wait_for(room, _answer(persona, asked), timeout=120)
                assert reply["encrypted"]
                assert await _devices(alice, persona) == devices  # no new device
                assert alice.undecrypted(room) == []  # everything it sent, we read
            finally:
                await second.stop()
    finally:
        await first.stop()


async def test_a_self_signed_persona_gets_keys_from_apps_that_want_cross_signing(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    """An app that shares room keys only with devices their owner cross-signed (TOFU)
    includes the persona's: the persona signed its device itself."""
    config = bridge.config
    persona = config.persona_mxid(config.default_persona.name)
    human = await homeserver.encrypting_human("tofu", min_trust=TrustState.CROSS_SIGNED_TOFU)
    async with human as alice:
        room = await alice.create_room([persona], direct=True)
        await alice.wait_for_members(room, {alice.user_id, persona})
        asked = await alice.send_text(room, "Do you have my key?")
        reply = await alice.wait_for(room, _answer(persona, asked), timeout=120)
        assert reply["encrypted"]


async def test_a_withheld_key_gets_a_visible_notice_never_plain_text(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    """An app that shares keys only with sessions its user verified withholds them from
    the persona (m.room_key.withheld, m.unverified): the persona says so, encrypted."""
    config = bridge.config
    persona = config.persona_mxid(config.default_persona.name)
    human = await homeserver.encrypting_human("strict", min_trust=TrustState.CROSS_SIGNED_TRUSTED)
    async with human as alice:
        room = await alice.create_room([persona], direct=True)
        await alice.wait_for_members(room, {alice.user_id, persona})
        asked = await alice.send_text(room, "You cannot read this.")
        notice = await alice.wait_for(
            room, lambda e: e.get("sender") == persona, timeout=config.encryption.key_wait_s + 60
        )
        assert notice["encrypted"]
        assert notice["content"]["msgtype"] == "m.notice"
        assert "couldn't read a message" in notice["content"]["body"]
        assert "not verified" in notice["content"]["body"]  # the withheld code, explained
        await bridge.parts.handler.drain()
        assert await bridge.parts.messages.get(asked) is None  # nothing was read
        assert await _plain_from(alice.plain, room, persona) == []


async def _waiting_ids(store: Any) -> list[str]:
    return [str(w.event.get("event_id")) for w in await store.all()]


async def _eventually(read: Any, ok: Any, what: str, timeout: float = 60.0) -> None:
    for _ in range(int(timeout * 10)):
        if ok(await read()):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(what)


async def test_a_message_waiting_for_its_key_is_not_forgotten_over_a_restart(
    homeserver: Homeserver, tmp_path: Path
) -> None:
    """A message whose key has not come when the bridge stops still gets its notice after
    the restart (it waited in the database), encrypted."""
    from tests.e2e.test_encrypted_rooms import ciphertext  # a session nobody was given

    base = replace(homeserver.config, data_dir=str(tmp_path / "bridge"))
    patient = replace(base, encryption=replace(base.encryption, key_wait_s=600))
    persona = base.persona_mxid(base.default_persona.name)
    first = Bridge(patient, homeserver.registration)
    await first.start()
    try:
        async with await homeserver.encrypting_human("wait") as alice:
            room = await alice.create_room([persona], direct=True)
            await alice.wait_for_members(room, {alice.user_id, persona})
            lost = await alice.plain.send(room, ciphertext(), "m.room.encrypted")
            unread = first.parts.intake.unread
            assert unread is not None
            await _eventually(
                lambda: _waiting_ids(unread), lambda ids: lost in ids, "the event to wait"
            )
            await first.stop()

            # Its time runs out while the bridge is down: at start it is said unreadable.
            hasty = replace(base, encryption=replace(base.encryption, key_wait_s=1))
            second = Bridge(hasty, homeserver.registration)
            await second.start()
            try:
                notice = await alice.wait_for(
                    room, lambda e: e.get("sender") == persona, timeout=60
                )
                assert notice["encrypted"]
                assert "couldn't read a message" in notice["content"]["body"]
                left = second.parts.intake.unread
                assert left is not None
                await _eventually(lambda: _waiting_ids(left), lambda ids: not ids, "no waiting")
            finally:
                await second.stop()
    finally:
        await first.stop()
