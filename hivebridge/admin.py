"""The bridge's side of the health/admin API (:class:`hivebridge.web.AdminProvider`).

:mod:`hivebridge.web` knows HTTP and nothing of the bridge; this module knows the
bridge's parts and nothing of HTTP. Everything it returns is plain JSON data and
never holds a secret: endpoint URLs and keys stay out, personas are listed
without their system prompts (one persona's details show it, as ``!persona
show`` does). Spawning, despawning and showing a persona run the room
commands' own checks (:class:`~hivebridge.commands.personas.PersonaCommands`),
so a mistake gets the same answer here as in a room.

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
from mautrix.errors import MNotFound
from mautrix.types import EventType
from mautrix.util.async_db import Database

from .catalogue import ModelCatalogue, ModelEntry
from .commands.base import UserError
from .commands.personas import PersonaCommands
from .db.messages import MessageStore
from .db.personas import Persona
from .db.rooms import RoomStore
from .db.usage import Tally, UsageStore
from .inference.endpoints import EndpointInfo
from .inference.local.engine import LocalEngine
from .inference.types import Backend, InferenceError
from .matrix.backfill import DEFAULT_LIMIT, MAX_LIMIT, backfill
from .matrix.members import RoomMembers
from .personas.directory import PersonaDirectory
from .utc import utc_day
from .web import AdminError

log = logging.getLogger("hivebridge.admin")

#: Seconds a readiness check may take before it counts as failed.
CHECK_TIMEOUT_S = 5.0

#: ``load(name)`` / ``unload(name)`` of a local model, when the local backend can.
ModelAction = Callable[[str], Awaitable[object]]
#: Who a persona spawned through the API was created by (a room's spawn names its sender).
CREATED_BY = "admin_api"
#: The fields of a spawn request, all strings: the room command's flags, and ``dm``.
SPAWN_FIELDS = ("name", "display", "prompt", "model", "room", "dm")
#: Longest value of a spawn field (a whole room command is no longer).
MAX_FIELD_CHARS = 65536
#: HTTP status of each kind of refusal the command layer raises.
_STATUS = {"invalid": 400, "not_found": 404, "conflict": 409, "failed": 502}


class BridgeAdmin:
    """Answers the admin API from the running bridge's parts.

    ``load_local``/``unload_local`` load and free a local model (the models
    manager's); a model over the memory budget or a file that does not load
    answers 409 with the reason.
    """

    def __init__(
        self,
        *,
        db: Database,
        intent_of: Callable[[], IntentAPI],
        catalogue: ModelCatalogue,
        personas: PersonaDirectory,
        usage: UsageStore,
        commands: PersonaCommands,
        rooms: RoomStore,
        messages: MessageStore,
        members: RoomMembers,
        load_local: ModelAction,
        unload_local: ModelAction,
        prefix: Callable[[], str] = lambda: "!",
        clock: Callable[[], float] = time.time,
        ours: str | None = None,
    ) -> None:
        """``prefix()``: the command prefix in force, for answers that name a command."""
        self.db = db
        self.intent_of = intent_of  # the bot's intent exists once the appservice started
        self.catalogue = catalogue
        self.personas = personas
        self.usage = usage
        self.commands = commands
        self.rooms = rooms
        self.messages = messages
        self.members = members
        self.prefix = prefix
        self.load_local = load_local
        self.unload_local = unload_local
        self.clock = clock
        self.ours = ours  # our own users, tallied apart from people in the stats
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
        """Every loaded local engine runs, and the default model has something to serve it.

        A local model that is not loaded counts as ready: it loads on first use.
        """
        local = self.catalogue.local
        if any(not engine.ready for engine in local.engines().values()):
            return False
        default = self.catalogue.router.default_model or local.default_model
        if default is None:
            return False
        name = self.catalogue.resolve(default) or default
        entry = next((e for e in self.catalogue.entries() if e.name == name), None)
        return entry is not None and (entry.loaded or entry.local is not None)

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
        if entry.local is None:
            raise AdminError(
                409, f"model {entry.name} is served by remote endpoints only: nothing to load here"
            )
        if entry.state == "loaded":
            return _model_json(entry)
        await self._run(entry.name, self.load_local)
        return _model_json(self._entry(entry.name))

    async def unload_model(self, name: str) -> dict[str, Any]:
        entry = self._entry(name)
        if entry.local is None:
            raise AdminError(409, f"model {entry.name} is remote: it cannot be unloaded here")
        if entry.state == "not loaded":
            return _model_json(entry)
        await self._run(entry.name, self.unload_local)
        return _model_json(self._entry(entry.name))

    async def _run(self, name: str, action: ModelAction) -> None:
        if name in self._busy:
            raise AdminError(409, f"model {name} is busy: already loading or unloading")
        self._busy.add(name)
        try:
            await action(name)
        except InferenceError as e:  # over the memory budget, a file that does not load
            raise AdminError(409, str(e)) from None
        finally:
            self._busy.discard(name)

    # Personas and stats -----------------------------------------------------------------

    async def list_personas(self) -> list[dict[str, Any]]:
        return [_persona_json(p) for p in self.personas.all()]

    async def persona(self, name: str) -> dict[str, Any]:
        """One persona with its prompt and rooms (``!persona show``; ``text`` is its answer)."""
        p = _checked(lambda: self.commands.find(name, self.prefix()))
        return {
            **_persona_json(p),
            "system_prompt": p.system_prompt,
            "traits": p.traits,
            "avatar_url": p.avatar_url,
            "rooms": await self.personas.store.rooms_of(p.name),
            "text": await self.commands.describe(p),
        }

    async def spawn_persona(self, body: dict[str, Any]) -> dict[str, Any]:
        """``!persona spawn`` from the API: into ``room``, or a direct chat with ``dm``, or none."""
        fields = _spawn_fields(body)
        try:
            spawned = await self.commands.spawn_persona(
                fields.get("name"),
                display=fields.get("display"),
                prompt=fields.get("prompt"),
                model=fields.get("model"),
                room=fields.get("room"),
                created_by=CREATED_BY,
                dm_with=fields.get("dm"),
                prefix=self.prefix(),
            )
        except UserError as e:
            raise _refusal(e) from None
        return {
            **_persona_json(spawned.persona),
            "room_id": spawned.room_id,
            "took_s": round(spawned.took_s, 3),
            "text": spawned.text,
        }

    async def despawn_persona(self, name: str) -> dict[str, Any]:
        try:
            persona, text = await self.commands.despawn_persona(name, self.prefix())
        except UserError as e:
            raise _refusal(e) from None
        return {"name": persona.name, "mxid": persona.mxid, "text": text}

    # Rooms ------------------------------------------------------------------------------

    async def list_rooms(self) -> list[dict[str, Any]]:
        """Every room the bot or a persona is in: humans, personas, active or stopped.

        The bot's rooms come from the homeserver; the personas' from the bridge's
        own record (a homeserver that is away still leaves those listed).
        """
        found: dict[str, None] = {}
        try:
            found.update((str(r), None) for r in await self.intent_of().get_joined_rooms())
        except Exception as e:
            log.warning("the bot's rooms are unknown (%s); listing the personas' rooms", e)
        for p in self.personas.all():
            found.update((r, None) for r in await self.personas.store.rooms_of(p.name))
        return [await self._room_json(room_id) for room_id in found]

    async def _room_json(self, room_id: str) -> dict[str, Any]:
        members = await self.members.joined(room_id)
        personas = [p.name for m in members if (p := self.personas.get(m)) is not None]
        return {
            "room_id": room_id,
            "name": await self._room_name(room_id, members),
            "active": (await self.rooms.get(room_id)).active,
            "members": [m for m in members if not self.personas.is_ours(m)],
            "personas": personas,
            "bot": self.personas.bot_mxid in members,
            "encrypted": await self.members.encrypted(room_id),
            "messages": await self.messages.count(room_id),
        }

    async def _room_name(self, room_id: str, members: list[str]) -> str | None:
        intent = await self._member_intent(room_id, members)
        if intent is None:
            return None
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                content = await intent.get_state_event(room_id, EventType.ROOM_NAME)  # type: ignore[arg-type]
        except MNotFound:
            return None
        except Exception as e:
            log.debug("room name unavailable: %s", type(e).__name__)
            return None
        name = getattr(content, "name", None)
        return str(name) if name else None

    async def _member_intent(self, room_id: str, members: list[str]) -> IntentAPI | None:
        """The bot's intent if it is in the room, else a persona's there, else None."""
        if self.personas.bot_mxid in members:
            return self.intent_of()
        for mxid in members:
            persona = self.personas.get(mxid)
            if persona is not None:
                return self.personas.intent(persona)
        for persona in self.personas.all():  # members unknown here: the bridge's own record
            if room_id in await self.personas.store.rooms_of(persona.name):
                return self.personas.intent(persona)
        return None

    async def backfill(self, room: str, limit: int | None) -> dict[str, Any]:
        """Store the room's messages the bridge never received, as history (never answered)."""
        limit = DEFAULT_LIMIT if limit is None else limit
        if not 1 <= limit <= MAX_LIMIT:
            raise AdminError(400, f"limit must be between 1 and {MAX_LIMIT}")
        try:
            room_id = await self.commands.room_id(room)
        except UserError as e:
            raise _refusal(e) from None
        intent = await self._member_intent(room_id, await self.members.joined(room_id))
        if intent is None:
            raise AdminError(
                404,
                f"Neither the bot nor a persona is in {room[:80]}: "
                "backfill reads the room as one of them.",
            )
        result = await backfill(
            intent, room_id, self.messages, persona_of=self._persona_name, limit=limit
        )
        return {
            "room_id": result.room_id,
            "read": result.read,
            "stored": result.stored,
            "complete": result.complete,
            "oldest_ts": result.oldest_ts,
            "text": result.text,
        }

    async def list_endpoints(self) -> list[dict[str, Any]]:
        """Remote endpoints and their health, as ``!endpoints`` and the metrics see it
        (never a URL or key)."""
        return [_endpoint_json(info) for info in self.catalogue.router.endpoints()]

    def _persona_name(self, mxid: str) -> str | None:
        persona = self.personas.get(mxid)
        return persona.name if persona is not None else None

    async def stats(self) -> dict[str, Any]:
        """Usage (as ``!stats`` counts it), personas and models, and the local engine."""
        day = utc_day(self.clock())
        r = await self.usage.report(day, bot_mxid=self.personas.bot_mxid, ours=self.ours)
        entries = self.catalogue.entries()
        engines: dict[str, Any] = {}
        for name, backend in self.catalogue.local.engines().items():
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
            "asked_by_personas": [_tally_json(t) for t in r.persona_askers],
            "by_persona": [_tally_json(t) for t in r.personas],
            "by_model": [_tally_json(t) for t in r.models],
            "personas": len(self.personas.all()),
            "models": {"known": len(entries), "loaded": sum(1 for e in entries if e.loaded)},
            "local_engines": engines,
        }


