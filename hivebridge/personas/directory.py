"""The persona directory: who the personas are, their Matrix profiles and intents.

A persona is a row in the database plus an appservice intent; the directory
keeps the rows in memory by mxid (every routed event asks it) and tells our
namespace's users from everyone else's.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from mautrix.appservice import AppService, IntentAPI

from ..config import Config
from ..db.personas import Persona, PersonaStore


def namespace_matcher(config: Config) -> Callable[[str], bool]:
    """Whether a user id is ours: the bot or any persona, spawned or not."""
    prefix = re.escape(config.appservice.user_prefix)
    namespace = re.compile(f"^@{prefix}.+:{re.escape(config.homeserver.domain)}$")
    bot = config.bot_mxid
    return lambda mxid: mxid == bot or bool(namespace.match(mxid))


class PersonaDirectory:
    """Cached view of the persona store, keyed by mxid, plus their intents."""

    def __init__(self, config: Config, store: PersonaStore, appservice: AppService) -> None:
        self.config = config
        self.store = store
        self.appservice = appservice
        self._by_mxid: dict[str, Persona] = {}
        self._is_ours = namespace_matcher(config)

    async def load(self) -> None:
        self._by_mxid = {p.mxid: p for p in await self.store.all()}

    async def apply_config(self, config: Config) -> None:
        """A reloaded default persona exists at once, as at start.

        A persona already stored keeps its stored settings (``!persona set``
        changes them), as it does across a restart.
        """
        old, self.config = self.config, config
        if config.default_persona != old.default_persona:
            await self.ensure_default()

    @property
    def bot_mxid(self) -> str:
        return self.config.bot_mxid

    def get(self, mxid: str) -> Persona | None:
        return self._by_mxid.get(mxid)

    def all(self) -> list[Persona]:
        return sorted(self._by_mxid.values(), key=lambda p: p.name)

    def is_ours(self, mxid: str) -> bool:
        """A user of our namespace: the bot or any persona, spawned or not."""
        return self._is_ours(mxid)

    def intent(self, persona: Persona) -> IntentAPI:
        return self.appservice.intent.user(persona.mxid)  # type: ignore[arg-type]

    def remember(self, persona: Persona) -> None:
        self._by_mxid[persona.mxid] = persona

    def forget(self, persona: Persona) -> None:
        self._by_mxid.pop(persona.mxid, None)

    async def ensure_default(self) -> Persona:
        """The persona from config exists in the store and on the homeserver."""
        cfg = self.config.default_persona
        mxid = self.config.persona_mxid(cfg.name)
        persona = await self.store.get(cfg.name)
        if persona is None:
            persona = Persona(
                name=cfg.name,
                mxid=mxid,
                displayname=cfg.displayname,
                system_prompt=cfg.system_prompt,
                model=cfg.model,
                created_by="config",
            )
            await self.store.insert(persona)
        await self.ensure_on_homeserver(persona)
        self.remember(persona)
        return persona

    async def ensure_on_homeserver(self, persona: Persona) -> None:
        intent = self.intent(persona)
        await intent.ensure_registered()
        await intent.set_displayname(persona.displayname)
        if persona.avatar_url:
            await intent.set_avatar_url(persona.avatar_url)  # type: ignore[arg-type]
