"""What happens to each event, in room order: membership, commands, persona replies."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mautrix.appservice import AppService
from mautrix.types import Event, EventType, Membership, MemberStateEventContent, StateEvent

from .config import Config
from .db.messages import MessageStore, StoredMessage
from .db.personas import Persona
from .matrix.room_queues import RoomQueues
from .permissions import matches
from .personas import PersonaDirectory
from .replies import ReplyService

log = logging.getLogger("hivebridge.events")

DEFAULT_BOUNCE_LIMIT = 8


@dataclass(frozen=True, slots=True)
class RoomWork:
    """One unit of ordered work for a room: a state event or a stored message."""

    event: Event | None = None
    message: StoredMessage | None = None


class EventRouter:
    def __init__(
        self,
        config: Config,
        appservice: AppService,
        personas: PersonaDirectory,
        messages: MessageStore,
        replies: ReplyService,
    ) -> None:
        self.config = config
        self.appservice = appservice
        self.personas = personas
        self.messages = messages
        self.replies = replies
        self.queues: RoomQueues[RoomWork] = RoomQueues(self._handle)

    # Intake side ------------------------------------------------------------------

    def on_event(self, event: Event, stored: StoredMessage | None) -> None:
        room_id = str(getattr(event, "room_id", "") or "")
        if not room_id:
            return
        if event.type == EventType.ROOM_MEMBER:
            self.queues.push(room_id, RoomWork(event=event))
        elif stored is not None:
            self.queues.push(room_id, RoomWork(message=stored))

    def resume(self, message: StoredMessage) -> None:
        """Queue a stored message whose routing never finished (after a crash)."""
        self.queues.push(message.room_id, RoomWork(message=message))

    async def _handle(self, room_id: str, work: RoomWork) -> None:
        if isinstance(work.event, StateEvent):
            await self._on_member(room_id, work.event)
        elif work.message is not None:
            try:
                await self._on_message(room_id, work.message)
            finally:
                await self.messages.mark_handled(work.message.event_id)

    # Membership ---------------------------------------------------------------------

    async def _on_member(self, room_id: str, event: StateEvent) -> None:
        target = str(event.state_key)
        if not isinstance(event.content, MemberStateEventContent):
            return
        if event.content.membership == Membership.INVITE and self.personas.is_ours(target):
            await self._on_invite(room_id, target, str(event.sender))

    async def _on_invite(self, room_id: str, target: str, inviter: str) -> None:
        persona = self.personas.get(target)
        if target == self.personas.bot_mxid:
            intent = self.appservice.intent
        elif persona is not None:
            intent = self.personas.intent(persona)
        else:
            return  # a namespace user that is no persona (despawned): ignore the invite
        if not matches(inviter, self.config.permissions.invite_allowlist):
            log.info("refusing invite from %s to %s", inviter, room_id)
            await intent.leave_room(room_id, reason="inviter is not allowed")  # type: ignore[arg-type]
            return
        await intent.join_room_by_id(room_id)  # type: ignore[arg-type]
        # Fetch the member list once, so room size is known before the first message.
        await intent.get_joined_members(room_id)  # type: ignore[arg-type]
        if persona is not None:
            await self.personas.store.add_room(persona.name, room_id)
        log.info("%s joined %s on invite from %s", target, room_id, inviter)

    async def joined_members(self, room_id: str) -> list[str]:
        members = await self.appservice.state_store.get_members(
            room_id,  # type: ignore[arg-type]
            memberships=(Membership.JOIN,),
        )
        return [str(m) for m in members]

    # Messages ------------------------------------------------------------------------

    async def _on_message(self, room_id: str, msg: StoredMessage) -> None:
        if msg.sender == self.personas.bot_mxid:
            return
        if msg.body.startswith("!") and not self.personas.is_ours(msg.sender):
            return  # commands are the bot's; personas don't answer them
        members = await self.joined_members(room_id)
        for persona in self._personas_in(members):
            if self._should_answer(persona, msg, members):
                await self.replies.reply(persona, msg, DEFAULT_BOUNCE_LIMIT)

    def _personas_in(self, members: list[str]) -> list[Persona]:
        return [p for m in members if (p := self.personas.get(m)) is not None]

    def _should_answer(self, persona: Persona, msg: StoredMessage, members: list[str]) -> bool:
        if msg.sender == persona.mxid or self.personas.is_ours(msg.sender):
            return False
        if msg.msgtype not in ("m.text", "m.emote"):
            return False
        return len(members) == 2
