"""Model catalogue, endpoints and the model commands on a real database and a real
``llama_cpp.server`` (no mocked HTTP); the local fallback is the real bundled model.

Commands run through the real :class:`CommandTable` and parser; only the room is
replaced by a list of replies (the Synapse path is tests/e2e/test_models_commands.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from hivebridge.catalogue import ModelCatalogue
from hivebridge.commands.base import CommandContext, CommandTable
from hivebridge.commands.models import ModelCommands, failover_note, safe_url
from hivebridge.commands.stats import StatsCommands
from hivebridge.config import (
    Config,
    HomeserverConfig,
    InferenceConfig,
    LimitsConfig,
    SecurityConfig,
)
from hivebridge.db import open_database
from hivebridge.db.catalogue import CatalogueStore
from hivebridge.db.endpoints import EndpointStore, StoredEndpoint
from hivebridge.db.usage import RateLimitStore, UsageStore
from hivebridge.inference.bundled import BUNDLED_MODEL_NAME, bundled_model_path
from hivebridge.inference.endpoints import RetryPolicy, RouterConfig
from hivebridge.inference.local import EngineSettings, LocalModels, ModelSource
from hivebridge.inference.remote import EndpointTimeouts
from hivebridge.inference.router import InferenceRouter
from hivebridge.permissions import Role
from hivebridge.personas.limits import Limits
from hivebridge.security import EndpointPolicy
from tests.support.llama_server import LlamaServer, llama_server_missing, start_llama_server

pytestmark = pytest.mark.model

KEY = "sk-catalogue-SECRET-91b2c3d4"
KEY_ENV = "HIVEBRIDGE_ENDPOINT_KEY_CATALOGUE"
ALIAS = "smollm2"
#: The model as endpoint gpu1 serves it.
REMOTE = f"gpu1/{ALIAS}"
OWNER = "@boss:x"
FAST = RouterConfig(
    retry=RetryPolicy(max_attempts=2, backoff_s=0.05),
    timeouts=EndpointTimeouts(connect_s=2.0, read_s=20.0, discovery_s=5.0),
    refresh_interval_s=0,
)

_missing = llama_server_missing()
if _missing and os.environ.get("CI") == "true":
    pytest.fail(f"CI=true but the real server cannot run: {_missing}", pytrace=False)
if _missing:
    pytest.skip(_missing, allow_module_level=True)


@pytest.fixture(scope="module")
def server() -> Iterator[LlamaServer]:
    srv = start_llama_server(ALIAS, extra_args=["--api_key", KEY])
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def model_path() -> Path:
    path = bundled_model_path()
    assert path is not None
    return path


@pytest.fixture
async def local(model_path: Path) -> AsyncIterator[LocalModels]:
    models = LocalModels(
        lambda: [ModelSource(BUNDLED_MODEL_NAME, model_path, default=True)],
        EngineSettings(n_ctx=2048, n_seq_max=2, threads=1, adaptive_threads=False),
    )
    await models.rescan()
    await models.load(BUNDLED_MODEL_NAME)
    yield models
    await models.close()


def config(**limits: object) -> Config:
    return Config(
        homeserver=HomeserverConfig("http://127.0.0.1:1", "x"),
        inference=InferenceConfig(max_tokens=8, max_tokens_limit=64, temperature=0.0),
        limits=replace(LimitsConfig(requests_per_minute=0), **limits),  # type: ignore[arg-type]
        # The test's servers listen on 127.0.0.1: the operator allows that host.
        security=SecurityConfig(private_endpoint_hosts=("127.0.0.1",)),
    )


@dataclass
class Room:
    """Collects the bot's replies; stands in for a Matrix room."""

    replies: list[str] = field(default_factory=list)

    async def reply(self, text: str) -> None:
        self.replies.append(text)


@dataclass
class Harness:
    table: CommandTable
    catalogue: ModelCatalogue
    router: InferenceRouter
    room: Room

    async def run(self, body: str, sender: str = OWNER, role: Role = "owner") -> str:
        before = len(self.room.replies)
        ctx = CommandContext("!room:x", sender, role, "$ev", self.room.reply)
        assert await self.table.run(ctx, body)
        new = self.room.replies[before:]
        return new[0] if new else ""


