"""The health/admin API over real HTTP on 127.0.0.1, with a fake provider."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from hivebridge import metrics
from hivebridge.web import DEFAULT_OPENAPI_PATH, AdminError, AdminProvider, WebServer

TOKEN = "s3cret-admin-token-for-tests"


class FakeProvider:
    def __init__(self) -> None:
        self.database = True
        self.homeserver = True
        self.ready = True
        self.models: dict[str, bool] = {"smollm2": True, "tiny": False}
        self.spawned: list[dict[str, Any]] = []
        self.backfills: list[tuple[str, int | None]] = []

    async def check_database(self) -> bool:
        return self.database

    async def check_homeserver(self) -> bool:
        if not self.homeserver:
            raise ConnectionError("homeserver down")
        return True

    async def models_ready(self) -> bool:
        return self.ready

    async def list_models(self) -> list[dict[str, Any]]:
        return [{"name": n, "loaded": loaded} for n, loaded in self.models.items()]

    def _model(self, name: str) -> None:
        if name not in self.models:
            raise AdminError(404, f"no model named {name}")

    async def load_model(self, name: str) -> dict[str, Any]:
        self._model(name)
        self.models[name] = True
        return {"name": name, "loaded": True}

    async def unload_model(self, name: str) -> dict[str, Any]:
        self._model(name)
        if name == "smollm2":
            raise AdminError(409, "default model is in use")
        self.models[name] = False
        return {"name": name, "loaded": False}

    async def list_personas(self) -> list[dict[str, Any]]:
        return [{"name": "assistant", "mxid": "@hive_assistant:example.org", "model": None}]

    async def persona(self, name: str) -> dict[str, Any]:
        if name != "assistant":
            raise AdminError(404, f"No persona named {name!r}")
        return {"name": name, "system_prompt": "Be brief."}

    async def spawn_persona(self, body: dict[str, Any]) -> dict[str, Any]:
        self.spawned.append(body)
        return {"name": body.get("name"), "text": "Spawned."}

    async def despawn_persona(self, name: str) -> dict[str, Any]:
        return {"name": name, "text": "Despawned."}

    async def list_rooms(self) -> list[dict[str, Any]]:
        return [{"room_id": "!r:example.org", "personas": ["assistant"], "active": True}]

    async def backfill(self, room: str, limit: int | None) -> dict[str, Any]:
        self.backfills.append((room, limit))
        return {"room_id": room, "stored": 0}

    async def stats(self) -> dict[str, Any]:
        raise RuntimeError("boom: secret internals")

    async def list_endpoints(self) -> list[dict[str, Any]]:
        return [{"name": "gpu1", "status": "down", "healthy": False}]


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
async def server(provider: FakeProvider) -> AsyncIterator[WebServer]:
    srv = WebServer(provider, hostname="127.0.0.1", port=0, token=TOKEN)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def http(server: WebServer) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    async with aiohttp.ClientSession() as session:
        yield session, f"http://127.0.0.1:{server.port}"


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_fake_satisfies_protocol() -> None:
    assert isinstance(FakeProvider(), AdminProvider)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Bearer"}],
    ids=["none", "wrong", "no-scheme", "empty"],
)
async def test_admin_routes_need_the_token(
    http: tuple[aiohttp.ClientSession, str], headers: dict[str, str]
) -> None:
    session, base = http
    for method, path in [
        ("GET", "/api/v1/models"),
        ("POST", "/api/v1/models/tiny/load"),
        ("POST", "/api/v1/models/tiny/unload"),
        ("GET", "/api/v1/personas"),
        ("POST", "/api/v1/personas"),
        ("GET", "/api/v1/personas/assistant"),
        ("DELETE", "/api/v1/personas/assistant"),
        ("GET", "/api/v1/rooms"),
        ("POST", "/api/v1/rooms/%21r%3Aexample.org/backfill"),
        ("GET", "/api/v1/stats"),
    ]:
        async with session.request(method, base + path, headers=headers) as resp:
            assert resp.status == 401, path
            assert (await resp.json()) == {"error": "missing or invalid bearer token"}


async def test_right_token_gets_json(
    http: tuple[aiohttp.ClientSession, str], provider: FakeProvider
) -> None:
    session, base = http
    async with session.get(f"{base}/api/v1/models", headers=AUTH) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert {"name": "tiny", "loaded": False} in body["models"]
    async with session.get(f"{base}/api/v1/personas", headers=AUTH) as resp:
        assert resp.status == 200
        assert (await resp.json())["personas"][0]["name"] == "assistant"
    async with session.post(f"{base}/api/v1/models/tiny/load", headers=AUTH) as resp:
        assert resp.status == 200
        assert await resp.json() == {"name": "tiny", "loaded": True}
    assert provider.models["tiny"] is True


async def test_persona_and_room_routes(
    http: tuple[aiohttp.ClientSession, str], provider: FakeProvider
) -> None:
    session, base = http
    async with session.get(f"{base}/api/v1/personas/assistant", headers=AUTH) as resp:
        assert resp.status == 200
        assert (await resp.json())["system_prompt"] == "Be brief."
    async with session.get(f"{base}/api/v1/personas/nobody", headers=AUTH) as resp:
        assert resp.status == 404
        assert (await resp.json()) == {"error": "No persona named 'nobody'"}
    body = {"name": "ada", "room": "#lab:example.org"}
    async with session.post(f"{base}/api/v1/personas", headers=AUTH, json=body) as resp:
        assert resp.status == 201
        assert (await resp.json())["text"] == "Spawned."
    assert provider.spawned == [body]
    async with session.delete(f"{base}/api/v1/personas/ada", headers=AUTH) as resp:
        assert resp.status == 200
    async with session.get(f"{base}/api/v1/rooms", headers=AUTH) as resp:
        assert (await resp.json())["rooms"][0]["room_id"] == "!r:example.org"
    room = "/api/v1/rooms/%21r%3Aexample.org/backfill"
    async with session.post(f"{base}{room}", headers=AUTH) as resp:
        assert resp.status == 200
    async with session.post(f"{base}{room}", headers=AUTH, json={"limit": 5}) as resp:
        assert resp.status == 200
    assert provider.backfills == [("!r:example.org", None), ("!r:example.org", 5)]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/personas", "not json"),
        ("/api/v1/personas", "[1, 2]"),
        ("/api/v1/personas", ""),
        ("/api/v1/rooms/%21r%3Ax/backfill", '{"limit": "ten"}'),
        ("/api/v1/rooms/%21r%3Ax/backfill", '{"limit": true}'),
        ("/api/v1/rooms/%21r%3Ax/backfill", "[]"),
    ],
)
async def test_bad_bodies_are_400_json(
    http: tuple[aiohttp.ClientSession, str], path: str, body: str
) -> None:
    session, base = http
    async with session.post(f"{base}{path}", headers=AUTH, data=body) as resp:
        assert resp.status == 400
        assert "error" in await resp.json()


async def test_unknown_model_is_404_json(http: tuple[aiohttp.ClientSession, str]) -> None:
    session, base = http
    async with session.post(f"{base}/api/v1/models/nope/load", headers=AUTH) as resp:
        assert resp.status == 404
        assert await resp.json() == {"error": "no model named nope"}


async def test_conflict_is_409_json(http: tuple[aiohttp.ClientSession, str]) -> None:
    session, base = http
    async with session.post(f"{base}/api/v1/models/smollm2/unload", headers=AUTH) as resp:
        assert resp.status == 409
        assert "error" in await resp.json()


async def test_provider_crash_is_500_json_without_traceback(
    http: tuple[aiohttp.ClientSession, str],
) -> None:
    session, base = http
    async with session.get(f"{base}/api/v1/stats", headers=AUTH) as resp:
        assert resp.status == 500
        text = await resp.text()
    assert "Traceback" not in text and "secret internals" not in text
    assert resp.content_type == "application/json"


async def test_unknown_route_and_method_are_json(http: tuple[aiohttp.ClientSession, str]) -> None:
    session, base = http
    async with session.get(f"{base}/nope") as resp:
        assert resp.status == 404
        assert "error" in await resp.json()
    async with session.get(f"{base}/api/v1/models/tiny/load", headers=AUTH) as resp:
        assert resp.status == 405
        assert "error" in await resp.json()


async def test_liveness(http: tuple[aiohttp.ClientSession, str]) -> None:
    session, base = http
    async with session.get(f"{base}/health/live") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_readiness(http: tuple[aiohttp.ClientSession, str], provider: FakeProvider) -> None:
    session, base = http
    async with session.get(f"{base}/health/ready") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body == {
        "status": "ok",
        "checks": {"database": True, "homeserver": True, "models": True},
    }
    for attr in ("database", "homeserver", "ready"):
        setattr(provider, attr, False)
        async with session.get(f"{base}/health/ready") as resp:
            assert resp.status == 503, attr
            body = await resp.json()
        assert body["status"] == "unavailable"
        assert list(body["checks"].values()).count(False) == 1
        setattr(provider, attr, True)


async def test_metrics_served_without_token(http: tuple[aiohttp.ClientSession, str]) -> None:
    session, base = http
    metrics.HOMESERVER_RATE_LIMITED.inc()
    async with session.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "hivebridge_homeserver_rate_limited" in names


async def test_no_token_means_no_admin_routes(provider: FakeProvider) -> None:
    srv = WebServer(provider, hostname="127.0.0.1", port=0, token=None)
    await srv.start()
    try:
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{srv.port}"
            async with session.get(f"{base}/api/v1/models", headers=AUTH) as resp:
                assert resp.status == 404
            async with session.get(f"{base}/health/ready") as resp:
                assert resp.status == 200
    finally:
        await srv.stop()


def test_repr_hides_token(provider: FakeProvider) -> None:
    assert TOKEN not in repr(WebServer(provider, port=0, token=TOKEN))


def _app_routes(server: WebServer) -> set[tuple[str, str]]:
    routes = set()
    for route in server.app.router.routes():
        if route.method == "HEAD":  # aiohttp adds HEAD for every GET
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        routes.add((route.method.lower(), str(path)))
    return routes


async def test_openapi_served_and_lists_every_route(
    http: tuple[aiohttp.ClientSession, str], server: WebServer
) -> None:
    session, base = http
    async with session.get(f"{base}/api/v1/openapi.yaml") as resp:
        assert resp.status == 200
        doc = YAML(typ="safe").load(await resp.text())
    assert str(doc["openapi"]).startswith("3.")
    documented = {
        (method, path)
        for path, item in doc["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert _app_routes(server) == documented
    for path in doc["paths"]:
        assert re.fullmatch(r"/[a-z0-9_./{}-]*", path)


async def test_openapi_missing_file_is_404_json(provider: FakeProvider, tmp_path: Path) -> None:
    srv = WebServer(
        provider, hostname="127.0.0.1", port=0, token=TOKEN, openapi_path=tmp_path / "x.yaml"
    )
    await srv.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{srv.port}/api/v1/openapi.yaml") as resp,
        ):
            assert resp.status == 404
            assert "error" in await resp.json()
    finally:
        await srv.stop()


def test_default_openapi_path_exists() -> None:
    assert DEFAULT_OPENAPI_PATH.is_file()


def test_openapi_names_the_listeners_ports() -> None:
    """The admin API is served on admin_api.port; /metrics on metrics.port only."""
    from hivebridge.config import AdminApiConfig, MetricsConfig

    doc = YAML(typ="safe").load(DEFAULT_OPENAPI_PATH.read_text())
    assert doc["servers"][0]["url"] == f"http://127.0.0.1:{AdminApiConfig().port}"
    metrics_servers = doc["paths"]["/metrics"]["servers"]
    assert metrics_servers[0]["url"] == f"http://127.0.0.1:{MetricsConfig().port}"


async def test_token_never_logged(
    http: tuple[aiohttp.ClientSession, str], caplog: pytest.LogCaptureFixture
) -> None:
    session, base = http
    caplog.set_level("DEBUG")
    for headers in (AUTH, {"Authorization": f"Bearer {TOKEN}x"}):
        async with session.get(f"{base}/api/v1/stats", headers=headers) as resp:
            assert resp.status in (401, 500)
    assert caplog.records  # the 500 was logged...
    assert TOKEN not in caplog.text  # ...without the token


async def test_metrics_and_admin_listeners_say_what_they_serve(
    provider: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="hivebridge")
    metrics_only = WebServer(provider, hostname="127.0.0.1", port=0)
    admin_only = WebServer(provider, hostname="127.0.0.1", port=0, token=TOKEN, serve_metrics=False)
    for srv in (metrics_only, admin_only):
        await srv.start()
        await srv.stop()
    lines = [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()]
    assert lines == [
        f"metrics and health listening on 127.0.0.1:{metrics_only.port}",
        f"health and admin API listening on 127.0.0.1:{admin_only.port}",
    ]
