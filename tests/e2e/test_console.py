"""The operator console against a running bridge, through a real Synapse.

``hivebridge personas|rooms|stats|backfill`` run as the operator runs them
(``python -m hivebridge -c config.yaml …``, a process of their own) against a
bridge started from the same config file, with its admin API on. Each verb's
answer is checked, and so is what it did on the homeserver; a mistake gets the
room command's own answer, and bad usage exits 2.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from hivebridge.app import Bridge
from hivebridge.config import load_config
from hivebridge.devserver.client import HumanClient
from hivebridge.devserver.process import free_port
from tests.e2e.bridge_process import ROOT, bridge_config_yaml, room_history
from tests.e2e.conftest import Homeserver

pytestmark = [pytest.mark.synapse, pytest.mark.model, pytest.mark.timeout(300)]

TOKEN = "console-" + secrets.token_hex(16)


@dataclass
class Console:
    bridge: Bridge
    config_path: Path

    async def __call__(self, *args: str, config: bool = True) -> tuple[int, str, str]:
        """``hivebridge [-c config.yaml] ARGS``: exit status, stdout, stderr."""
        argv = [sys.executable, "-m", "hivebridge"]
        argv += ["-c", str(self.config_path)] if config else []
        env = {k: v for k, v in os.environ.items() if k != "HIVEBRIDGE_ADMIN_TOKEN"}
        proc = await asyncio.create_subprocess_exec(
            *argv,
            *args,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def ok(self, *args: str) -> str:
        code, out, err = await self(*args)
        assert code == 0, (args, err)
        assert err == ""
        return out.rstrip("\n")

    async def fails(self, status: int, *args: str) -> str:
        """Stderr (one line, ``hivebridge: …``) of a call that exits ``status``."""
        code, out, err = await self(*args)
        assert code == status, (args, code, out, err)
        assert out == "" and "Traceback" not in err
        return err.rstrip("\n")


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        YAML().dump(data, fh)


@pytest.fixture
async def console(homeserver: Homeserver, tmp_path: Path) -> AsyncIterator[Console]:
    data = bridge_config_yaml(homeserver.config, "sqlite:hivebridge.db", tmp_path / "bridge")
    data["admin_api"] = {"token": TOKEN, "port": free_port()}
    path = tmp_path / "config.yaml"
    write_yaml(path, data)
    bridge = Bridge(load_config(path), homeserver.registration)
    await bridge.start()
    try:
        yield Console(bridge, path)
    finally:
        await bridge.stop()


async def bot_answer(human: HumanClient, room: str, bot: str, command: str) -> str:
    """The bot's answer to ``command`` sent in ``room``."""

    def bot_notice(e: dict[str, Any]) -> bool:
        return e.get("sender") == bot and e.get("content", {}).get("msgtype") == "m.notice"

    await human.sync_once(timeout_ms=0)
    before = {e["event_id"] for e in human.timeline.get(room, []) if bot_notice(e)}
    await human.send_text(room, command)
    event = await human.wait_for(
        room, lambda e: bot_notice(e) and e["event_id"] not in before, timeout=60
    )
    return str(event["content"]["body"])