async def harness(
    db_url: str, local: LocalModels, model_path: Path, cfg: Config
) -> tuple[Harness, object]:
    db = await open_database(db_url)
    router = InferenceRouter(fallback=local.backend(BUNDLED_MODEL_NAME), config=FAST)
    stored = EndpointStore(db)
    catalogue = ModelCatalogue(CatalogueStore(db), router, local)
    usage = UsageStore(db)
    limits = Limits(
        cfg.limits, usage, RateLimitStore(db), lambda m: "owner" if m == OWNER else "user"
    )
    table = CommandTable()
    policy = EndpointPolicy(cfg.security, ["as-token-of-the-bridge", "hs-token-of-the-bridge"])
    commands = ModelCommands(cfg, catalogue, router, stored, limits, local.count_tokens, policy)
    commands.register(table)
    await commands.start_endpoints()
    await router.refresh()
    await catalogue.load()
    StatsCommands(usage, "@bot:x").register(table)
    return Harness(table, catalogue, router, Room()), db


async def test_ids_and_aliases_survive_restart(db_url: str) -> None:
    db = await open_database(db_url)
    try:
        store = CatalogueStore(db)
        a = await store.ensure_model("alpha")
        b = await store.ensure_model("beta")
        assert a != b and await store.ensure_model("alpha") == a
        await store.set_alias("fast", b, "@u:x")
        await store.set_alias("fast", a, "@u:x")  # re-pointed, not duplicated
    finally:
        await db.stop()
    db = await open_database(db_url)
    try:
        store = CatalogueStore(db)
        assert [(m.id, m.name) for m in await store.models()] == [(a, "alpha"), (b, "beta")]
        assert [(x.alias, x.model_id) for x in await store.aliases()] == [("fast", a)]
        assert await store.remove_alias("fast") and not await store.remove_alias("fast")
        ep = StoredEndpoint("gpu1", "http://h/v1", "env:GPU1_KEY", "@u:x")
        await EndpointStore(db).put(ep)
        assert "GPU1_KEY" not in repr(ep)  # the key (or its reference) stays out of logs
        (got,) = await EndpointStore(db).all()
        assert (got.name, got.url, got.api_key) == ("gpu1", "http://h/v1", "env:GPU1_KEY")
    finally:
        await db.stop()


