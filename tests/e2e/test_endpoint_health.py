"""Endpoint health, through Synapse: ``!endpoints``, the admin API and the metrics agree.

A real OpenAI-compatible server (the fake one, over HTTP) answers ``!ask``; it is
stopped, and the next ``!ask`` fails over to the local model. From that moment
the endpoint is down everywhere an operator looks (passive health: the failed
request says so, no waiting for more failures); started again, a probe brings
it back, and every view says so again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hivebridge.app import Bridge
from hivebridge.config import AdminApiConfig, EndpointConfig, MetricsConfig
from hivebridge.devserver.client import HumanClient
from hivebridge.devserver.process import free_port
from tests.e2e.conftest import Homeserver
from tests.e2e.test_operations import ADMIN_TOKEN, scrape, total
from tests.e2e.test_personas import bot_room, command
from tests.support.fake_openai import FakeOpenAI
from tests.support.waiting import until

pytestmark = [pytest.mark.synapse, pytest.mark.model]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(model="m", answer="from gpu1")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def views(
    owner: HumanClient, room: str, bot: str, http: aiohttp.ClientSession, admin: str, metrics: str
) -> tuple[str, dict[str, Any], float]:
    """gpu1 as !endpoints, the admin API and /metrics show it, one right after another."""
    line = next(
        ln for ln in (await command(owner, room, "!endpoints", bot)).splitlines() if "gpu1" in ln
    )
    api = await endpoint_json(http, admin)
    samples, _ = await scrape(http, metrics)
    return line, api, total(samples, "hivebridge_endpoint_up", endpoint="gpu1")


async def endpoint_json(http: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.get(f"{admin}/api/v1/endpoints", headers=headers) as resp:
        assert resp.status == 200
        (api,) = (e for e in (await resp.json())["endpoints"] if e["name"] == "gpu1")
    return dict(api)


async def test_a_failed_request_marks_the_endpoint_down_and_a_probe_brings_it_back(
    homeserver: Homeserver, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    metrics_port, admin_port = free_port(), free_port()
    config = replace(
        homeserver.config,
        data_dir=str(tmp_path / "bridge"),
        metrics=MetricsConfig(port=metrics_port),
        admin_api=AdminApiConfig(token=ADMIN_TOKEN, port=admin_port),
        endpoints=(EndpointConfig("gpu1", upstream.base_url),),
    )
    bridge = Bridge(config, homeserver.registration)
    await bridge.start()
    admin, metrics = f"http://127.0.0.1:{admin_port}", f"http://127.0.0.1:{metrics_port}"
    bot = config.bot_mxid
    try:
        async with homeserver.owner() as owner, aiohttp.ClientSession() as http:
            room = await bot_room(owner, bridge)
            # Its models are discovered in the background after the start.
            plan = bridge.parts.inference.plan
            await until(lambda: bool(plan("gpu1/m")), "gpu1's models discovered")
            assert "from gpu1" in await command(owner, room, "!ask gpu1/m hello", bot)
            line, api, up = await views(owner, room, bot, http, admin, metrics)
            assert "healthy" in line and api["status"] == "up" and up == 1, (line, api, up)

            await upstream.stop()
            answer = await command(owner, room, "!ask gpu1/m hello", bot)
            assert "endpoint gpu1 unavailable" in answer, answer
            line, api, up = await views(owner, room, bot, http, admin, metrics)
            print(f"\nafter the failover: {line}\n{api}\nhivebridge_endpoint_up {up}")
            assert "healthy" not in line and "down" in line, line
            assert api["status"] == "down" and not api["healthy"] and api["last_error"], api
            assert up == 0

            await upstream.start()  # the same port: the server is back
            deadline = time.monotonic() + 60
            while api["status"] != "up":
                assert time.monotonic() < deadline, f"no probe brought it back: {api}"
                await asyncio.sleep(0.2)
                api = await endpoint_json(http, admin)
            line, api, up = await views(owner, room, bot, http, admin, metrics)
            assert "healthy" in line and api["status"] == "up" and up == 1, (line, api, up)
            assert "from gpu1" in await command(owner, room, "!ask gpu1/m hello", bot)
    finally:
        await bridge.stop()
