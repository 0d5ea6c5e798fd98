"""Every routed event, in room order: one consumer per room, rooms in parallel.

Intake hands each event over (with its stored row when it is a message);
membership events go to :class:`MembershipHandler`, messages to
:class:`MessageHandler`. Commands for the bot have a lane of their own per
room, so ``!stop`` or ``!endpoints`` answers while a reply in that room is
still being written (a slow endpoint can hold the reply lane for minutes).
A message is marked handled once its routing finished; routing that lost its
database connection is redone as resumed, so a persona whose reply job was
written answers through it, never twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mautrix.types import Event, EventType, RedactionEvent, StateEvent

from ..bounded import RecentSet
from ..db.messages import StoredMessage
from ..db.resilience import is_connection_lost, retry_when_lost
from ..matrix.members import RoomMembers
from ..matrix.room_queues import RoomQueues, WindDown
from ..personas.summaries import Summarizer
from ..personas.tools import Approvals
from .handled import HandledMarks
from .membership import MembershipHandler
from .messages import MessageHandler

log = logging.getLogger("hivebridge.handler")

#: Pauses before handling an event again after the database connection was lost;
#: the room waits meanwhile, so its order holds.
DB_RETRY_DELAYS_S = (0.25, 1.0, 3.0)


@dataclass(frozen=True, slots=True)
class RoomWork:
    """One unit of ordered work for a room: a state event or a stored message."""

    event: Event | None = None
    message: StoredMessage | None = None
    #: Queued at start (unhandled, or with a pending reply job), not by intake.
    resumed: bool = False
    #: The next turn of the room's scene (personas/scenes.py).
    scene_step: bool = False


class RoomEventHandler:
    def __init__(
        self,
        members: RoomMembers,
        membership: MembershipHandler,
        messages: MessageHandler,
        handled: HandledMarks,
        approvals: Approvals | None = None,
        *,
        on_encrypted: Callable[[str, Event], Awaitable[None]] | None = None,
        summarizer: Summarizer | None = None,
        forget_kv: Callable[[str], Awaitable[object]] | None = None,
        on_arrival: Callable[[str, StoredMessage], None] | None = None,
    ) -> None:
        """``approvals``: answers to tool approvals are taken as they arrive, ahead of
        the room's queue (the reply waiting for one holds that queue).
        ``on_encrypted(room_id, event)``: an ``m.room.encrypted`` event, in room order;
        None ignores them. ``summarizer``: its jobs and summaries of a room forget a
        redacted message; so does ``forget_kv(session_prefix)`` for the local engines'
        cached KV and snapshots of the room. ``on_arrival(room_id, message)``: each
        message as it arrives, ahead of the room's queue (``!scene stop`` takes effect
        there)."""
        self.approvals = approvals
        self.members = members
        self.membership = membership
        self.messages = messages
        self.handled = handled
        self.on_encrypted = on_encrypted
        self.summarizer = summarizer
        self.forget_kv = forget_kv
        self.on_arrival = on_arrival
        # Messages a redaction named while they may still wait in a queue: their row
        # (blanked by intake if the redaction holds) is read again before routing.
        self._redacted: RecentSet[str] = RecentSet(4096)
        self.queues: RoomQueues[RoomWork] = RoomQueues(
            self._handle, droppable=self._droppable, on_drop=self._dropped
        )
        #: Commands, in order among themselves, never behind a reply; a flood of them
        #: loses its oldest (``self.queues`` keeps every command it is given).
        self.command_lane: RoomQueues[RoomWork] = RoomQueues(
            self._handle, droppable=lambda w: w.message is not None, on_drop=self._dropped
        )
        self._overflowing: set[str] = set()

    def _droppable(self, work: RoomWork) -> bool:
        """A flooded room loses its oldest plain messages, never state or commands."""
        msg = work.message
        return msg is not None and not self.messages.commands.is_command(msg.body)

    def _dropped(self, room_id: str, work: RoomWork) -> None:
        """Stored all the same (history shows it); marked handled so no start resumes it."""
        assert work.message is not None
        self.handled.add(work.message.event_id)
        if room_id not in self._overflowing:
            self._overflowing.add(room_id)
            log.warning(
                "room is flooded: over %d events wait; its oldest messages are not answered",
                self.queues.max_per_room,
                extra={"room_id": room_id},
            )

    # Intake side ----------------------------------------------------------------------

    def on_event(self, event: Event, stored: StoredMessage | None) -> None:
        room_id = str(getattr(event, "room_id", "") or "")
        if not room_id:
            return
        if self.approvals is not None:
            self._offer_approval(room_id, event, stored)
        if event.type == EventType.ROOM_MEMBER:
            self.members.forget(room_id)
            self.queues.push(room_id, RoomWork(event=event))
        elif stored is not None:
            if self.on_arrival is not None:
                self.on_arrival(room_id, stored)
            self._lane(stored).push(room_id, RoomWork(message=stored))
        elif isinstance(event, RedactionEvent):
            self._redacted.add(str(event.redacts))
            self.queues.push(room_id, RoomWork(event=event))
        elif event.type == EventType.ROOM_ENCRYPTED and self.on_encrypted is not None:
            self.queues.push(room_id, RoomWork(event=event))

    def _offer_approval(self, room_id: str, event: Event, stored: StoredMessage | None) -> None:
        assert self.approvals is not None
        sender = str(getattr(event, "sender", "") or "")
        if stored is not None:
            self.approvals.offer_command(room_id, sender, stored.event_id, stored.body)
        elif event.type == EventType.REACTION:
            relates = getattr(getattr(event, "content", None), "relates_to", None)
            target, key = getattr(relates, "event_id", None), getattr(relates, "key", None)
            if isinstance(key, str) and target:
                self.approvals.offer_reaction(room_id, sender, str(target), key)

    def resume(self, message: StoredMessage) -> None:
        """Queue a stored message whose routing or reply never finished (after a crash)."""
        self._lane(message).push(message.room_id, RoomWork(message=message, resumed=True))

    def _lane(self, message: StoredMessage) -> RoomQueues[RoomWork]:
        return self.command_lane if self.messages.takes_command(message) else self.queues

    def forget_room(self, room_id: str) -> None:
        """Drop cached loop and thread state (after !start/!stop/!reset or leaving)."""
        self.messages.forget_room(room_id)

    def wake_scene(self, room_id: str, delay_s: float = 0.0) -> None:
        """Queue the next turn of the room's scene, now or after ``delay_s``."""
        if delay_s <= 0:
            self.queues.push(room_id, RoomWork(scene_step=True))
            return
        asyncio.get_running_loop().call_later(
            delay_s, self.queues.push, room_id, RoomWork(scene_step=True)
        )

    async def _handle(self, room_id: str, work: RoomWork) -> None:
        if room_id in self._overflowing and self.queues.waiting(room_id) == 0:
            self._overflowing.discard(room_id)
        if work.scene_step:
            await self.messages.scene_step(room_id)
        elif isinstance(work.event, StateEvent):
            event = work.event
            await retry_when_lost(
                lambda _again: self.membership.on_member(room_id, event),
                DB_RETRY_DELAYS_S,
                what="routing",
                extra={"room_id": room_id},
            )
        elif isinstance(work.event, RedactionEvent):
            await self._on_redaction(room_id, str(work.event.redacts))
        elif work.event is not None and self.on_encrypted is not None:
            encrypted, event = self.on_encrypted, work.event
            await retry_when_lost(
                lambda _again: encrypted(room_id, event),
                DB_RETRY_DELAYS_S,
                what="routing",
                extra={"room_id": room_id},
            )
        elif work.message is not None:
            msg = work.message
            if msg.event_id in self._redacted:
                again = await self.messages.messages.get(msg.event_id)
                if again is None or not again.content:
                    self.handled.add(msg.event_id)  # redacted before its turn came
                    return
                msg = again
            try:
                # Again after a lost connection means resumed: a persona whose reply job
                # was written answers through it, so none answers twice.
                await retry_when_lost(
                    lambda again: self.messages.on_message(
                        room_id, msg, resumed=work.resumed or again
                    ),
                    DB_RETRY_DELAYS_S,
                    what="routing",
                    extra={"room_id": room_id},
                )
            except Exception as e:
                if is_connection_lost(e):
                    # Not marked handled: the next start resumes it.
                    log.warning(
                        "database unavailable; message %s left for the next start",
                        msg.event_id,
                        extra={"room_id": room_id},
                    )
                    return
                self.handled.add(msg.event_id)
                raise
            self.handled.add(msg.event_id)

    async def _on_redaction(self, room_id: str, event_id: str) -> None:
        """Intake blanked the message if the redaction holds; summaries then forget it."""
        row = await self.messages.messages.get(event_id)
        if row is None or row.room_id != room_id or row.content or row.body:
            return  # unknown here, or a redaction its sender had no right to make
        if self.summarizer is not None:
            await self.summarizer.forget_since(room_id, row.ts)
        if self.forget_kv is not None:
            await self.forget_kv(f"{room_id}|")  # sessions are room|persona, room|summary

    async def drain(self) -> None:
        """Wait until everything queued is handled and marked so in the database."""
        await self.queues.drain()
        await self.command_lane.drain()
        await self.handled.flush()

    async def wind_down(self, grace_s: float, hurry: asyncio.Event | None = None) -> WindDown:
        """Stopping: the events being handled (a reply streaming) get ``grace_s`` to
        finish; queued ones stay stored unhandled, and a reply cut short keeps its
        pending job, so the next start resumes both."""
        return await self.queues.wind_down(grace_s, hurry)

    async def close(self) -> None:
        await self.queues.close()
        await self.command_lane.close()
        await self.handled.flush()
