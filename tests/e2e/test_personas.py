"""Personas through a real Synapse: spawn, despawn, dispatch, loop guard, room controls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from hivebridge.app import Bridge
from hivebridge.config import RoutingConfig
from hivebridge.devserver.client import HumanClient
from tests.e2e.conftest import Homeserver

Event = dict[str, Any]


def message_from(mxid: str, after: str | None = None) -> Callable[[Event], bool]:
    return lambda e: e.get("type") == "m.room.message" and e.get("sender") == mxid


def notices(client: HumanClient, room: str, sender: str) -> list[Event]:
    return [
        e
        for e in client.timeline.get(room, [])
        if e.get("sender") == sender and e.get("content", {}).get("msgtype") == "m.notice"
    ]


async def command(client: HumanClient, room: str, body: str, bot: str) -> str:
    """Send a command and return the bot's notice that answers it."""
    seen = len(notices(client, room, bot))
    await client.send_text(room, body)
    deadline = time.monotonic() + 30
    while len(notices(client, room, bot)) <= seen:
        assert time.monotonic() < deadline, f"no answer to {body!r}"
        await client.sync_once(500)
    return str(notices(client, room, bot)[seen]["content"]["body"])


async def bot_room(client: HumanClient, bridge: Bridge) -> str:
    room = await client.create_room([bridge.config.bot_mxid], name="management")
    await client.wait_for_members(room, {client.user_id, bridge.config.bot_mxid})
    return room


async def test_spawn_and_despawn(homeserver: Homeserver, bridge: Bridge) -> None:
    bot = bridge.config.bot_mxid
    async with homeserver.owner() as owner:
        room = await bot_room(owner, bridge)
        answer = await command(
            owner,
            room,
            '!persona spawn ada --display "Ada Lovelace" --prompt "You are Ada."',
            bot,
        )
        assert answer.startswith("Spawned Ada Lovelace"), answer
        ada = "@hive_ada:hive.test"
        # Registered on the homeserver, with its display name.
        profile = await owner.request("GET", f"/profile/{ada}")
        assert profile["displayname"] == "Ada Lovelace"
        # Stored, with a room of its own to which the caller was invited.
        stored = await bridge.parts.personas.store.get("ada")
        assert stored is not None and stored.system_prompt == "You are Ada."
        (own_room,) = await bridge.parts.personas.store.rooms_of("ada")
        invites = await owner.request("GET", "/sync", timeout="0")
        assert own_room in invites["rooms"].get("invite", {})

        # Spawn straight into an existing room, then despawn: it leaves, it is forgotten.
        answer = await command(owner, room, f"!persona spawn bob --room {room}", bot)
        assert answer.startswith("Spawned"), answer
        assert "@hive_bob:hive.test" in await owner.joined_members(room)
        assert "taken" in await command(owner, room, "!persona spawn bob", bot)
        answer = await command(owner, room, "!persona despawn bob", bot)
        assert answer.startswith("Despawned bob"), answer
        assert "@hive_bob:hive.test" not in await owner.joined_members(room)
        assert await bridge.parts.personas.store.get("bob") is None
        assert "No persona named" in await command(owner, room, "!persona show bob", bot)


async def test_plain_user_cannot_spawn(homeserver: Homeserver, bridge: Bridge) -> None:
    bot = bridge.config.bot_mxid
    async with await homeserver.human("pleb") as pleb:
        room = await bot_room(pleb, bridge)
        answer = await command(pleb, room, "!persona spawn eve", bot)
        assert "needs the trusted role" in answer
        assert await bridge.parts.personas.store.get("eve") is None
        assert "!persona" in await command(pleb, room, "!help", bot)
        assert "!trust" not in await command(pleb, room, "!help", bot)
        bad = await command(pleb, room, '!persona show "unclosed', bot)
        assert "quote" in bad.lower() and "Traceback" not in bad and "\n" not in bad