async def test_personas_verbs(console: Console, homeserver: Homeserver) -> None:
    config = console.bridge.config
    bot = config.bot_mxid
    poet = config.persona_mxid("poet")
    listed = await console.ok("personas", "list")
    assert listed == "Personas:\nassistant — Assistant (@hive_assistant:hive.test), model default"
    shown = await console.ok("personas", "show", "Assistant")  # names are lowered, as in rooms
    assert shown.startswith(
        "Assistant (@hive_assistant:hive.test)\nmodel: default\nprofile: default\nprompt: "
    )

    owner = homeserver.owner()
    async with owner:
        room = await owner.create_room([bot], name="console")
        await owner.wait_for_members(room, {owner.user_id, bot})

        spawned = await console.ok(
            "personas", "spawn", "Poet", "--display", "Poet", "--room", room,
            "--prompt", "You are a poet.",
        )  # fmt: skip
        assert spawned.startswith(f"Spawned Poet ({poet}) in {room} in ")
        await owner.wait_for_members(room, {owner.user_id, bot, poet})
        details = json.loads(await console.ok("personas", "show", "poet", "--json"))
        assert details["system_prompt"] == "You are a poet."
        assert details["rooms"] == [room] and details["created_by"] == "admin_api"

        # The room commands' answers to the same mistakes, word for word.
        for args, command, status in [
            (("spawn", "poet"), "!persona spawn poet", 1),
            (("spawn", "Zoë"), "!persona spawn Zoë", 2),
            (("spawn", "x" * 33), f"!persona spawn {'x' * 33}", 2),
            (("show", "nobody"), "!persona show nobody", 1),
            (("despawn", "nobody"), "!persona despawn nobody", 1),
        ]:
            err = await console.fails(status, "personas", *args)
            assert err == f"hivebridge: {await bot_answer(owner, room, bot, command)}", args

        async with await homeserver.human("dm") as human:
            spawned = await console.ok("personas", "spawn", "pen", "--dm", human.user_id)
            assert "Spawned Pen (@hive_pen:hive.test) in !" in spawned
            lonely = await console.ok("personas", "spawn", "hermit")
            assert lonely.endswith("it is in no room yet: invite it to one.")

        assert await console.ok("personas", "despawn", "poet") == (
            "Despawned poet; it left 1 room(s)."
        )
        members = await owner.joined_members(room)
        assert poet not in members
        names = [
            p["name"]
            for p in json.loads(await console.ok("personas", "list", "--json"))["personas"]
        ]
        assert names == ["assistant", "hermit", "pen"]

    # Bad usage: exit 2 before anything reaches the bridge.
    for args in (("personas",), ("personas", "spawn"), ("personas", "fly"), ("backfill",)):
        code, _, err = await console(*args)
        assert code == 2 and "usage:" in err, args


async def test_rooms_stats_and_backfill(console: Console, homeserver: Homeserver) -> None:
    bridge = console.bridge
    config = bridge.config
    bot, persona = config.bot_mxid, config.persona_mxid(config.default_persona.name)
    async with await homeserver.human("ops") as human:
        # Said before the bridge's users were in the room: it never received these.
        room = await human.create_room([], name="earlier")
        early = [
            await human.send_text(room, f"message {i} before the bridge came") for i in range(3)
        ]
        await human.invite(room, bot)
        await human.invite(room, persona)
        await human.wait_for_members(room, {human.user_id, bot, persona})

        rooms = json.loads(await console.ok("rooms", "list", "--json"))["rooms"]
        mine = next(r for r in rooms if r["room_id"] == room)
        assert mine["name"] == "earlier" and mine["active"] is True
        assert mine["members"] == [human.user_id]
        assert mine["personas"] == ["assistant"] and mine["bot"] is True
        assert mine["encrypted"] is False and mine["messages"] == 0
        await bot_answer(human, room, bot, "!stop")
        text = await console.ok("rooms", "list")
        assert f"{room} “earlier” — stopped\n  members: {human.user_id}\n" in text
        assert "  personas: assistant (and the bot)\n" in text

        done = json.loads(await console.ok("backfill", room, "--json"))
        # read: the three, !stop and the bot's answer; those two were stored already
        assert (done["read"], done["stored"], done["complete"]) == (5, 3, True)
        again = await console.ok("backfill", room)
        assert again.startswith(f"Backfilled {room}: read ") and "; 0 were missing" in again
        for event_id in early:
            stored = await bridge.parts.messages.get(event_id)
            assert stored is not None and stored.handled  # history, never answered
        history = await room_history(human, room)
        assert not [
            e for e in history if e.get("sender") == persona and e["type"] == "m.room.message"
        ]

        assert (await console.fails(2, "backfill", room, "--limit", "0")).startswith(
            "hivebridge: limit must be between 1 and"
        )
        alone = await human.create_room([], name="nobody of ours")
        assert "Neither the bot nor a persona is in" in await console.fails(1, "backfill", alone)

    stats = await console.ok("stats")
    assert stats.startswith("Usage (total / today, UTC ")
    assert "\npersonas: 1; models: " in stats
    assert json.loads(await console.ok("stats", "--json"))["personas"] == 1

    # The address and token from flags instead of the config; a wrong token is refused.
    admin = f"http://127.0.0.1:{config.admin_api.port}"
    code, out, _ = await console("stats", "--url", admin, "--token", TOKEN, config=False)
    assert code == 0 and out.startswith("Usage")
    code, _, err = await console("stats", "--url", admin, "--token", "wrong", config=False)
    assert code == 1 and err == "hivebridge: the admin API refused the token (wrong token?)\n"
    assert TOKEN not in err
