"""Membership events: invites to the bot or a persona, and leaving rooms without humans."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from mautrix.appservice import AppService
from mautrix.types import Membership, MemberStateEventContent, StateEvent

from ..config import Config, PermissionsConfig
from ..matrix.members import RoomMembers
from ..permissions import matches
from ..personas.directory import PersonaDirectory

log = logging.getLogger("hivebridge.handler")


class MembershipHandler:
    def __init__(
        self,
        permissions: PermissionsConfig,
        appservice: AppService,
        personas: PersonaDirectory,
        members: RoomMembers,
        *,
        on_left: Callable[[str], None],
        on_joined: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        """``on_left(room_id)``: every persona left the room; drop what is cached of it.
        ``on_joined(room_id, mxid)``: the bot or a persona joined on an invite."""
        self.permissions = permissions
        self.appservice = appservice
        self.personas = personas
        self.members = members
        self.on_left = on_left
        self.on_joined = on_joined

    async def apply_config(self, config: Config) -> None:
        """A reloaded invite allowlist applies to the next invite."""
        self.permissions = config.permissions

    async def on_member(self, room_id: str, event: StateEvent) -> None:
        if not isinstance(event.content, MemberStateEventContent):
            return
        target = str(event.state_key)
        membership = event.content.membership
        if membership == Membership.INVITE and self.personas.is_ours(target):
            await self._on_invite(room_id, target, str(event.sender))
        elif membership in (Membership.LEAVE, Membership.BAN):
            persona = self.personas.get(target)
            if persona is not None:
                await self.personas.store.remove_room(persona.name, room_id)
            elif not self.personas.is_ours(target):
                await self._leave_if_no_humans(room_id)

    async def _on_invite(self, room_id: str, target: str, inviter: str) -> None:
        persona = self.personas.get(target)
        if target == self.personas.bot_mxid:
            intent = self.appservice.intent
        elif persona is not None:
            intent = self.personas.intent(persona)
        else:
            return  # a namespace user that is no persona (despawned): ignore the invite
        if self.personas.is_ours(inviter):
            pass  # our own bot or personas bringing each other in (spawn, invite)
        elif not matches(inviter, self.permissions.invite_allowlist):
            log.info("refusing invite from %s", inviter, extra={"room_id": room_id})
            await intent.leave_room(room_id, reason="inviter is not allowed")  # type: ignore[arg-type]
            return
        await intent.ensure_registered()
        await intent.join_room_by_id(room_id)  # type: ignore[arg-type]
        # Fetch the member list once, so room size is known before the first message.
        await intent.get_joined_members(room_id)  # type: ignore[arg-type]
        self.members.forget(room_id)
        if persona is not None:
            await self.personas.store.add_room(persona.name, room_id)
        log.info("%s joined on invite from %s", target, inviter, extra={"room_id": room_id})
        if self.on_joined is not None:
            await self.on_joined(room_id, target)

    async def _leave_if_no_humans(self, room_id: str) -> None:
        """When the last human leaves, the personas and the bot leave too."""
        members = await self.members.joined(room_id)
        if any(not self.personas.is_ours(m) for m in members):
            return
        for mxid in members:
            persona = self.personas.get(mxid)
            if persona is not None:
                intent = self.personas.intent(persona)
                await self.personas.store.remove_room(persona.name, room_id)
            elif mxid == self.personas.bot_mxid:
                intent = self.appservice.intent
            else:
                continue
            try:
                await intent.leave_room(room_id, reason="no humans left")  # type: ignore[arg-type]
            except Exception as e:
                log.warning("could not leave: %s", e, extra={"room_id": room_id})
        self.on_left(room_id)
