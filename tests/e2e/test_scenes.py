"""Scenes through a real Synapse and the bundled model: turns, humans stepping in, stop."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from hivebridge import metrics
from hivebridge.app import Bridge
from hivebridge.db.messages import StoredMessage
from hivebridge.db.personas import Persona
from hivebridge.devserver.client import HumanClient, is_edit, shown_text
from hivebridge.inference.types import ChatMessage
from tests.e2e.bridge_process import (
    BridgeProcess,
    bridge_config_yaml,
    dump,
    pg_fetch,
    room_history,
)
from tests.e2e.conftest import Homeserver
from tests.e2e.test_exactly_once import wait_until
from tests.e2e.test_personas import bot_room, command

Event = dict[str, Any]


async def cast(owner: HumanClient, bridge: Bridge, names: list[str]) -> tuple[str, list[str]]:
    """A room with the bot, the owner and a persona per name (display name capitalised)."""
    room = await bot_room(owner, bridge)
    bot = bridge.config.bot_mxid
    for name in names:
        answer = await command(
            owner, room, f"!persona spawn {name} --room {room} --display {name.title()}", bot
        )
        assert answer.startswith("Spawned"), answer
    mxids = [bridge.config.persona_mxid(n) for n in names]
    await owner.wait_for_members(room, {owner.user_id, bot, *mxids})
    return room, mxids


def persona_messages(owner: HumanClient, room: str, mxids: list[str]) -> list[Event]:
    """New messages of the personas (a streamed reply's edits are not new messages)."""
    return [
        e
        for e in owner.timeline.get(room, [])
        if e.get("sender") in mxids
        and e.get("type") == "m.room.message"
        and e["content"].get("msgtype") == "m.text"
        and not is_edit(e)
    ]


def capture_prompts(bridge: Bridge) -> list[tuple[str, list[ChatMessage]]]:
    """Every prompt a scene turn is built with: (persona name, messages)."""
    history = bridge.parts.history
    seen: list[tuple[str, list[ChatMessage]]] = []
    original = history.prompt_for

    async def prompt_for(persona: Persona, msg: StoredMessage, **kw: Any) -> Any:
        prompt, chapter = await original(persona, msg, **kw)
        if kw.get("scene") is not None:
            seen.append((persona.name, list(prompt.messages)))
        return prompt, chapter

    history.prompt_for = prompt_for  # type: ignore[method-assign]
    return seen


def scene_notice(bot: str, words: str) -> Any:
    return lambda e: e.get("sender") == bot and words in e.get("content", {}).get("body", "")


def index_of(owner: HumanClient, room: str, event_id: str) -> int:
    return next(i for i, e in enumerate(owner.timeline[room]) if e.get("event_id") == event_id)


async def test_three_personas_six_turns_in_order_then_a_notice(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    bot = bridge.config.bot_mxid
    started = metrics.SCENES_STARTED._value.get()
    prompts = capture_prompts(bridge)
    async with homeserver.owner() as owner:
        names = ["ada", "bob", "cy"]
        room, mxids = await cast(owner, bridge, names)
        began = time.monotonic()
        answer = await command(
            owner, room, '!scene start ada bob cy turns=6 --topic "a lighthouse in a storm"', bot
        )
        assert answer.startswith("🎬 Scene started: ada, bob, cy take 6 turns"), answer
        end = await owner.wait_for(room, scene_notice(bot, "Scene over"), timeout=300)
        took_s = time.monotonic() - began  # reported, never asserted
        assert end["content"]["msgtype"] == "m.notice"
        assert end["content"]["body"] == "🎬 Scene over: 6 of 6 turns (ada, bob, cy)."
        # Nothing more comes after the notice: the normal guards are back and nobody
        # answers a scene's message through routing.
        await owner.sync_once(2000)
        await owner.sync_once(2000)
        said = persona_messages(owner, room, mxids)
        assert [e["sender"] for e in said] == mxids * 2
        assert all(index_of(owner, room, e["event_id"]) < index_of(owner, room, end["event_id"])
                   for e in said)  # fmt: skip
        assert all(e["content"].get("io.github.hivebridge.scene") for e in said)
        status = await command(owner, room, "!scene status", bot)
        assert "6 of 6 turns; ended: its turns were spent" in status, status
        stats = await command(owner, room, "!stats", bot)
        assert "scene turns: 6 / 6" in stats, stats
        assert "scene turns per persona: ada 2 req" in stats, stats
        _write_transcript(owner, room, bot, said, end, took_s)
    # Each speaker saw the topic, its turn, and the conversation so far.
    assert [name for name, _ in prompts] == names * 2
    system, *rest = prompts[3][1]
    assert system.role == "system" and "a lighthouse in a storm" in system.content
    assert "lasts 6 turns" in system.content and "Bob, Cy" in system.content
    assert system.content == prompts[0][1][0].content  # the same for each of its turns
    seen = "\n".join(m.content for m in rest)
    for e in said[:3]:
        assert shown_text(owner.timeline[room], e["event_id"]) in seen
    assert metrics.SCENES_STARTED._value.get() == started + 1


async def test_a_human_mention_mid_scene_speaks_next_and_stop_ends_it(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    bot = bridge.config.bot_mxid
    async with homeserver.owner() as owner:
        names = ["dot", "eli", "fay"]
        room, mxids = await cast(owner, bridge, names)
        dot, eli, fay = mxids
        await command(owner, room, "!scene start dot eli fay turns=12", bot)
        await owner.wait_for(room, lambda e: e in persona_messages(owner, room, mxids), 120)
        asked = await owner.send_text(room, "Fay, what do you make of this?")
        answered = await owner.wait_for(
            room,
            lambda e: (
                e in persona_messages(owner, room, mxids)
                and e["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == asked
            ),
            timeout=120,
        )
        assert answered["sender"] == fay
        # Fay takes the next turn after the question; a turn already in flight when
        # it arrived finishes first (it was started before anyone asked).
        after = [
            e["sender"]
            for e in persona_messages(owner, room, mxids)
            if index_of(owner, room, e["event_id"]) > index_of(owner, room, asked)
        ]
        assert after[: after.index(fay) + 1] in ([fay], [eli, fay], [dot, fay]), after
        status = await command(owner, room, "!scene status", bot)
        assert status.startswith("Scene running: dot, eli, fay (round robin), turn "), status

        stop = await command(owner, room, "!scene stop", bot)
        assert stop.startswith(f"🎬 Scene stopped by {owner.user_id} after "), stop
        count = len(persona_messages(owner, room, mxids))
        turns = int(stop.split(" after ")[1].split(" of ")[0])
        assert count == turns < 12  # the turn in flight was finished, none started
        await owner.sync_once(2000)
        await owner.sync_once(2000)
        assert len(persona_messages(owner, room, mxids)) == count
        assert "ended: stopped by" in await command(owner, room, "!scene status", bot)
        assert "No scene is running" in await command(owner, room, "!scene stop", bot)


async def test_scene_refusals_are_one_line(homeserver: Homeserver, bridge: Bridge) -> None:
    bot = bridge.config.bot_mxid
    async with homeserver.owner() as owner:
        room, _ = await cast(owner, bridge, ["gus", "hal"])
        assert "2 to 6 personas" in await command(owner, room, "!scene start gus", bot)
        assert "not in this room" in await command(owner, room, "!scene start gus assistant", bot)
        too_many = await command(owner, room, "!scene start gus hal turns=21", bot)
        assert too_many == "turns must be between 1 and 20.", too_many
        assert "No persona named 'zed'" in await command(owner, room, "!scene start gus zed", bot)


def _write_transcript(
    owner: HumanClient, room: str, bot: str, said: list[Event], end: Event, took_s: float
) -> None:
    """The scene as a client shows it, for the notes (HB_SCENE_TRANSCRIPT=path)."""
    path = os.environ.get("HB_SCENE_TRANSCRIPT")
    if not path:
        return
    timeline = owner.timeline[room]
    lines: list[dict[str, Any]] = [
        {"sender": e["sender"], "text": shown_text(timeline, e["event_id"])} for e in said
    ]
    lines.append({"sender": bot, "text": end["content"]["body"]})
    lines.append(
        {
            "measure": "six-turn scene, !scene start to the end notice (max_tokens 24)",
            "seconds": round(took_s, 2),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
    )
    with open(path, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")


async def test_a_persona_whose_model_is_not_served_is_skipped_with_a_notice(
    homeserver: Homeserver, bridge: Bridge
) -> None:
    bot = bridge.config.bot_mxid
    async with homeserver.owner() as owner:
        room, (ian, kit, jo) = await cast(owner, bridge, ["ian", "kit", "jo"])
        await command(owner, room, "!persona set kit model ghost-model", bot)
        await command(owner, room, "!scene start ian kit jo turns=3", bot)
        await owner.wait_for(room, scene_notice(bot, "Scene over"), timeout=300)
        said = persona_messages(owner, room, [ian, kit, jo])
        assert [e["sender"] for e in said] == [ian, jo, ian]
        skips = [
            e["content"]["body"] for e in owner.timeline[room] if scene_notice(bot, "skips")(e)
        ]
        assert skips == ["⏭️ Kit skips this turn: its model ghost-model is not served now."]


async def test_kill_9_mid_turn_the_scene_carries_on_with_exactly_its_turns(
    homeserver: Homeserver, postgres_url: str, tmp_path: Path
) -> None:
    """The bridge as a process on PostgreSQL, killed by its PID while a scene turn is
    streaming: after the restart that turn is finished once and the rest follow."""
    config = homeserver.config
    bot = config.bot_mxid
    yaml = bridge_config_yaml(
        config, postgres_url, tmp_path / "data", max_tokens=48, edit_interval_s=0.1
    )
    process = BridgeProcess.write(tmp_path, yaml, homeserver.registration)
    try:
        await process.start()
        async with homeserver.owner() as owner:
            room = await owner.create_room([bot], name="scene crash")
            await owner.wait_for_members(room, {owner.user_id, bot})
            for name in ("lou", "max"):
                answer = await command(owner, room, f"!persona spawn {name} --room {room}", bot)
                assert answer.startswith("Spawned"), answer
            lou, mxx = config.persona_mxid("lou"), config.persona_mxid("max")
            await owner.wait_for_members(room, {owner.user_id, bot, lou, mxx})
            await command(owner, room, "!scene start lou max turns=4", bot)

            async def second_turn_streaming() -> bool:
                rows = await pg_fetch(
                    postgres_url,
                    "SELECT s.turns_taken FROM scenes s, reply_jobs j WHERE s.state='active' "
                    "AND j.state='pending' AND j.reply_event_id IS NOT NULL",
                )
                return any(r[0] >= 2 for r in rows)

            await wait_until(second_turn_streaming, 120, "no second turn was ever streaming")
            process.kill9()
            await process.start()
            end = await owner.wait_for(room, scene_notice(bot, "Scene over"), timeout=300)
            assert end["content"]["body"] == "🎬 Scene over: 4 of 4 turns (lou, max)."
            await asyncio.sleep(3)  # room for a would-be fifth message
            history = await room_history(owner, room)
            said = [
                e
                for e in history
                if e.get("sender") in (lou, mxx)
                and e.get("type") == "m.room.message"
                and e["content"].get("msgtype") == "m.text"
                and not is_edit(e)
            ]
            assert [e["sender"] for e in said] == [lou, mxx, lou, mxx], dump(said)
            assert all(e["content"].get("io.github.hivebridge.scene") for e in said)
            assert all(shown_text(history, e["event_id"]).strip() for e in said)
    finally:
        process.stop()
