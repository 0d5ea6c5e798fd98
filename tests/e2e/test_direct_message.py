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
    await bridge.parts.handler.drain()
    messages = bridge.parts.messages
    stored_question = await messages.get(sent)
    stored_reply = await messages.get(reply["event_id"])
    assert stored_question is not None and stored_question.handled
    assert stored_reply is not None and stored_reply.persona == config.default_persona.name
    rows = await messages.recent(room, 0, 100)
    assert [m.event_id for m in rows if "m.relates_to" not in m.content] == [
        sent,
        reply["event_id"],
    ]


async def test_streamed_reply_is_one_event_plus_capped_edits(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    from dataclasses import replace

    from hivebridge.config import RepliesConfig

    replies = bridge.parts.replies
    replies.config = replace(
        replies.config,
        replies=RepliesConfig(edit_interval_s=0.1, max_edits=2),
        inference=replace(replies.config.inference, max_tokens=96),
    )
    persona = bridge.config.persona_mxid(bridge.config.default_persona.name)
    async with await homeserver.human("streamer") as human:
        room = await human.create_room([persona], direct=True)
        await human.wait_for_members(room, {human.user_id, persona})
        await human.send_text(room, "Tell me a long story about a dragon and a knight.")
        first = await human.wait_for(room, from_user(persona), timeout=120)
        await bridge.parts.handler.drain()
        stored = await bridge.parts.messages.get(first["event_id"])
        assert stored is not None
        if stored.body != first["content"]["body"]:  # it was edited: the last edit is whole
            await human.wait_for(
                room,
                lambda e: e["content"].get("m.new_content", {}).get("body") == stored.body,
                timeout=30,
            )
        await human.sync_once(500)
        ours = [e for e in human.timeline[room] if from_user(persona)(e)]
        edits = [
            e for e in ours if e["content"].get("m.relates_to", {}).get("rel_type") == "m.replace"
        ]
        originals = [e for e in ours if e not in edits]
        assert [e["event_id"] for e in originals] == [first["event_id"]]
        assert all(e["content"]["m.relates_to"]["event_id"] == first["event_id"] for e in edits)
        assert len(edits) <= 2 + 1  # the cap, plus the final edit
        final = edits[-1]["content"]["m.new_content"]["body"] if edits else first["content"]["body"]
        assert final == stored.body


async def test_invite_from_outside_the_allowlist_is_refused(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    from dataclasses import replace

    from hivebridge.config import PermissionsConfig

    # Only @nobody may invite now (as a config reload would say); alice's invite is rejected.
    config = replace(
        bridge.config, permissions=PermissionsConfig(invite_allowlist=("@nobody:hive.test",))
    )
    await bridge.parts.handler.membership.apply_config(config)
    persona = config.persona_mxid(config.default_persona.name)
    async with await homeserver.human("mallory") as mallory:
        room = await mallory.create_room([persona], direct=True)
        leave = await mallory.wait_for(
            room,
            lambda e: (
                e.get("type") == "m.room.member"
                and e.get("state_key") == persona
                and e["content"].get("membership") == "leave"
            ),
            timeout=30,
        )
        assert leave["sender"] == persona
        assert persona not in await mallory.joined_members(room)