def _endpoint_json(info: EndpointInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "status": info.status,
        "healthy": info.healthy,
        "breaker": info.state,
        "latency_ms": info.latency_ms,
        "last_error": info.last_error,
        "next_probe_in_s": info.cooldown_remaining_s,
        "models": list(info.models),
        "pool": info.pool,
    }


def _persona_json(p: Persona) -> dict[str, Any]:
    """A persona as listed: never its system prompt."""
    return {
        "name": p.name,
        "mxid": p.mxid,
        "displayname": p.displayname,
        "model": p.model,
        "profile": p.profile,
        "created_at": p.created_at,
        "created_by": p.created_by,
    }


def _refusal(e: UserError) -> AdminError:
    """The command layer's answer, with the HTTP status of its kind."""
    return AdminError(_STATUS.get(e.kind, 400), str(e))


def _checked(find: Callable[[], Persona]) -> Persona:
    try:
        return find()
    except UserError as e:
        raise _refusal(e) from None


def _spawn_fields(body: Any) -> dict[str, str]:
    """The spawn request's fields: known names, string values (null means unset)."""
    if not isinstance(body, dict):
        raise AdminError(400, "the body must be a JSON object")
    unknown = [k for k in body if k not in SPAWN_FIELDS]
    if unknown:
        raise AdminError(
            400, f"unknown field {str(unknown[0])[:40]!r} (fields: {', '.join(SPAWN_FIELDS)})"
        )
    fields: dict[str, str] = {}
    for key, value in body.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise AdminError(400, f"{key} must be a string")
        if len(value) > MAX_FIELD_CHARS:
            raise AdminError(400, f"{key} is too long")
        fields[key] = value
    return fields


def _model_json(e: ModelEntry) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": e.id,
        "name": e.name,
        "loaded": e.loaded,
        "local_file": e.local_file,
        "endpoints": list(e.endpoints),
        "aliases": list(e.aliases),
    }
    if e.local is not None:
        data["local"] = {
            "state": e.state,
            "size_bytes": e.local.size_bytes,
            "quantization": e.local.quantization,
            "context_length": e.local.context_length,
            "layers": e.local.n_layer + 1,
            "offloaded_layers": e.offloaded_layers,
        }
    return data


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
