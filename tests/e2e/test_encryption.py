"""Personas in encrypted rooms, end to end: a real Synapse, the bridge with encryption
on, and a human whose app encrypts (mautrix's client crypto, its own device)."""

from __future__ import annotations

from typing import Any

from hivebridge.app import Bridge
from hivebridge.devserver.client import is_edit
from hivebridge.matrix.content import ANSWERS_KEY
from tests.e2e.bridge_process import room_history
from tests.e2e.conftest import Homeserver


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
