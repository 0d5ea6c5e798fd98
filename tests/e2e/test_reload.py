"""Config reload without a restart, through a real Synapse.

The bridge runs from a config file. The owner edits it and sends
``!reload_config``: a new rate limit is in force at once (a human's second
quick message gets the limit notice), a changed port is named and keeps its
running value; a broken file is refused with one line naming the key and the
limit in force stays. The real process does the same on SIGHUP.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from hivebridge.app import Bridge
from hivebridge.config import load_config
from hivebridge.devserver.client import Event, HumanClient
from tests.e2e.bridge_process import BridgeProcess, bridge_config_yaml
from tests.e2e.conftest import Homeserver

pytestmark = [pytest.mark.synapse, pytest.mark.model, pytest.mark.timeout(300)]


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        YAML().dump(data, fh)


def notice_from(sender: str, text: str):  # type: ignore[no-untyped-def]
    def match(e: Event) -> bool:
        content = e.get("content", {})
        return (
            e.get("sender") == sender
            and content.get("msgtype") == "m.notice"
            and text in str(content.get("body", ""))
        )

    return match


async def command(owner: HumanClient, room: str, bot: str, expect: str) -> str:
    """Send ``!reload_config`` and return the bot's answer (which must contain ``expect``)."""
    await owner.send_text(room, "!reload_config")
    answer = await owner.wait_for(room, notice_from(bot, expect), timeout=60)
    return str(answer["content"]["body"])


async def test_reload_config_applies_a_rate_limit_and_refuses_a_broken_file(
    homeserver: Homeserver, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    data = bridge_config_yaml(homeserver.config, "sqlite:hivebridge.db", tmp_path / "bridge")
    write_yaml(path, data)
    bridge = Bridge(load_config(path), homeserver.registration)
    await bridge.start()
    try:
        config = bridge.config
        bot, persona = config.bot_mxid, config.persona_mxid(config.default_persona.name)
        assert bridge.parts.limits.config.requests_per_minute == 0  # off, as the tests run
        owner = homeserver.owner()
        async with owner, await homeserver.human("limited") as human:
            room = await owner.create_room([bot], name="ops")
            await owner.wait_for_members(room, {owner.user_id, bot})
            dm = await human.create_room([persona], direct=True)
            await human.wait_for_members(dm, {human.user_id, persona})

            data["limits"] = {"requests_per_minute": 1}
            data["appservice"]["port"] = int(data["appservice"]["port"]) + 1
            write_yaml(path, data)
            line = await command(owner, room, bot, "Config reloaded")
            assert line == (
                f"Config reloaded from {path}: changed limits.requests_per_minute. "
                "Only a restart applies appservice.port (kept as running)."
            )
            assert bridge.config.limits.requests_per_minute == 1
            assert bridge.config.appservice.port == config.appservice.port  # still listening

            # The new limit, in force: one request a minute, the second is refused once.
            await human.send_text(dm, "Hello, how are you?")
            await human.send_text(dm, "And another question right away?")
            refused = await human.wait_for(
                dm, notice_from(persona, "over the limit of 1 requests per minute"), timeout=120
            )
            assert refused["content"]["body"].startswith(f"{human.user_id}: you are over")

            data["limits"] = {"requests_per_minute": -5}
            data["routing"]["max_persona_turns_per_minute"] = 3
            write_yaml(path, data)
            line = await command(owner, room, bot, "Config not reloaded")
            assert line == (
                "Config not reloaded: config: limits.requests_per_minute: must be 0 (off) "
                "or more. The running config stays in force."
            )
            # Refused as a whole: the good part of the broken file is not applied either.
            assert bridge.config.limits.requests_per_minute == 1
            assert bridge.parts.limits.config.requests_per_minute == 1
            assert bridge.config.routing.max_persona_turns_per_minute == 1000

            # Owners only.
            await owner.invite(room, human.user_id)
            await human.join(room)
            await human.send_text(room, "!reload_config")
            await human.wait_for(
                room, notice_from(bot, "!reload_config needs the owner role"), timeout=60
            )
    finally:
        await bridge.stop()


async def test_sighup_reloads_the_running_process(homeserver: Homeserver, tmp_path: Path) -> None:
    data = bridge_config_yaml(homeserver.config, "sqlite:hivebridge.db", tmp_path / "bridge")
    proc = BridgeProcess.write(tmp_path, data, homeserver.registration)
    await proc.start()
    try:
        data["limits"] = {"requests_per_minute": 3}
        write_yaml(proc.config_path, data)
        os.kill(proc.pid, signal.SIGHUP)
        await wait_for_log(proc, "Config reloaded from")
        assert "changed limits.requests_per_minute." in proc.log_tail(5)

        data["limits"] = {"requests_per_minute": "plenty"}
        write_yaml(proc.config_path, data)
        os.kill(proc.pid, signal.SIGHUP)
        await wait_for_log(proc, "Config not reloaded")
        assert (
            "Config not reloaded: config: limits.requests_per_minute: must be a number. "
            "The running config stays in force." in proc.log_tail(5)
        )
        assert proc.proc.running()
    finally:
        assert proc.stop() == 0, proc.log_tail()
    assert "Traceback" not in proc.log_path.read_text()


async def wait_for_log(proc: BridgeProcess, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.log_path.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{proc.log_tail()}"
        assert proc.proc.running(), proc.log_tail()
        await asyncio.sleep(0.1)
