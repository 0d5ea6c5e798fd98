"""Health, metrics and admin HTTP API, on a listener of its own.

Kept apart from the appservice listener so that the port the homeserver pushes
transactions to never exposes admin routes, and so the API can bind another
interface. The app knows nothing of the bridge: it talks to an
:class:`AdminProvider`, which the composition root implements.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from aiohttp import web

from . import metrics

log = logging.getLogger("hivebridge.web")

#: The OpenAPI document describing this API; package data, so installs serve it too.
DEFAULT_OPENAPI_PATH = Path(__file__).resolve().parent / "admin-api.openapi.yaml"
#: Prefix of the routes that need the bearer token.
API_PREFIX = "/api/v1"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminError(Exception):
    """A refusal the provider wants the client to see (404 unknown model, 409 busy...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@runtime_checkable
class AdminProvider(Protocol):
    """What the API needs from the bridge. Methods may raise :class:`AdminError`."""

    async def check_database(self) -> bool: ...

    async def check_homeserver(self) -> bool: ...

    async def models_ready(self) -> bool: ...

    async def list_models(self) -> list[dict[str, Any]]: ...

    async def load_model(self, name: str) -> dict[str, Any]: ...

    async def unload_model(self, name: str) -> dict[str, Any]: ...

    async def list_personas(self) -> list[dict[str, Any]]: ...

    async def persona(self, name: str) -> dict[str, Any]: ...

    async def spawn_persona(self, body: dict[str, Any]) -> dict[str, Any]: ...

    async def despawn_persona(self, name: str) -> dict[str, Any]: ...

    async def list_rooms(self) -> list[dict[str, Any]]: ...

    async def backfill(self, room: str, limit: int | None) -> dict[str, Any]: ...

    async def stats(self) -> dict[str, Any]: ...

    async def list_endpoints(self) -> list[dict[str, Any]]: ...


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes ``{"error": ...}``; a traceback never reaches the client."""
    try:
        return await handler(request)
    except AdminError as e:
        return _error(e.status, e.message)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.reason)
    except Exception:
        log.exception("admin API: %s %s failed", request.method, request.path)
        return _error(500, "internal error")


class WebServer:
    """The health/metrics/admin listener.

    ``token`` empty or None leaves the ``/api/v1`` admin routes out entirely;
    ``provider`` None leaves out readiness and admin routes (a metrics-only
    listener, for when metrics and admin API use different ports).
    ``port=0`` binds a free port; read it back from :attr:`port` after start.
    """

    def __init__(
        self,
        provider: AdminProvider | None,
        *,
        hostname: str = "127.0.0.1",
        port: int = 29334,
        token: str | None = None,
        serve_metrics: bool = True,
        openapi_path: Path | None = None,
    ) -> None:
        self.provider = provider
        self.hostname = hostname
        self.port = port
        self._token = token.encode() if token else None
        self.serve_metrics = serve_metrics
        self.openapi_path = openapi_path or DEFAULT_OPENAPI_PATH
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None

    @property
    def serves(self) -> str:
        """What this listener serves, for its start line (metrics and admin may differ)."""
        parts = []
        if self.serve_metrics:
            parts.append("metrics")
        parts.append("health")
        if self.provider is not None and self._token is not None:
            parts.append("admin API")
        return " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)

    def __repr__(self) -> str:  # never show the token
        return f"WebServer({self.hostname}:{self.port}, admin={self._token is not None})"

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[_json_errors])
        app.router.add_get("/health/live", self.live)
        if self.serve_metrics:
            app.router.add_get("/metrics", self.metrics)
        if self.provider is not None:
            app.router.add_get("/health/ready", self.ready)
        if self.provider is not None and self._token is not None:
            add = app.router.add_route
            add("GET", f"{API_PREFIX}/models", self._auth(self.list_models))
            add("POST", f"{API_PREFIX}/models/{{name}}/load", self._auth(self.load_model))
            add("POST", f"{API_PREFIX}/models/{{name}}/unload", self._auth(self.unload_model))
            add("GET", f"{API_PREFIX}/personas", self._auth(self.list_personas))
            add("POST", f"{API_PREFIX}/personas", self._auth(self.spawn_persona))
            add("GET", f"{API_PREFIX}/personas/{{name}}", self._auth(self.persona))
            add("DELETE", f"{API_PREFIX}/personas/{{name}}", self._auth(self.despawn_persona))
            add("GET", f"{API_PREFIX}/rooms", self._auth(self.list_rooms))
            add("POST", f"{API_PREFIX}/rooms/{{room}}/backfill", self._auth(self.backfill))
            add("GET", f"{API_PREFIX}/stats", self._auth(self.stats))
            add("GET", f"{API_PREFIX}/endpoints", self._auth(self.list_endpoints))
            add("GET", f"{API_PREFIX}/openapi.yaml", self.openapi)
        return app

    # Lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.hostname, self.port)
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])
        log.info("%s listening on %s:%d", self.serves, self.hostname, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # Auth -----------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        if self._token is None:
            return False
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode(), self._token)

    def _auth(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self._authorized(request):
                return web.json_response(
                    {"error": "missing or invalid bearer token"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="hivebridge"'},
                )
            return await handler(request)

        return guarded

    def _need_provider(self) -> AdminProvider:
        if self.provider is None:  # pragma: no cover - routes are only added with one
            raise AdminError(503, "not available")
        return self.provider

    # Handlers -------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def ready(self, request: web.Request) -> web.Response:
        provider = self._need_provider()
        checks = {
            "database": await _safe_check(provider.check_database),
            "homeserver": await _safe_check(provider.check_homeserver),
            "models": await _safe_check(provider.models_ready),
        }
        ok = all(checks.values())
        return _json(
            {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503
        )

    async def list_models(self, request: web.Request) -> web.Response:
        return _json({"models": await self._need_provider().list_models()})

    async def load_model(self, request: web.Request) -> web.Response:
        return _json(await self._need_provider().load_model(request.match_info["name"]))

    async def unload_model(self, request: web.Request) -> web.Response:
        return _json(await self._need_provider().unload_model(request.match_info["name"]))

    async def list_personas(self, request: web.Request) -> web.Response:
        return _json({"personas": await self._need_provider().list_personas()})

    async def persona(self, request: web.Request) -> web.Response:
        return _json(await self._need_provider().persona(request.match_info["name"]))

    async def spawn_persona(self, request: web.Request) -> web.Response:
        body = await _body(request)
        return _json(await self._need_provider().spawn_persona(body), 201)

    async def despawn_persona(self, request: web.Request) -> web.Response:
        return _json(await self._need_provider().despawn_persona(request.match_info["name"]))

    async def list_rooms(self, request: web.Request) -> web.Response:
        return _json({"rooms": await self._need_provider().list_rooms()})

    async def backfill(self, request: web.Request) -> web.Response:
        body = await _body(request, empty_ok=True)
        limit = body.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise AdminError(400, "limit must be a whole number")
        return _json(await self._need_provider().backfill(request.match_info["room"], limit))

    async def stats(self, request: web.Request) -> web.Response:
        return _json(await self._need_provider().stats())

    async def list_endpoints(self, request: web.Request) -> web.Response:
        return _json({"endpoints": await self._need_provider().list_endpoints()})

    async def openapi(self, request: web.Request) -> web.Response:
        """The API description; public, since it holds no secrets and helps clients."""
        try:
            text = self.openapi_path.read_text(encoding="utf-8")
        except OSError:
            return _error(404, "API description not installed")
        return web.Response(text=text, content_type="application/yaml")


async def _body(request: web.Request, *, empty_ok: bool = False) -> dict[str, Any]:
    """The request's JSON object; 400 for anything else (an empty body is ``{}`` if allowed)."""
    if empty_ok and not await request.read():
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdminError(400, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise AdminError(400, "the body must be a JSON object")
    return body


async def _safe_check(check: Callable[[], Awaitable[bool]]) -> bool:
    """A check that raises counts as failed: readiness must answer, not 500."""
    try:
        return bool(await check())
    except Exception as e:
        log.warning("readiness check %s failed: %s", getattr(check, "__name__", check), e)
        return False