async def test_commands_against_real_endpoint(
    sqlite_url: str,
    server: LlamaServer,
    local: LocalModels,
    model_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    h, db = await harness(sqlite_url, local, model_path, config())
    try:
        models = await h.run("!models")
        assert f"1. {BUNDLED_MODEL_NAME} — local file {model_path.name} (" in models
        assert "MiB, Q4_1, 8,192-token context) — loaded, 0 of 31 layers on a GPU" in models

        # Plain users may not add endpoints; a bad URL gets a usage line, not a traceback.
        refused = await h.run(f"!add_endpoint gpu1 {server.base_url} {KEY}", "@u:x", "user")
        assert "needs the trusted role" in refused and KEY not in refused
        assert "URL must be" in await h.run("!add_endpoint gpu1 ftp://nope")

        os.environ[KEY_ENV] = KEY
        added = await h.run(f"!add_endpoint gpu1 {server.base_url} env:{KEY_ENV}")
        assert f"models: {REMOTE}" in added and KEY not in added, added
        assert "c3d4" not in added and f"key from {KEY_ENV}" in added  # no part of the key
        listing = await h.run("!endpoints")
        assert "gpu1 (added)" in listing and "healthy" in listing and KEY not in listing
        assert "key set" in listing and "c3d4" not in listing
        models = await h.run("!models")
        assert f"2. {REMOTE} — endpoint gpu1 — loaded" in models, models

        assert f"Alias fast → 2. {REMOTE}" in await h.run("!alias fast 2")
        assert "No model" in await h.run("!alias slow 99")
        assert "already a model name" in await h.run(f"!alias {BUNDLED_MODEL_NAME} 2")
        assert f"fast → 2. {REMOTE}" in await h.run("!aliases")
        answer = await h.run("!ask fast Say hi. max_tokens=6")
        assert answer.startswith(f"[{REMOTE}] ") and "unavailable" not in answer, answer
        assert h.router.sticky_endpoint("!room:x|ask") == "gpu1"  # really the endpoint

        # Validation: one usage line each, never a traceback.
        for bad, word in (
            ("!ask fast hi temp=3", "temp must be between 0 and 2"),
            ("!ask fast hi top_p=1.5", "top_p must be between 0 and 1"),
            ("!ask fast hi max_tokens=0", "max_tokens must be between 1 and 64"),
            ("!ask fast hi max_tokens=x", "max_tokens must be a whole number"),
            ("!ask nosuch hi", "No model 'nosuch'"),
        ):
            reply = await h.run(bad)
            assert word in reply and "Traceback" not in reply, reply

        # A name in use is refused; an owner removes it first, then adds the other one.
        spare = start_llama_server(ALIAS)
        try:
            again = await h.run(f"!add_endpoint gpu1 {spare.base_url}")
            assert "Endpoint gpu1 exists; !remove_endpoint gpu1 first" in again, again
            await h.run("!remove_endpoint gpu1")
            added = await h.run(f"!add_endpoint gpu1 {spare.base_url}")
            assert f"models: {REMOTE}" in added, added
            assert "no key" in await h.run("!endpoints")
        finally:
            spare.stop()
        # An endpoint that goes away: the next !ask is answered locally and says so.
        answer = await h.run("!ask fast Say hi. max_tokens=6")
        assert answer.startswith(f"[{REMOTE}] "), answer
        assert "(endpoint gpu1 unavailable; answered by local fallback" in answer, answer
        await h.run("!remove_endpoint gpu1")

        stats = await h.run("!stats")
        assert "!ask answers: 2 / 2" in stats and OWNER in stats, stats
        assert f"{REMOTE} 1 req" in stats and f"{BUNDLED_MODEL_NAME} 1 req" in stats, stats

        # Endpoints and aliases come back after a restart (same database).
        await h.run(f"!add_endpoint gpu1 {server.base_url} env:{KEY_ENV}")
        # Rows the rules refuse (stored before them, or by hand) are checked again at start.
        store = EndpointStore(db)  # type: ignore[arg-type]
        await store.put(StoredEndpoint("sneaky", server.base_url, "env:HIVEBRIDGE_AS_TOKEN"))
        await store.put(StoredEndpoint("meta", "http://169.254.169.254/v1"))
    finally:
        await h.router.aclose()
        await db.stop()  # type: ignore[attr-defined]

    h2, db2 = await harness(sqlite_url, local, model_path, config())
    try:
        assert h2.catalogue.resolve("fast") == REMOTE and h2.catalogue.resolve("2") == REMOTE
        listing = await h2.run("!endpoints")
        assert "gpu1 (added)" in listing and "sneaky" not in listing and "meta" not in listing
        assert "stored endpoint sneaky is not used: env:HIVEBRIDGE_AS_TOKEN is not" in caplog.text
        assert "stored endpoint meta is not used: 169.254.169.254 is a private" in caplog.text
        assert "Alias fast removed" in await h2.run("!rm_alias fast")
        assert "No alias" in await h2.run("!rm_alias fast")
        reload = await h2.run("!reload_models")
        assert "1 local, 1 remote" in reload, reload
        assert all(KEY not in reply for reply in h.room.replies + h2.room.replies)
        assert KEY not in caplog.text  # not even at DEBUG
    finally:
        await h2.router.aclose()
        await db2.stop()  # type: ignore[attr-defined]
        os.environ.pop(KEY_ENV, None)


def test_helpers() -> None:
    assert safe_url("http://user:pw@h:1/v1") == "http://***@h:1/v1"
    assert failover_note([], "gpu1", False) == ""
    assert failover_note(["a"], "b", False) == "(endpoint a unavailable; answered by endpoint b)"
