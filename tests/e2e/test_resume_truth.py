"""A restart resumes only real work: the bot's notices are stored handled.

A command's answer (an ``m.notice`` by the bot) triggers nobody; stored as
unhandled it was counted and routed again by every start ("resuming N
unfinished messages"). After a clean exchange nothing is left to resume and a
restart says nothing about resuming.
"""

from __future__ import annotations

import logging

import pytest

from hivebridge.app import Bridge
from tests.e2e.conftest import Homeserver

pytestmark = [pytest.mark.synapse, pytest.mark.model]


async def test_notices_are_stored_handled_and_a_restart_resumes_nothing(
    homeserver: Homeserver, bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    bot = bridge.config.bot_mxid
    persona = bridge.config.persona_mxid("assistant")
    async with homeserver.owner() as owner:
        room = await owner.create_room([bot, persona], name="notices")
        await owner.wait_for_members(room, {owner.user_id, bot, persona})
        await owner.send_text(room, "!help")
        notice = await owner.wait_for(
            room,
            lambda e: e.get("sender") == bot and e["content"].get("msgtype") == "m.notice",
        )
        asked = await owner.send_text(room, "Assistant, hello?")
        await owner.wait_for(
            room,
            lambda e: (
                e.get("sender") == persona
                and e["content"].get("m.relates_to", {}).get("m.in_reply_to", {}).get("event_id")
                == asked
            ),
            timeout=60,
        )
        while await bridge.parts.jobs.pending(0):
            await owner.sync_once(300)
        await owner.sync_once(1000)  # the reply's echo comes back and is routed
        await bridge.parts.handler.drain()

    stored = await bridge.parts.messages.get(notice["event_id"])
    assert stored is not None and stored.handled, stored
    assert await bridge.unfinished() == []

    await bridge.stop()
    again = Bridge(bridge.config, bridge.registration_path)
    caplog.set_level(logging.INFO, logger="hivebridge")
    try:
        await again.start()
    finally:
        await again.stop()
    assert not [r for r in caplog.records if "resuming" in r.getMessage()]
