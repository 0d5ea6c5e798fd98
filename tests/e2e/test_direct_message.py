"""A human DMs the default persona through a real Synapse; the real model answers."""

from __future__ import annotations

from hivebridge.app import Bridge
from tests.e2e.conftest import Homeserver


def from_user(mxid: str):  # type: ignore[no-untyped-def]
    return lambda e: e.get("sender") == mxid and e.get("type") == "m.room.message"


async def test_persona_answers_a_dm_from_the_model(homeserver: Homeserver, bridge: Bridge) -> None:
    config = bridge.config
    persona = config.persona_mxid(config.default_persona.name)
    async with await homeserver.human("alice") as alice:
        room = await alice.create_room([persona], direct=True)
        await alice.wait_for_members(room, {alice.user_id, persona})
        sent = await alice.send_text(room, "Hello, what is your name?")
        reply = await alice.wait_for(room, from_user(persona), timeout=120)
        assert reply["content"]["msgtype"] == "m.text"
        assert reply["content"]["body"].strip()
        assert not reply["content"]["body"].startswith("⚠️")
        assert reply["origin_server_ts"] >= 0

    # Both sides of the exchange are stored, once each.
    assert bridge.appservice is not None
    messages = bridge.appservice.messages
    stored_question = await messages.get(sent)
    stored_reply = await messages.get(reply["event_id"])
    assert stored_question is not None and stored_question.handled
    assert stored_reply is not None and stored_reply.persona == config.default_persona.name
    assert await messages.count(room) == 2


async def test_invite_from_outside_the_allowlist_is_refused(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    from dataclasses import replace

    from hivebridge.config import PermissionsConfig

    # Only @nobody may invite now; alice's invite must be rejected.
    bridge.config = replace(
        bridge.config, permissions=PermissionsConfig(invite_allowlist=("@nobody:hive.test",))
    )
    assert bridge.router is not None
    bridge.router.config = bridge.config
    persona = bridge.config.persona_mxid(bridge.config.default_persona.name)
    async with await homeserver.human("mallory") as mallory:
        room = await mallory.create_room([persona], direct=True)
        leave = await mallory.wait_for(
            room,
            lambda e: e.get("type") == "m.room.member"
            and e.get("state_key") == persona
            and e["content"].get("membership") == "leave",
            timeout=30,
        )
        assert leave["sender"] == persona
        assert persona not in await mallory.joined_members(room)
