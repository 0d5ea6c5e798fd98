"""The "reply done … N edits" log line and ReplyDone.edits count the edits the room got.

Counted in the room's own history (m.replace events by the persona), for a
plain streamed reply and for a reply with a tool step (whose first message is
streamed and edited too).
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hivebridge.config import Config
from tests.e2e.bridge_process import room_history
from tests.e2e.conftest import Homeserver
from tests.e2e.test_tools import ask, command, open_dm, running, tool_config
from tests.support.fake_weather import fake_weather

pytestmark = [pytest.mark.synapse, pytest.mark.model]

Event = dict[str, Any]
DONE_RE = re.compile(r"reply done: \d+ tokens, ttft [\d.]+s, (\d+) edits")


def edits_in(history: list[Event], sender: str, since: int) -> int:
    return sum(
        1
        for e in history
        if e.get("sender") == sender
        and e.get("origin_server_ts", 0) >= since
        and e.get("content", {}).get("m.relates_to", {}).get("rel_type") == "m.replace"
    )


def streaming(config: Config) -> Config:
    """Edits every 0.1 s and longer replies: a reply gets several edits."""
    return replace(
        config,
        replies=replace(config.replies, edit_interval_s=0.1),
        inference=replace(config.inference, max_tokens=96),
    )


@pytest.mark.parametrize("with_tool", [False, True], ids=["plain", "tool_step"])
async def test_reply_done_counts_the_edits_the_room_got(
    homeserver: Homeserver, tmp_path: Path, caplog: pytest.LogCaptureFixture, with_tool: bool
) -> None:
    caplog.set_level(logging.INFO, logger="hivebridge.replies")
    async with (
        fake_weather() as weather,
        running(streaming(tool_config(homeserver, tmp_path, weather)), homeserver) as bridge,
    ):
        owner, room, persona = await open_dm(homeserver, bridge)
        name = bridge.config.default_persona.name
        try:
            if with_tool:
                await command(owner, room, persona, f"!persona set {name} tools get_weather")
                await command(owner, room, persona, f"!persona set {name} tool_choice get_weather")
            history = await room_history(owner, room)
            since = max(int(e.get("origin_server_ts", 0)) for e in history) + 1
            caplog.clear()
            done, _ = await ask(
                owner, room, persona, "Tell me a long story about the weather in London.", bridge
            )
            history = await room_history(owner, room)
        finally:
            await owner.close()
    assert done.error is None, done.error
    in_room = edits_in(history, persona, since)
    logged = [int(m.group(1)) for r in caplog.records if (m := DONE_RE.search(r.getMessage()))]
    print(f"\nedits in the room {in_room}, ReplyDone.edits {done.edits}, logged {logged}")
    assert in_room >= 1
    assert done.edits == in_room
    assert logged == [in_room]