async def test_group_room_answers_only_when_addressed(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    persona = bridge.config.persona_mxid("assistant")
    bot = bridge.config.bot_mxid
    async with homeserver.owner() as owner:
        room = await owner.create_room([persona, bot], name="group")
        await owner.wait_for_members(room, {owner.user_id, persona, bot})
        from_persona = message_from(persona)

        await owner.send_text(room, "Nice weather today, everyone.")
        await owner.sync_once(1500)
        await owner.sync_once(1500)
        assert not [e for e in owner.timeline[room] if from_persona(e)], "answered unaddressed"

        async def answered_after(event_id: str) -> Event:
            return await owner.wait_for(
                room,
                lambda e: (
                    from_persona(e)
                    and e["content"]
                    .get("m.relates_to", {})
                    .get("m.in_reply_to", {})
                    .get("event_id")
                    == event_id
                ),
                timeout=60,
            )

        by_mention = await owner.send_text(
            room, "hey you", **{"m.mentions": {"user_ids": [persona]}}
        )
        reply = await answered_after(by_mention)
        by_name = await owner.send_text(room, "Assistant, how are you?")
        await answered_after(by_name)
        by_reply = await owner.send_text(
            room, "why?", **{"m.relates_to": {"m.in_reply_to": {"event_id": reply["event_id"]}}}
        )
        await answered_after(by_reply)

        # !stop silences the personas; !start brings them back.
        assert "silent" in await command(owner, room, "!stop", bot)
        stopped = await owner.send_text(room, "Assistant, are you there?")
        await owner.sync_once(1500)
        await owner.sync_once(1500)
        stored = await bridge.parts.messages.get(stopped)
        assert stored is not None  # still stored while stopped
        assert not [
            e
            for e in owner.timeline[room]
            if from_persona(e)
            and e["content"].get("m.relates_to", {}).get("m.in_reply_to", {}).get("event_id")
            == stopped
        ]
        assert "active" in await command(owner, room, "!start", bot)
        await answered_after(await owner.send_text(room, "Assistant, back?"))


async def test_two_personas_ping_pong_stops_and_resumes(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    # A long hop budget so that the pattern detector, not the bounce limit, stops them.
    bridge.parts.handler.messages.config = replace(
        bridge.config,
        routing=RoutingConfig(
            ping_pong_threshold=3, bounce_limit=50, max_persona_turns_per_minute=100
        ),
    )
    bridge.parts.handler.messages.loop_guard.threshold = 3
    bot = bridge.config.bot_mxid
    async with homeserver.owner() as owner:
        room = await bot_room(owner, bridge)
        for name in ("ping", "pong"):
            answer = await command(owner, room, f"!persona spawn {name} --room {room}", bot)
            assert answer.startswith("Spawned"), answer
        ping = bridge.parts.personas.get("@hive_ping:hive.test")
        pong = bridge.parts.personas.get("@hive_pong:hive.test")
        assert ping is not None and pong is not None

        async def kick_off() -> None:
            intent = bridge.parts.personas.intent(pong)  # type: ignore[union-attr]
            await intent.send_text(room, "Ping, tell me something.")  # type: ignore[arg-type]

        await kick_off()
        notice = await owner.wait_for(
            room,
            lambda e: e.get("sender") == bot and "Loop limit" in e["content"].get("body", ""),
            timeout=120,
        )
        persona_msgs = lambda: [  # noqa: E731  (new messages only: streaming edits don't count)
            e
            for e in owner.timeline[room]
            if e.get("sender") in (ping.mxid, pong.mxid)
            and e.get("type") == "m.room.message"
            and e["content"].get("m.relates_to", {}).get("rel_type") != "m.replace"
        ]
        count_at_notice = len(persona_msgs())
        assert count_at_notice >= 6  # kick-off + 3 full rounds of A→B
        await owner.sync_once(2000)
        await owner.sync_once(2000)
        assert len(persona_msgs()) <= count_at_notice + 1, "they kept talking"
        assert (
            len(
                [
                    e
                    for e in owner.timeline[room]
                    if "Loop limit" in e.get("content", {}).get("body", "")
                ]
            )
            == 1
        )
        assert notice["content"]["msgtype"] == "m.notice"

        # A human speaks: the chain resets and they may talk again.
        await owner.send_text(room, "OK you two, carry on.")
        before = len(persona_msgs())
        await kick_off()
        await owner.wait_for(room, lambda e: len(persona_msgs()) >= before + 2, timeout=60)


async def test_spawn_timing(homeserver: Homeserver, bridge: Bridge) -> None:
    """Spawn is a few appservice calls: no admin API, no password (timed for the notes)."""
    bot = bridge.config.bot_mxid
    durations = []
    async with homeserver.owner() as owner:
        room = await bot_room(owner, bridge)
        for i in range(10):
            started = time.monotonic()
            answer = await command(owner, room, f"!persona spawn t{i}x --room {room}", bot)
            durations.append(time.monotonic() - started)
            assert answer.startswith("Spawned"), answer
    print(f"spawn round trip (command to notice) median of 10: {statistics.median(durations):.3f}s")
