"""Personas as Matrix users: registration through the appservice, profiles, intents.

A persona is a row in the database plus an appservice intent; spawning one
needs no admin API and no password, only ``ensure_registered`` in our
exclusive namespace.
"""

from __future__ import annotations

import contextlib
import logging
import re

from mautrix.appservice import AppService, IntentAPI

from .config import Config
from .db.personas import Persona, PersonaStore

log = logging.getLogger("hivebridge.personas")


class PersonaDirectory:
    """Cached view of the persona store, keyed by mxid, plus their intents."""

    def __init__(self, config: Config, store: PersonaStore, appservice: AppService) -> None:
        self.config = config
        self.store = store
        self.appservice = appservice
        self._by_mxid: dict[str, Persona] = {}
        prefix = re.escape(config.appservice.user_prefix)
        self._namespace = re.compile(f"^@{prefix}.+:{re.escape(config.homeserver.domain)}$")

    async def load(self) -> None:
        self._by_mxid = {p.mxid: p for p in await self.store.all()}

    @property
    def bot_mxid(self) -> str:
        return self.config.bot_mxid

    def get(self, mxid: str) -> Persona | None:
        return self._by_mxid.get(mxid)

    def all(self) -> list[Persona]:
        return sorted(self._by_mxid.values(), key=lambda p: p.name)

    def is_ours(self, mxid: str) -> bool:
        """A user of our namespace: the bot or any persona, spawned or not."""
        return mxid == self.bot_mxid or bool(self._namespace.match(mxid))

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


class SpawnError(Exception):
    """A spawn step failed; everything done before it was rolled back."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"spawn failed at step '{step}': {detail}")
        self.step = step


class PersonaLifecycle:
    """Spawn and despawn: registration through the appservice, rooms, the store."""

    def __init__(self, directory: PersonaDirectory) -> None:
        self.directory = directory

    async def spawn(
        self,
        name: str,
        *,
        displayname: str | None,
        system_prompt: str,
        model: str | None,
        room_id: str | None,
        created_by: str,
    ) -> tuple[Persona, str]:
        """Create a persona and put it in ``room_id`` (or a new room with the caller).

        Returns the persona and the room it is in. On failure nothing is stored and
        the puppet leaves whatever it joined.
        """
        d = self.directory
        persona = Persona(
            name=name,
            mxid=d.config.persona_mxid(name),
            displayname=displayname or name.capitalize(),
            system_prompt=system_prompt,
            model=model,
            created_by=created_by,
        )
        intent = d.intent(persona)
        joined: list[str] = []
        step = "register"
        try:
            await intent.ensure_registered()
            step = "profile"
            await intent.set_displayname(persona.displayname)
            if room_id is None:
                step = "create room"
                room_id = str(
                    await intent.create_room(
                        invitees=[created_by],
                        is_direct=True,
                        name=persona.displayname,
                    )
                )
                joined.append(room_id)
            else:
                step = "invite"
                await d.appservice.intent.invite_user(room_id, persona.mxid)  # type: ignore[arg-type]
                step = "join"
                await intent.join_room_by_id(room_id)  # type: ignore[arg-type]
                joined.append(room_id)
                await intent.get_joined_members(room_id)  # type: ignore[arg-type]
            step = "store"
            if not await d.store.insert(persona):
                raise SpawnError(step, f"the name {name!r} is taken")
            await d.store.add_room(name, room_id)
        except Exception as e:
            for room in joined:
                with contextlib.suppress(Exception):
                    await intent.leave_room(room, reason="spawn rolled back")  # type: ignore[arg-type]
            if isinstance(e, SpawnError):
                raise
            log.warning("spawn of %s failed at %s: %s", name, step, e)
            raise SpawnError(step, _short(e)) from e
        d.remember(persona)
        return persona, room_id

    async def despawn(self, persona: Persona) -> list[str]:
        """Leave every room, then forget the persona; its messages stay in history."""
        d = self.directory
        intent = d.intent(persona)
        rooms = await d.store.rooms_of(persona.name)
        for room in rooms:
            try:
                await intent.leave_room(room, reason="persona despawned")  # type: ignore[arg-type]
            except Exception as e:
                log.warning("despawn: %s could not leave %s: %s", persona.name, room, e)
        await d.store.delete(persona.name)
        d.forget(persona)
        return rooms

    async def invite(self, persona: Persona, room_id: str) -> None:
        """Bring a persona into a room: the bot invites it when it can, then it joins."""
        d = self.directory
        intent = d.intent(persona)
        with contextlib.suppress(Exception):  # the bot may not be in that room
            await d.appservice.intent.invite_user(room_id, persona.mxid)  # type: ignore[arg-type]
        await intent.join_room_by_id(room_id)  # type: ignore[arg-type]
        await intent.get_joined_members(room_id)  # type: ignore[arg-type]
        await d.store.add_room(persona.name, room_id)


def _short(e: Exception) -> str:
    """A one-line reason fit for a room: the Matrix error text, never a traceback."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]
