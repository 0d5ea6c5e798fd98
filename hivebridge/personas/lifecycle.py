"""Spawn and despawn: a persona is born with a database row and an appservice intent.

Spawning needs no admin API and no password, only ``ensure_registered`` in our
exclusive namespace; a failed step rolls back what was done before it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

from ..db.personas import Persona
from .directory import PersonaDirectory

log = logging.getLogger("hivebridge.personas")


class SpawnError(Exception):
    """A spawn step failed; everything done before it was rolled back."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"spawn failed at step '{step}': {detail}")
        self.step = step


class PersonaLifecycle:
    """Spawn and despawn: registration through the appservice, rooms, the store."""

    def __init__(
        self,
        directory: PersonaDirectory,
        *,
        device: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        """``device(mxid)``: give a new persona its encryption device before it joins a
        room, so members' clients share their room keys with it from the start."""
        self.directory = directory
        self.device = device

    async def spawn(
        self,
        name: str,
        *,
        displayname: str | None,
        system_prompt: str,
        model: str | None,
        room_id: str | None,
        created_by: str,
        dm_with: str | None = None,
    ) -> tuple[Persona, str | None]:
        """Create a persona and put it in ``room_id``, or in a new direct chat with
        ``dm_with``, or (neither given) in no room yet.

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
            if self.device is not None:
                step = "device"
                await self.device(persona.mxid)
            if room_id is None and dm_with is not None:
                step = "create room"
                room_id = str(
                    await intent.create_room(
                        invitees=[dm_with],
                        is_direct=True,
                        name=persona.displayname,
                    )
                )
                joined.append(room_id)
            elif room_id is not None:
                step = "invite"
                await d.appservice.intent.invite_user(room_id, persona.mxid)  # type: ignore[arg-type]
                step = "join"
                await intent.join_room_by_id(room_id)  # type: ignore[arg-type]
                joined.append(room_id)
                await intent.get_joined_members(room_id)  # type: ignore[arg-type]
            step = "store"
            if not await d.store.insert(persona):
                raise SpawnError(step, f"the name {name!r} is taken")
            if room_id is not None:
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
