"""The bridge's side of the health/admin API (:class:`hivebridge.web.AdminProvider`).

:mod:`hivebridge.web` knows HTTP and nothing of the bridge; this module knows the
bridge's parts and nothing of HTTP. Everything it returns is plain JSON data and
never holds a secret: endpoint URLs and keys stay out, personas are listed
without their system prompts.

It also tells the metrics module what the local engines are doing (queue depth,
active sequences): only an engine knows, and the engines must not import metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mautrix.appservice import IntentAPI
from mautrix.util.async_db import Database

from .catalogue import ModelCatalogue, ModelEntry
from .db.usage import Tally, UsageStore
from .inference.local.engine import LocalEngine
from .inference.types import Backend
from .personas.directory import PersonaDirectory
from .utc import utc_day
from .web import AdminError

log = logging.getLogger("hivebridge.admin")

#: Seconds a readiness check may take before it counts as failed.
CHECK_TIMEOUT_S = 5.0

#: ``load(name)`` / ``unload(name)`` of a local model, when the local backend can.
ModelAction = Callable[[str], Awaitable[None]]


class BridgeAdmin:
    """Answers the admin API from the running bridge's parts.

    ``load_local``/``unload_local`` are None while the local backend cannot load
    or free a model at run time; the API then answers 409 and says why, rather
    than pretending it did.
    """

    def __init__(
        self,
        *,
        db: Database,
        intent_of: Callable[[], IntentAPI],
        catalogue: ModelCatalogue,
        personas: PersonaDirectory,
        usage: UsageStore,
        load_local: ModelAction | None = None,
        unload_local: ModelAction | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.intent_of = intent_of  # the bot's intent exists once the appservice started
        self.catalogue = catalogue
        self.personas = personas
        self.usage = usage
        self.load_local = load_local
        self.unload_local = unload_local
        self.clock = clock
        self.started_at = clock()
        self._busy: set[str] = set()  # models being loaded or unloaded

    # Readiness ----------------------------------------------------------------------

    async def check_database(self) -> bool:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            return bool(await self.db.fetchval("SELECT 1") == 1)

    async def check_homeserver(self) -> bool:
        """The homeserver answers ``GET /_matrix/client/versions`` (uncached)."""
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            versions = await self.intent_of().versions(no_cache=True)
        return bool(versions.versions)

    async def models_ready(self) -> bool:
        """Every local model is ready, and the default model has something to serve it."""
        if any(not _backend_ready(b) for b in self.catalogue.loaded.values()):
            return False
        router = self.catalogue.router
        default = router.default_model
        if default is None:
            return bool(self.catalogue.loaded)
        name = self.catalogue.resolve(default) or default
        entry = next((e for e in self.catalogue.entries() if e.name == name), None)
        if entry is not None and entry.loaded:
            return True
        return router.fallback is not None and _backend_ready(router.fallback)

    # Models ---------------------------------------------------------------------------

    async def list_models(self) -> list[dict[str, Any]]:
        return [_model_json(e) for e in self.catalogue.entries()]

    def _entry(self, ref: str) -> ModelEntry:
        name = self.catalogue.resolve(ref)
        entry = next((e for e in self.catalogue.entries() if e.name == name), None)
        if entry is None:
            raise AdminError(404, f"no model {ref[:60]!r}; GET /api/v1/models lists them")
        return entry

    async def load_model(self, name: str) -> dict[str, Any]:
        entry = self._entry(name)
        if entry.loaded:
            return _model_json(entry)
        if entry.local_file is None:
            raise AdminError(
                409, f"model {entry.name} is served by remote endpoints only: nothing to load here"
            )
        if self.load_local is None:
            raise AdminError(
                409,
                "the local backend cannot load another model at run time yet; "
                "set inference.local.model_path and restart the bridge",
            )
        await self._run(entry.name, self.load_local)
        return _model_json(self._entry(entry.name))

    async def unload_model(self, name: str) -> dict[str, Any]:
        entry = self._entry(name)
        if entry.name not in self.catalogue.loaded:
            if entry.loaded:  # loaded means: a healthy endpoint serves it
                raise AdminError(409, f"model {entry.name} is remote: it cannot be unloaded here")
            return _model_json(entry)
        if self.unload_local is None:
            raise AdminError(
                409,
                "the local backend cannot unload its model at run time yet; "
                "it is the bridge's fallback and stays loaded until the bridge stops",
            )
        await self._run(entry.name, self.unload_local)
        return _model_json(self._entry(entry.name))

    async def _run(self, name: str, action: ModelAction) -> None:
        if name in self._busy:
            raise AdminError(409, f"model {name} is busy: already loading or unloading")
        self._busy.add(name)
        try:
            await action(name)
        finally:
            self._busy.discard(name)

    # Personas and stats -----------------------------------------------------------------

    async def list_personas(self) -> list[dict[str, Any]]:
        return [
            {
                "name": p.name,
                "mxid": p.mxid,
                "displayname": p.displayname,
                "model": p.model,
                "profile": p.profile,
                "created_at": p.created_at,
                "created_by": p.created_by,
            }
            for p in self.personas.all()
        ]

    async def stats(self) -> dict[str, Any]:
        """Usage (as ``!stats`` counts it), personas and models, and the local engine."""
        day = utc_day(self.clock())
        r = await self.usage.report(day, bot_mxid=self.personas.bot_mxid)
        entries = self.catalogue.entries()
        engines: dict[str, Any] = {}
        for name, backend in self.catalogue.loaded.items():
            state = await _engine_state(backend)
            if state is not None:
                engines[name] = {k: v for k, v in state.items() if k != "sessions"}
        return {
            "day": day,
            "uptime_s": round(self.clock() - self.started_at, 1),
            "messages": {"total": r.messages, "today": r.messages_today},
            "replies": {"total": r.replies, "today": r.replies_today},
            "asks": {"total": r.asks, "today": r.asks_today},
            "tokens": {"total": r.tokens, "today": r.tokens_today},
            "top_users": [_tally_json(t) for t in r.top_users],
            "by_persona": [_tally_json(t) for t in r.personas],
            "by_model": [_tally_json(t) for t in r.models],
            "personas": len(self.personas.all()),
            "models": {"known": len(entries), "loaded": sum(1 for e in entries if e.loaded)},
            "local_engines": engines,
        }


def _model_json(e: ModelEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "name": e.name,
        "loaded": e.loaded,
        "local_file": e.local_file,
        "endpoints": list(e.endpoints),
        "aliases": list(e.aliases),
    }


def _tally_json(t: Tally) -> dict[str, Any]:
    return {
        "key": t.key,
        "requests": t.requests,
        "tokens": t.tokens,
        "requests_today": t.requests_today,
        "tokens_today": t.tokens_today,
    }


def _backend_ready(backend: Backend) -> bool:
    """A backend's own ``ready`` flag where it has one (the batching engine); else True."""
    ready = getattr(backend, "ready", None)
    return True if ready is None else bool(ready)


async def _engine_state(backend: Backend) -> dict[str, Any] | None:
    """The local engine's scheduler state, when the backend offers ``inspect()``."""
    inspect = getattr(backend, "inspect", None)
    if inspect is None or not _backend_ready(backend):
        return None
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            state = await inspect()
    except Exception as e:
        log.debug("local engine state unavailable: %s", type(e).__name__)
        return None
    return dict(state) if isinstance(state, dict) else None


def engine_loads(backends: Mapping[str, Backend]) -> dict[str, tuple[int, int]]:
    """(requests waiting, sequences active) of every local engine, by model name.

    Read from ``LocalEngine.load``, lock-free and on any thread, so a scrape
    costs the engine nothing; other backends (remote endpoints) have no queue here.
    """
    loads: dict[str, tuple[int, int]] = {}
    for model, backend in backends.items():
        if isinstance(backend, LocalEngine):
            load = backend.load
            loads[model] = (load.waiting, load.active)
    return loads
