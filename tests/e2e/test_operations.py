"""Operations on a real bridge through a real Synapse: metrics, the admin API, secrets.

One DM exchange with the default persona (the bundled model answers), then what
an operator sees: ``/metrics`` moved for every family an exchange touches, the
admin API answers only the right token and counts the exchange, readiness is
green, and no token of the bridge ever shows in a log line or a room event.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hivebridge import metrics
from hivebridge.app import Bridge
from hivebridge.config import AdminApiConfig, MetricsConfig
from hivebridge.devserver.process import free_port
from hivebridge.registration import load_tokens
from tests.e2e.conftest import Homeserver

pytestmark = [pytest.mark.synapse, pytest.mark.model]

ADMIN_TOKEN = "adm-" + secrets.token_hex(24)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Collect(logging.Handler):
    """Every log record of the process, as the formatted line and with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + " " + repr(record.__dict__))


@pytest.fixture
def all_logs() -> Iterator[Collect]:
    """DEBUG from every logger, from before the bridge starts until after it stops."""
    handler = Collect()
    root = logging.getLogger()
    old_level = root.level
    # Loggers that setup_logging() or libraries quiet down: open them all up.
    quieted = {
        name: lg.level
        for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger) and lg.level > logging.DEBUG
    }
    for name in quieted:
        logging.getLogger(name).setLevel(logging.DEBUG)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for name, level in quieted.items():
            logging.getLogger(name).setLevel(level)


@dataclass
class Ops:
    bridge: Bridge
    metrics_url: str
    admin_url: str


@pytest.fixture
async def ops(homeserver: Homeserver, tmp_path: Path, all_logs: Collect) -> AsyncIterator[Ops]:
    """The bridge with an admin token: metrics/readiness and the admin API on two ports."""
    metrics_port, admin_port = free_port(), free_port()
    config = replace(
        homeserver.config,
        data_dir=str(tmp_path / "bridge"),
        metrics=MetricsConfig(port=metrics_port),
        admin_api=AdminApiConfig(token=ADMIN_TOKEN, port=admin_port),
    )
    running = Bridge(config, homeserver.registration)
    await running.start()
    try:
        yield Ops(running, f"http://127.0.0.1:{metrics_port}", f"http://127.0.0.1:{admin_port}")
    finally:
        await running.stop()


def from_user(mxid: str):  # type: ignore[no-untyped-def]
    return lambda e: e.get("sender") == mxid and e.get("type") == "m.room.message"


async def scrape(http: aiohttp.ClientSession, url: str) -> tuple[Samples, set[str]]:
    """Samples (name, sorted labels) -> value, and the family names, from ``GET /metrics``."""
    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples: Samples = {}
    families: set[str] = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, families


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


async def dm_exchange(homeserver: Homeserver, bridge: Bridge, text: str) -> tuple[str, list[dict]]:
    """A human DMs the default persona and gets its answer; returns the room and its events."""
    persona = bridge.config.persona_mxid(bridge.config.default_persona.name)
    async with await homeserver.human("ops") as human:
        room = await human.create_room([persona], direct=True)
        await human.wait_for_members(room, {human.user_id, persona})
        await human.send_text(room, text)
        reply = await human.wait_for(room, from_user(persona), timeout=120)
        assert reply["content"]["body"].strip()
        assert not reply["content"]["body"].startswith("⚠️")
        await bridge.parts.handler.drain()
        await human.sync_once(500)
        # The whole room as the homeserver keeps it, state included.
        path = f"/rooms/{quote(room)}/messages"
        data = await human.request("GET", path, dir="f", limit="1000")
        events = list(data["chunk"]) + list(human.timeline.get(room, []))
    return room, events


async def test_metrics_move_with_a_real_exchange(homeserver: Homeserver, ops: Ops) -> None:
    persona = ops.bridge.config.default_persona.name
    async with aiohttp.ClientSession() as http:
        before, _ = await scrape(http, ops.metrics_url)
        await dm_exchange(homeserver, ops.bridge, "Hello! Say something short.")
        after, families = await scrape(http, ops.metrics_url)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    # Every documented family is exported (a family with no series yet is still listed).
    for family in (
        "hivebridge_matrix_transactions",
        "hivebridge_matrix_events",
        "hivebridge_matrix_replies_sent",
        "hivebridge_routing_decisions",
        "hivebridge_inference_time_to_first_token_seconds",
        "hivebridge_inference_completion_tokens",
        "hivebridge_inference_queue_wait_seconds",
        "hivebridge_inference_queue_depth",
        "hivebridge_inference_active_sequences",
        "hivebridge_model_loaded",
    ):
        assert family in families, family
    assert grew("hivebridge_matrix_transactions_total", outcome="new") >= 1
    assert grew("hivebridge_matrix_transactions_total", outcome="rejected") == 0
    assert grew("hivebridge_matrix_events_total", type="m.room.message") >= 2  # question, reply
    assert grew("hivebridge_matrix_events_total", type="m.room.member") >= 2
    assert grew("hivebridge_matrix_replies_sent_total", persona=persona) == 1
    assert grew("hivebridge_routing_decisions_total", answer="yes", reason="direct_room") == 1
    assert grew("hivebridge_inference_time_to_first_token_seconds_count") == 1
    assert grew("hivebridge_inference_time_to_first_token_seconds_sum") > 0
    assert grew("hivebridge_inference_generation_seconds_count") == 1
    assert grew("hivebridge_inference_completion_tokens_total") >= 1
    assert grew("hivebridge_matrix_send_errors_total") == 0
    # The local engine's queue: the reply's wait observed once, the gauges fed per model
    # (read from the engine at the scrape; it is idle again now).
    assert grew("hivebridge_inference_queue_wait_seconds_count") == 1
    for model in ops.bridge.parts.models.engines():
        label = (("model", metrics.model_label(model)),)
        assert after[("hivebridge_inference_queue_depth", label)] == 0
        assert after[("hivebridge_inference_active_sequences", label)] == 0
    # The local model is loaded, with its size and load time.
    assert total(after, "hivebridge_model_loaded") >= 1
    assert total(after, "hivebridge_model_memory_bytes") > 1_000_000
    assert total(after, "hivebridge_model_load_seconds_count") >= 1


