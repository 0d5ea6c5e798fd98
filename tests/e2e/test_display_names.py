"""Display names through Synapse: bidi overrides, invisible characters and the bot's
lookalikes are refused, by ``!persona spawn`` and by ``!persona set … display``."""

from __future__ import annotations

import pytest

from hivebridge.app import Bridge
from tests.e2e.conftest import Homeserver
from tests.e2e.test_personas import bot_room, command

pytestmark = [pytest.mark.synapse]


async def test_unsafe_display_names_are_refused(homeserver: Homeserver, bridge: Bridge) -> None:
    bot = bridge.config.bot_mxid
    async with homeserver.owner() as owner:
        room = await bot_room(owner, bridge)
        answer = await command(
            owner, room, '!persona spawn x --display "\u202eevil\u202c \u200b Name"', bot
        )
        assert "U+202E" in answer and "\u202e" not in answer, answer
        assert await bridge.parts.personas.store.get("x") is None
        answer = await command(owner, room, '!persona spawn x --display "H\u0456ve"', bot)
        assert "looks like the bot" in answer, answer
        assert await bridge.parts.personas.store.get("x") is None

        answer = await command(owner, room, '!persona spawn x --display "Ada"', bot)
        assert answer.startswith("Spawned Ada"), answer
        answer = await command(owner, room, "!persona set x display Ada\u200b\u202eecalevoL", bot)
        assert "U+200B" in answer, answer
        answer = await command(owner, room, "!persona set x display HIVE", bot)
        assert "looks like the bot" in answer, answer
        profile = await owner.request("GET", "/profile/@hive_x:hive.test")
        assert profile["displayname"] == "Ada"
        stored = await bridge.parts.personas.store.get("x")
        assert stored is not None and stored.displayname == "Ada"
        assert "Set display" in await command(owner, room, "!persona set x display Ada L.", bot)
