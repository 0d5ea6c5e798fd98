"""Two personas answering each other, through Synapse, on the shipped routing settings.

The routing and limits sections come from ``config.example.yaml`` itself, so the
test holds what an operator gets. The chain starts as a persona's answer to a
human would (carrying the full bounce limit): on the old settings the bounce
limit ended it silently after 9 messages, before the pattern guard could speak.
Whichever brake stops the chain, the room hears exactly one notice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from mautrix.types import EventType

from hivebridge.app import Bridge
from hivebridge.config import Config, load_config
from hivebridge.devserver.client import HumanClient, is_edit
from hivebridge.matrix.content import BOUNCE_LIMIT_KEY
from tests.e2e.bridge_process import room_history
from tests.e2e.conftest import Homeserver

pytestmark = [pytest.mark.synapse, pytest.mark.model, pytest.mark.timeout(400)]

Event = dict[str, Any]
EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"


def shipped(config: Config, tmp_path: Path, **routing: Any) -> Config:
    """The session's config with the example file's routing and limits (then ``routing``)."""
    example = load_config(EXAMPLE)
    return replace(
        config,
        data_dir=str(tmp_path / "bridge"),
        routing=replace(example.routing, **routing),
        limits=example.limits,
    )


@pytest.fixture
async def started(homeserver: Homeserver, tmp_path: Path) -> AsyncIterator[list[Bridge]]:
    """Bridges a test starts on configs of its own; stopped at the end."""
    bridges: list[Bridge] = []
    try:
        yield bridges
    finally:
        for bridge in bridges:
            await bridge.stop()


def persona_messages(history: list[Event], senders: set[str]) -> list[Event]:
    """New persona messages (no edits, no notices) in timeline order."""
    return [
        e
        for e in history
        if e.get("type") == "m.room.message"
        and e.get("sender") in senders
        and not is_edit(e)
        and e.get("content", {}).get("msgtype") != "m.notice"
    ]


async def loop_until_stopped(
    homeserver: Homeserver, bridge: Bridge, owner: HumanClient
) -> tuple[list[Event], list[Event]]:
    """Spawn ping and pong, start a chain, wait for the bot's notice and for quiet.

    Returns the persona messages and the bot's loop notices, from the room history.
    """
    bot = bridge.config.bot_mxid
    room = await owner.create_room([bot], name="loop")
    await owner.wait_for_members(room, {owner.user_id, bot})
    for name in ("ping", "pong"):
        await owner.send_text(room, f"!persona spawn {name} --room {room}")
        await owner.wait_for(
            room,
            lambda e, n=name: e.get("sender") == bot and f"hive_{n}:" in _body(e),
            timeout=60,
        )
    ping = bridge.parts.personas.get(bridge.config.persona_mxid("ping"))
    pong = bridge.parts.personas.get(bridge.config.persona_mxid("pong"))
    assert ping is not None and pong is not None
    await owner.wait_for_members(room, {ping.mxid, pong.mxid})
    await owner.send_text(room, "You two, talk to each other.")
    # Pong's answer to that human message, as the bridge would send it: the full hop budget.
    intent = bridge.parts.personas.intent(pong)
    await intent.send_message_event(
        room,  # type: ignore[arg-type]
        EventType.ROOM_MESSAGE,
        {
            "msgtype": "m.text",
            "body": "Ping, tell me something.",
            BOUNCE_LIMIT_KEY: bridge.config.routing.bounce_limit,
        },
    )
    await owner.wait_for(
        room,
        lambda e: e.get("sender") == bot and "limit reached" in _body(e),
        timeout=120,
    )
    # Quiet: every message routed and every reply settled, twice over the homeserver.
    for _ in range(3):
        await bridge.parts.handler.drain()
        while await bridge.parts.jobs.pending(0):
            await owner.sync_once(500)
        await owner.sync_once(1000)
    history = await room_history(owner, room)
    said = persona_messages(history, {ping.mxid, pong.mxid})
    notices = [e for e in history if e.get("sender") == bot and "limit reached" in _body(e)]
    print(f"\n--- loop transcript ({len(said)} persona messages) ---")
    names = {ping.mxid: "ping", pong.mxid: "pong", bot: "bot"}
    for e in history:
        if e in said or e in notices:
            text = " ".join(_shown(history, e).split())
            print(f"<{names[e['sender']]}> {text[:100]}")
    return said, notices


async def test_default_config_stops_two_personas_with_one_notice(
    homeserver: Homeserver, started: list[Bridge], tmp_path: Path
) -> None:
    config = shipped(homeserver.config, tmp_path)
    assert config.routing.ping_pong_threshold == 5
    bridge = Bridge(config, homeserver.registration)
    started.append(bridge)
    await bridge.start()
    async with homeserver.owner() as owner:
        said, notices = await loop_until_stopped(homeserver, bridge, owner)
    assert len(notices) == 1, notices
    assert "same pattern" in _body(notices[0])
    assert notices[0]["content"]["msgtype"] == "m.notice"
    # Pong's opener and nine answers: A→B five times, then nobody answers the tenth.
    assert len(said) == 2 * config.routing.ping_pong_threshold
    senders = [e["sender"] for e in said]
    assert all(a != b for a, b in pairwise(senders))


@pytest.mark.parametrize(
    ("routing", "words"),
    [
        ({"bounce_limit": 3}, "routing.bounce_limit"),
        ({"max_persona_turns_per_minute": 3}, "routing.max_persona_turns_per_minute"),
    ],
    ids=["bounce_limit", "turn_cap"],
)
async def test_other_brakes_are_announced_once(
    homeserver: Homeserver,
    started: list[Bridge],
    tmp_path: Path,
    routing: dict[str, int],
    words: str,
) -> None:
    bridge = Bridge(shipped(homeserver.config, tmp_path, **routing), homeserver.registration)
    started.append(bridge)
    await bridge.start()
    async with homeserver.owner() as owner:
        said, notices = await loop_until_stopped(homeserver, bridge, owner)
    assert len(notices) == 1, notices
    assert words in _body(notices[0])
    assert len(said) == 4  # the opener and three answers


def _body(event: Event) -> str:
    return str(event.get("content", {}).get("body", ""))


def _shown(history: list[Event], event: Event) -> str:
    """The text a client shows: the last edit's new content, else the body."""
    text = _body(event)
    for e in history:
        relates = e.get("content", {}).get("m.relates_to", {})
        if relates.get("rel_type") == "m.replace" and relates.get("event_id") == event["event_id"]:
            text = str(e["content"].get("m.new_content", {}).get("body", text))
    return text
