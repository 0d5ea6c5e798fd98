"""Endpoints, the model catalogue, !ask, !stats and rate limits through a real Synapse,
with a real ``llama_cpp.server`` as the remote endpoint and the bundled model as the
local fallback. Prints the failover time (endpoint stopped -> answer in the room).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from hivebridge.app import Bridge
from hivebridge.config import LimitsConfig
from hivebridge.inference.bundled import BUNDLED_MODEL_NAME
from tests.e2e.conftest import Homeserver
from tests.e2e.test_personas import bot_room, command, notices
from tests.support.llama_server import llama_server_missing, start_llama_server

KEY = "sk-e2e-NEVER-IN-A-ROOM-5e6f7a8b"
KEY_ENV = "HIVEBRIDGE_ENDPOINT_KEY_E2E"


@pytest.fixture
async def limited_bridge(homeserver: Homeserver, tmp_path: Path) -> AsyncIterator[Bridge]:
    """The bridge with a low request limit (2 a minute) for plain users."""
    config = replace(
        homeserver.config,
        data_dir=str(tmp_path / "bridge"),
        limits=LimitsConfig(requests_per_minute=2),
    )
    running = Bridge(config, homeserver.registration)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def test_endpoint_alias_ask_failover_stats_and_limits(
    homeserver: Homeserver, limited_bridge: Bridge
) -> None:
    missing = llama_server_missing()
    if missing:
        pytest.fail(missing) if os.environ.get("CI") == "true" else pytest.skip(missing)
    bridge = limited_bridge
    bot = bridge.config.bot_mxid
    persona = bridge.config.persona_mxid(bridge.config.default_persona.name)
    server = start_llama_server("smollm2", extra_args=["--api_key", KEY])
    os.environ[KEY_ENV] = KEY
    rooms: list[tuple[object, str]] = []
    try:
        async with homeserver.owner() as owner, await homeserver.human("pleb") as pleb:
            room = await bot_room(owner, bridge)
            plebs_room = await bot_room(pleb, bridge)
            rooms += [(owner, room), (pleb, plebs_room)]

            models = await command(owner, room, "!models", bot)
            assert f"1. {BUNDLED_MODEL_NAME} — local file" in models and "— loaded" in models

            refused = await command(pleb, plebs_room, f"!add_endpoint x {server.base_url}", bot)
            assert "needs the trusted role" in refused

            added = await command(
                owner, room, f"!add_endpoint remote1 {server.base_url} env:{KEY_ENV}", bot
            )
            assert "Endpoint remote1 added" in added and "models: remote1/smollm2" in added, added
            models = await command(owner, room, "!models", bot)
            match = re.search(
                r"^(\d+)\. remote1/smollm2 — endpoint remote1 — loaded$", models, re.M
            )
            assert match, models
            alias = await command(owner, room, f"!alias tiny {match.group(1)}", bot)
            assert alias.startswith("Alias tiny →"), alias

            answer = await command(owner, room, "!ask tiny Say hello. max_tokens=8", bot)
            assert answer.startswith("[remote1/smollm2] ") and "unavailable" not in answer, answer
            assert bridge.parts.inference.sticky_endpoint(f"{room}|ask") == "remote1"

            # A persona reply counts in !stats too.
            dm = await owner.create_room([persona], direct=True)
            await owner.wait_for_members(dm, {owner.user_id, persona})
            rooms.append((owner, dm))
            await owner.send_text(dm, "Hi!")
            await owner.wait_for(dm, lambda e: e.get("sender") == persona, timeout=60)
            await bridge.parts.handler.drain()  # the reply is finished (and counted)

            # The endpoint stops: the next !ask falls back to the local model and says so.
            server.stop()
            stopped = time.monotonic()
            answer = await command(owner, room, "!ask tiny Say hello. max_tokens=8", bot)
            failover_s = time.monotonic() - stopped
            print(f"\nfailover: endpoint stopped -> answer in the room in {failover_s:.2f}s")
            assert "(endpoint remote1 unavailable; answered by local fallback" in answer, answer
            assert answer.startswith("[remote1/smollm2] ")

            stats = await command(owner, room, "!stats", bot)
            assert "!ask answers: 2 / 2" in stats, stats
            assert "persona replies: 1 / 1" in stats, stats
            assert owner.user_id in stats and "remote1/smollm2 1 req" in stats, stats
            assert f"{BUNDLED_MODEL_NAME} 2 req" in stats, stats  # the reply and the fallback

            # A plain user over the limit (2 a minute): one notice, then silence.
            for _ in range(2):
                ok = await command(pleb, plebs_room, "!ask 1 Hi max_tokens=2", bot)
                assert ok.startswith(f"[{BUNDLED_MODEL_NAME}] "), ok
            over = await command(pleb, plebs_room, "!ask 1 Hi max_tokens=2", bot)
            assert "over the limit of 2 requests per minute; try again in" in over, over
            await pleb.send_text(plebs_room, "!ask 1 Hi max_tokens=2")
            after = await command(pleb, plebs_room, "!aliases", bot)
            assert after.startswith("Aliases:"), after  # nothing answered the 4th !ask
            limited = [
                n
                for n in notices(pleb, plebs_room, bot)
                if "over the limit" in n["content"]["body"]
            ]
            assert len(limited) == 1

            listing = await command(owner, room, "!endpoints", bot)
            assert "remote1 (added)" in listing and "key set" in listing, listing
            assert "7a8b" not in listing  # no part of the key

            # The key never appears in any room event.
            for client, room_id in rooms:
                await client.sync_once(200)  # type: ignore[attr-defined]
                timeline = client.timeline.get(room_id, [])  # type: ignore[attr-defined]
                assert timeline
                assert all(KEY not in json.dumps(e) for e in timeline)
    finally:
        os.environ.pop(KEY_ENV, None)
        server.stop()
