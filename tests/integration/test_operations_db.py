"""Transaction metrics and the admin provider on real SQLite and PostgreSQL.

The Synapse path is tests/e2e/test_operations.py; here the same code runs against
both databases, with the homeserver replaced by a small fake and two real local
models (the bundled one as "tiny", its Q8_0 copy as "other").
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mautrix.types import VersionsResponse

from hivebridge import metrics
from hivebridge.admin import BridgeAdmin
from hivebridge.catalogue import ModelCatalogue
from hivebridge.commands.personas import PersonaCommands
from hivebridge.config import Config, HomeserverConfig
from hivebridge.db import open_database
from hivebridge.db.catalogue import CatalogueStore
from hivebridge.db.messages import MessageStore
from hivebridge.db.personas import Persona, PersonaStore
from hivebridge.db.rooms import RoomStore
from hivebridge.db.usage import UsageRecord, UsageStore
from hivebridge.inference.bundled import bundled_model_path
from hivebridge.inference.local import EngineSettings, LocalModels, ModelSource
from hivebridge.inference.router import InferenceRouter
from hivebridge.matrix.members import RoomMembers
from hivebridge.personas.directory import PersonaDirectory
from hivebridge.personas.lifecycle import PersonaLifecycle
from hivebridge.utc import utc_day
from hivebridge.web import AdminError, AdminProvider, WebServer
from tests.integration.test_intake import HS_TOKEN, put, start_intake, stop_intake, txn_body

TOKEN = "admin-token-for-db-tests-0123456789"


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def outcomes() -> dict[str, float]:
    return {
        o: value("hivebridge_matrix_transactions_total", outcome=o)
        for o in ("new", "duplicate", "rejected")
    }


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_every_push_gets_one_outcome(db_url: str, http: aiohttp.ClientSession) -> None:
    before = outcomes()
    messages = value("hivebridge_matrix_events_total", type="m.room.message")
    running = await start_intake(db_url)
    try:
        assert await put(http, running.url("t1"), txn_body("$a"), None) == 401
        assert await put(http, running.url("t1"), txn_body("$a"), "wrong") == 403
        async with http.put(
            running.url("t1"), data=b"{", headers={"Authorization": f"Bearer {HS_TOKEN}"}
        ) as resp:
            assert resp.status == 400
        assert await put(http, running.url("t1"), txn_body("$a", "$b"), HS_TOKEN) == 200
        assert await put(http, running.url("t1"), txn_body("$a", "$b"), HS_TOKEN) == 200
    finally:
        await stop_intake(running)
    restarted = await start_intake(db_url)  # the duplicate is now known from the database
    try:
        assert await put(http, restarted.url("t1"), txn_body("$a", "$b"), HS_TOKEN) == 200
    finally:
        await stop_intake(restarted)
    after = outcomes()
    assert after["rejected"] - before["rejected"] == 3
    assert after["new"] - before["new"] == 1
    assert after["duplicate"] - before["duplicate"] == 2
    # Events are counted once, with the transaction that brought them.
    assert value("hivebridge_matrix_events_total", type="m.room.message") - messages == 2


class FakeIntent:
    def __init__(self) -> None:
        self.up = True

    async def versions(self, no_cache: bool = False) -> VersionsResponse:
        assert no_cache, "readiness must ask the homeserver, not a cache"
        if not self.up:
            raise ConnectionError("homeserver down")
        payload: Any = {"versions": ["v1.11"]}
        return VersionsResponse.deserialize(payload)


class Parts:
    def __init__(self, admin: BridgeAdmin, intent: FakeIntent, local: LocalModels) -> None:
        self.admin, self.intent, self.local = admin, intent, local


@pytest.fixture
async def parts(db_url: str, second_model: Path) -> AsyncIterator[Parts]:
    db = await open_database(db_url)
    bundled = bundled_model_path()
    assert bundled is not None
    local = LocalModels(
        lambda: [ModelSource("tiny", bundled, default=True), ModelSource("other", second_model)],
        EngineSettings(n_ctx=1024, n_seq_max=2, threads=1),
    )
    try:
        await local.rescan()
        await local.load("tiny")
        router = InferenceRouter(fallback=local.backend("tiny"), default_model="tiny")
        catalogue = ModelCatalogue(CatalogueStore(db), router, local)
        await catalogue.load()
        config = Config(homeserver=HomeserverConfig(address="http://127.0.0.1:9", domain="x.test"))
        store = PersonaStore(db)
        await store.insert(
            Persona(
                name="sage",
                mxid="@hive_sage:x.test",
                displayname="Sage",
                system_prompt="SECRET-PROMPT",
                model="tiny",
            )
        )
        personas = PersonaDirectory(config, store, None)  # type: ignore[arg-type]
        await personas.load()
        usage = UsageStore(db)
        now = time.time()
        await usage.record(
            UsageRecord(
                ts=int(now * 1000),
                day=utc_day(now),
                user_id="@alice:x.test",
                room_id="!r:x.test",
                persona="sage",
                model="tiny",
                kind="reply",
                prompt_tokens=40,
                completion_tokens=12,
            )
        )
        intent = FakeIntent()
        admin = BridgeAdmin(
            db=db,
            intent_of=lambda: intent,  # type: ignore[arg-type,return-value]
            catalogue=catalogue,
            personas=personas,
            usage=usage,
            commands=PersonaCommands(personas, PersonaLifecycle(personas)),
            rooms=RoomStore(db),
            messages=MessageStore(db),
            members=RoomMembers(None),  # type: ignore[arg-type]  # no rooms asked here
            load_local=local.load,
            unload_local=local.unload,
        )
        yield Parts(admin, intent, local)
    finally:
        await local.close()
        await db.stop()


async def test_provider_answers_from_the_database(parts: Parts) -> None:
    admin = parts.admin
    assert isinstance(admin, AdminProvider)
    assert await admin.check_database()
    assert await admin.check_homeserver()
    assert await admin.models_ready()
    personas = await admin.list_personas()
    assert [(p["name"], p["mxid"], p["model"]) for p in personas] == [
        ("sage", "@hive_sage:x.test", "tiny")
    ]
    assert "SECRET-PROMPT" not in repr(personas)
    stats = await admin.stats()
    assert stats["replies"] == {"total": 1, "today": 1}
    assert stats["tokens"] == {"total": 52, "today": 52}
    assert stats["by_persona"][0]["key"] == "sage"
    assert stats["models"] == {"known": 2, "loaded": 1}
    models = {m["name"]: m for m in await admin.list_models()}
    assert models["tiny"]["loaded"] and not models["other"]["loaded"]


async def test_load_and_unload_change_what_is_loaded(parts: Parts) -> None:
    admin = parts.admin
    with pytest.raises(AdminError) as e:
        await admin.load_model("nope")
    assert e.value.status == 404
    assert (await admin.load_model("tiny"))["loaded"] is True  # already loaded: nothing to do
    loaded = await admin.load_model("other")
    assert loaded["loaded"] and loaded["local"]["state"] == "loaded"
    assert loaded["local"]["quantization"] == "Q8_0" and loaded["local"]["offloaded_layers"] == 0
    unloaded = await admin.unload_model("tiny")
    assert unloaded["loaded"] is False and unloaded["local"]["state"] == "not loaded"
    assert set(parts.local.engines()) == {"other"}
    assert (await admin.unload_model("tiny"))["loaded"] is False  # not loaded: nothing to do


async def test_a_model_over_the_budget_is_refused_with_the_numbers(parts: Parts) -> None:
    parts.local.memory_budget = 1 << 20  # 1 MiB: nothing fits
    with pytest.raises(AdminError) as e:
        await parts.admin.load_model("other")
    assert e.value.status == 409 and "memory budget of 1 MiB" in e.value.message


async def test_readiness_over_http_follows_the_homeserver(parts: Parts) -> None:
    server = WebServer(parts.admin, port=0, token=TOKEN)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{server.port}"
            async with http.get(f"{url}/health/ready") as resp:
                assert resp.status == 200
            parts.intent.up = False
            async with http.get(f"{url}/health/ready") as resp:
                assert resp.status == 503
                body: dict[str, Any] = await resp.json()
            assert body["checks"] == {"database": True, "homeserver": False, "models": True}
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with http.post(f"{url}/api/v1/models/tiny/unload", headers=auth) as resp:
                assert resp.status == 200
                assert (await resp.json())["local"]["state"] == "not loaded"
            async with http.post(f"{url}/api/v1/models/tiny/load", headers=auth) as resp:
                assert resp.status == 200
                assert (await resp.json())["local"]["state"] == "loaded"
    finally:
        await server.stop()