async def test_admin_api_on_a_real_bridge(homeserver: Homeserver, ops: Ops) -> None:
    bridge = ops.bridge
    persona = bridge.config.default_persona.name
    await dm_exchange(homeserver, bridge, "Hi there, who are you?")
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": "x"}):
            async with http.get(f"{ops.admin_url}/api/v1/personas", headers=headers) as resp:
                assert resp.status == 401
                assert ADMIN_TOKEN not in await resp.text()
        async with http.get(f"{ops.admin_url}/api/v1/personas", headers=auth) as resp:
            assert resp.status == 200
            personas = (await resp.json())["personas"]
        mine = [p for p in personas if p["name"] == persona]
        assert len(mine) == 1
        assert mine[0]["mxid"] == bridge.config.persona_mxid(persona)
        assert "system_prompt" not in mine[0]

        async with http.get(f"{ops.admin_url}/api/v1/stats", headers=auth) as resp:
            assert resp.status == 200
            stats = await resp.json()
        assert stats["replies"]["total"] == 1 and stats["replies"]["today"] == 1
        # ">= 1": usage's message count also takes in the persona's edit echoes.
        assert stats["messages"]["total"] >= 1
        assert stats["tokens"]["total"] > 0
        assert [t["key"] for t in stats["by_persona"]] == [persona]
        assert stats["personas"] >= 1

        async with http.get(f"{ops.admin_url}/api/v1/models", headers=auth) as resp:
            assert resp.status == 200
            models = (await resp.json())["models"]
        local = [m for m in models if m["local_file"]]
        assert local and all(m["loaded"] for m in local)
        name = local[0]["name"]
        # Unload frees the local model; load brings it back (the models manager does it).
        async with http.post(f"{ops.admin_url}/api/v1/models/{name}/unload", headers=auth) as resp:
            assert resp.status == 200
            assert (await resp.json())["loaded"] is False
        async with http.post(f"{ops.admin_url}/api/v1/models/{name}/load", headers=auth) as resp:
            assert resp.status == 200
            assert (await resp.json())["loaded"] is True
        async with http.post(f"{ops.admin_url}/api/v1/models/nope/load", headers=auth) as resp:
            assert resp.status == 404

        # Readiness on both listeners; the admin routes only on the admin one.
        for base in (ops.metrics_url, ops.admin_url):
            async with http.get(f"{base}/health/ready") as resp:
                assert resp.status == 200, base
                assert await resp.json() == {
                    "status": "ok",
                    "checks": {"database": True, "homeserver": True, "models": True},
                }
        async with http.get(f"{ops.metrics_url}/api/v1/personas", headers=auth) as resp:
            assert resp.status == 404
        async with http.get(f"{ops.admin_url}/metrics") as resp:
            assert resp.status == 404


class BrokenDatabase:
    async def fetchval(self, *args: Any) -> Any:
        raise ConnectionError("database is gone")


async def test_readiness_fails_when_the_database_fails(ops: Ops) -> None:
    admin = ops.bridge.parts.admin
    assert admin is not None
    admin.db = BrokenDatabase()  # type: ignore[assignment]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{ops.metrics_url}/health/ready") as resp:
            assert resp.status == 503
            body = await resp.json()
        async with http.get(f"{ops.metrics_url}/health/live") as resp:
            assert resp.status == 200
    assert body == {
        "status": "unavailable",
        "checks": {"database": False, "homeserver": True, "models": True},
    }


async def test_no_token_in_logs_or_rooms(
    homeserver: Homeserver, ops: Ops, all_logs: Collect
) -> None:
    bridge = ops.bridge
    as_token, hs_token = load_tokens(bridge.config, homeserver.registration)
    secrets_ = {"as_token": as_token, "hs_token": hs_token, "admin token": ADMIN_TOKEN}
    assert all(len(s) >= 16 for s in secrets_.values())
    async with aiohttp.ClientSession() as http:
        # Refused and accepted admin calls, and a refused transaction push, all logged freely.
        for token in ("wrong-" + ADMIN_TOKEN[::-1], ADMIN_TOKEN):
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(f"{ops.admin_url}/api/v1/stats", headers=headers):
                pass
        push = f"{bridge.config.appservice.address}/_matrix/app/v1/transactions/ops-probe"
        async with http.put(push, json={"events": []}, headers={"Authorization": "Bearer x"}) as r:
            assert r.status == 403
    events = (await dm_exchange(homeserver, bridge, "Tell me one fun fact."))[1]
    assert events, "the room should have events"
    assert len(all_logs.lines) > 20, "the bridge should have logged at DEBUG"
    dumped = json.dumps(events)
    for what, secret in secrets_.items():
        leaked = [line[:200] for line in all_logs.lines if secret in line]
        assert not leaked, f"{what} in the log: {leaked[:3]}"
        assert secret not in dumped, f"{what} in a room event"
