"""What happens to each event, in room order: membership, commands, persona replies."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from mautrix.appservice import AppService
from mautrix.types import Event, EventType, Membership, MemberStateEventContent, StateEvent

from . import metrics
from .commands.base import CommandContext, CommandTable
from .config import Config
from .db.messages import MessageStore, StoredMessage
from .db.personas import Persona
from .db.resilience import is_connection_lost, retry_when_lost
from .db.rooms import RoomStore
from .limits import Limits
from .matrix.room_queues import RoomQueues
from .matrix.sender import Sender, stable_txn_id
from .permissions import matches
from .personas import PersonaDirectory
from .replies import ReplyService
from .roles import Roles
from .routing.dispatch import (
    MessageView,
    PersonaView,
    RoomView,
    addressed_in_thread,
    decide,
    next_bounce_limit,
)
from .routing.loop_guard import GuardVerdict, LoopGuard

log = logging.getLogger("hivebridge.events")

#: Threads remembered per room for "follow-ups in a thread it was addressed in".
MAX_THREADS_PER_ROOM = 256
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


class EventRouter:
    def __init__(
        self,
        config: Config,
        appservice: AppService,
        personas: PersonaDirectory,
        messages: MessageStore,
        rooms: RoomStore,
        roles: Roles,
        commands: CommandTable,
        sender: Sender,
        replies: ReplyService,
    ) -> None:
        self.config = config
        self.appservice = appservice
        self.personas = personas
        self.messages = messages
        self.rooms = rooms
        self.roles = roles
        self.commands = commands
        self.sender = sender
        self.replies = replies
        r = config.routing
        self.loop_guard = LoopGuard(
            threshold=r.ping_pong_threshold,
            cooldown_s=r.ping_pong_cooldown_s,
            max_turns_per_minute=r.max_persona_turns_per_minute,
        )
        self._threads: dict[str, dict[tuple[str, str], None]] = defaultdict(dict)
        # Joined members per room, dropped whenever a membership event arrives.
        self._members: dict[str, list[str]] = {}
        self.handled = HandledMarks(messages)
        self.queues: RoomQueues[RoomWork] = RoomQueues(self._handle)
        #: Request rates and token budgets checked before a persona answers; None: off.
        self.limits: Limits | None = None
        self._limit_charged: dict[str, str] = {}  # room -> event whose request was counted

    # Intake side ----------------------------------------------------------------------

    def on_event(self, event: Event, stored: StoredMessage | None) -> None:
        room_id = str(getattr(event, "room_id", "") or "")
        if not room_id:
            return
        if event.type == EventType.ROOM_MEMBER:
            self._members.pop(room_id, None)
            self.queues.push(room_id, RoomWork(event=event))
        elif stored is not None:
            self.queues.push(room_id, RoomWork(message=stored))

    def resume(self, message: StoredMessage) -> None:
        """Queue a stored message whose routing or reply never finished (after a crash)."""
        self.queues.push(message.room_id, RoomWork(message=message, resumed=True))

    def forget_room(self, room_id: str) -> None:
        """Drop cached loop and thread state (after !start/!stop/!reset or leaving)."""
        self.loop_guard.forget(room_id)
        self._threads.pop(room_id, None)

    async def _handle(self, room_id: str, work: RoomWork) -> None:
        if isinstance(work.event, StateEvent):
            event = work.event
            await retry_when_lost(
                lambda _again: self._on_member(room_id, event),
                DB_RETRY_DELAYS_S,
                what="routing",
                extra={"room_id": room_id},
            )
        elif work.message is not None:
            msg = work.message
            try:
                # Again after a lost connection means resumed: a persona whose reply job
                # was written answers through it, so none answers twice.
                await retry_when_lost(
                    lambda again: self._on_message(room_id, msg, resumed=work.resumed or again),
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

    async def drain(self) -> None:
        """Wait until everything queued is handled and marked so in the database."""
        await self.queues.drain()
        await self.handled.flush()

    async def close(self) -> None:
        await self.queues.close()
        await self.handled.flush()

    # Membership -------------------------------------------------------------------------

    async def _on_member(self, room_id: str, event: StateEvent) -> None:
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
        elif not matches(inviter, self.config.permissions.invite_allowlist):
            log.info("refusing invite from %s", inviter, extra={"room_id": room_id})
            await intent.leave_room(room_id, reason="inviter is not allowed")  # type: ignore[arg-type]
            return
        await intent.ensure_registered()
        await intent.join_room_by_id(room_id)  # type: ignore[arg-type]
        # Fetch the member list once, so room size is known before the first message.
        await intent.get_joined_members(room_id)  # type: ignore[arg-type]
        self._members.pop(room_id, None)
        if persona is not None:
            await self.personas.store.add_room(persona.name, room_id)
        log.info("%s joined on invite from %s", target, inviter, extra={"room_id": room_id})

    async def _leave_if_no_humans(self, room_id: str) -> None:
        """When the last human leaves, the personas and the bot leave too."""
        members = await self.joined_members(room_id)
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
        self.forget_room(room_id)

    async def joined_members(self, room_id: str) -> list[str]:
        cached = self._members.get(room_id)
        if cached is not None:
            return cached
        members = await self.appservice.state_store.get_members(
            room_id,  # type: ignore[arg-type]
            memberships=(Membership.JOIN,),
        )
        self._members[room_id] = result = [str(m) for m in members]
        return result

    # Messages ---------------------------------------------------------------------------

    async def _on_message(self, room_id: str, msg: StoredMessage, resumed: bool = False) -> None:
        if msg.sender == self.personas.bot_mxid:
            return
        members = await self.joined_members(room_id)
        decided: set[str] = set()
        if resumed:
            decided = await self._resume_replies(msg, members)
            if msg.handled:
                return  # routed before the crash; only its replies were unfinished
        is_ours = self.personas.is_ours(msg.sender)
        if not is_ours and self.commands.is_command(msg.body):
            await self._run_command(room_id, msg, members)
            return  # commands are the bot's; personas never answer them
        if msg.msgtype == "m.notice" or _is_edit(msg):
            # Edits and notices trigger nobody and are no turn: counting a streamed
            # reply's edits as turns would hide the A→B pattern from the loop guard.
            return
        now = time.time()
        verdict = self.loop_guard.observe(room_id, msg.sender, now, is_bot=is_ours)
        if verdict.notify:
            await self._loop_notice(room_id, msg, members)
        personas = [
            p for m in members if (p := self.personas.get(m)) is not None and p.name not in decided
        ]
        if not personas:
            return
        age_s = now - msg.ts / 1000
        if age_s > self.config.replies.resume_max_age_s:
            # Redelivered after a long outage: stored for the record, too late to answer.
            log.info("not answering a message %.0fs old", age_s, extra={"room_id": room_id})
            return
        view = await self._view(msg)
        room = await self._room_view(room_id, members)
        for persona in personas:
            pview = PersonaView(persona.mxid, persona.name, persona.displayname)
            decision = decide(view, pview, room)
            metrics.ROUTING_DECISIONS.labels(
                "yes" if decision.answer else "no", metrics.reason_label(decision.reason)
            ).inc()
            if decision.answer:
                pair = addressed_in_thread(view, pview, decision)
                if pair is not None:
                    self._remember_thread(room_id, pair)
            if not decision.answer:
                log.debug("%s: no (%s)", persona.name, decision.reason, extra={"room_id": room_id})
                continue
            guard = self.loop_guard.check_turn(
                room_id, persona.mxid, now, incoming_bounce_limit=view.bounce_limit
            )
            if guard is not GuardVerdict.ALLOW:
                log.info("%s suppressed: %s", persona.name, guard, extra={"room_id": room_id})
                _count_guard(guard, persona.name)
                continue
            if not await self._within_limits(room_id, msg, members, persona, is_ours):
                continue
            bounce = next_bounce_limit(
                view.bounce_limit if is_ours else None, self.config.routing.bounce_limit
            )
            await self.replies.reply(persona, msg, bounce, group=len(members) > 2)

    async def _resume_replies(self, msg: StoredMessage, members: list[str]) -> set[str]:
        """Finish the replies to ``msg`` decided before a restart.

        Returns the personas that have a reply job for it: routing never decides
        for them again (idempotent resume), whatever the job's state. Pending
        jobs are answered now; a persona no longer in the room fails its job.
        """
        jobs = self.replies.jobs
        if jobs is None:
            return set()
        found = await jobs.for_event(msg.event_id)
        by_name = {p.name: p for p in self.personas.all()}
        for name, job in found.items():
            if job.state != "pending":
                continue
            persona = by_name.get(name)
            if persona is None or persona.mxid not in members:
                log.info("%s left; its reply is dropped", name, extra={"room_id": msg.room_id})
                await jobs.finish(msg.event_id, name, "failed")
                continue
            await self.replies.reply(
                persona, msg, job.bounce_limit, group=len(members) > 2, job=job
            )
        return set(found)

    async def _within_limits(
        self, room_id: str, msg: StoredMessage, members: list[str], persona: Persona, is_ours: bool
    ) -> bool:
        """Rate and budgets (hivebridge/limits.py); over a limit, one notice, then quiet.

        One message costs its sender one request however many personas answer it.
        """
        if self.limits is None:
            return True
        spend = self._limit_charged.get(room_id) != msg.event_id
        verdict = await self.limits.check(
            None if is_ours else msg.sender, room_id, persona.name, spend=spend
        )
        self._limit_charged[room_id] = msg.event_id
        if verdict.allowed:
            return True
        metrics.ROUTING_RATE_LIMITED.labels(
            metrics.bounded(verdict.scope, metrics.RATE_LIMIT_SCOPES)
        ).inc()
        log.info("%s over a limit", msg.sender, extra={"room_id": room_id})
        if verdict.notify:
            intent = self.appservice.intent
            if self.personas.bot_mxid not in members:
                intent = self.personas.intent(persona)
            await self.sender.send_text(
                intent,
                room_id,
                verdict.message,
                txn_id=stable_txn_id(msg.event_id, "limit"),
                notice=True,
            )
        return False

    async def _run_command(self, room_id: str, msg: StoredMessage, members: list[str]) -> None:
        """Run a command; the bot answers, or in a room without the bot (a DM with a
        persona) the persona there answers for it, so !reset works in a DM too."""
        intent = self.appservice.intent
        if self.personas.bot_mxid not in members:
            personas = [p for m in members if (p := self.personas.get(m)) is not None]
            if not personas:
                return
            intent = self.personas.intent(personas[0])

        async def reply(text: str) -> None:
            await self.sender.send_text(
                intent,
                room_id,
                text,
                txn_id=stable_txn_id(msg.event_id, "command", text[:64]),
                notice=True,
            )

        ctx = CommandContext(
            room_id, msg.sender, self.roles.role_of(msg.sender), msg.event_id, reply
        )
        await self.commands.run(ctx, msg.body)

    async def _loop_notice(self, room_id: str, msg: StoredMessage, members: list[str]) -> None:
        text = (
            "Loop limit reached: the personas here kept answering each other in the same "
            "pattern, so they pause until someone else speaks."
        )
        intent = self.appservice.intent
        if self.personas.bot_mxid not in members:
            persona = self.personas.get(msg.sender)
            if persona is None:
                return
            intent = self.personas.intent(persona)
        await self.sender.send_text(
            intent, room_id, text, txn_id=stable_txn_id(msg.event_id, "loop"), notice=True
        )

    async def _view(self, msg: StoredMessage) -> MessageView:
        reply_sender = thread_sender = None
        if msg.in_reply_to:
            replied = await self.messages.get(msg.in_reply_to)
            reply_sender = replied.sender if replied else None
        if msg.thread_root:
            root = await self.messages.get(msg.thread_root)
            thread_sender = root.sender if root else None
        return MessageView.from_content(
            msg.event_id,
            msg.sender,
            msg.content,
            reply_to_sender=reply_sender,
            thread_root_sender=thread_sender,
        )

    async def _room_view(self, room_id: str, members: list[str]) -> RoomView:
        settings = await self.rooms.get(room_id)
        return RoomView(
            joined_member_count=len(members),
            bot_mxid=self.personas.bot_mxid,
            persona_mxids=frozenset(m for m in members if self.personas.get(m)),
            active=settings.active,
            addressed_threads=frozenset(self._threads.get(room_id, {})),
        )

    def _remember_thread(self, room_id: str, pair: tuple[str, str]) -> None:
        threads = self._threads[room_id]
        threads[pair] = None
        while len(threads) > MAX_THREADS_PER_ROOM:
            del threads[next(iter(threads))]


def _count_guard(verdict: GuardVerdict, persona: str) -> None:
    """The loop guard's refusals: a loop (pattern or bounce limit) or the room's turn cap."""
    if verdict is GuardVerdict.TURN_CAP:
        metrics.ROUTING_RATE_LIMITED.labels("turn_cap").inc()
    else:
        metrics.ROUTING_PINGPONG_SUPPRESSED.labels(metrics.persona_label(persona)).inc()


class HandledMarks:
    """Marks routed messages as handled in batches.

    One UPDATE per message would cost a database round trip each; marks are
    flushed together a moment later instead. A crash in that moment re-routes
    a few messages at start, which replies tolerate: they are sent with stable
    transaction ids.
    """

    def __init__(self, messages: MessageStore, delay: float = 0.05) -> None:
        self.messages = messages
        self.delay = delay
        self._pending: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, event_id: str) -> None:
        self._pending.append(event_id)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._later())

    async def _later(self) -> None:
        await asyncio.sleep(self.delay)
        while True:
            try:
                await self.flush()
                return
            except Exception as e:
                if not is_connection_lost(e):
                    raise
                log.warning("could not mark messages handled (%s); again soon", type(e).__name__)
                await asyncio.sleep(max(self.delay, DB_RETRY_DELAYS_S[-1]))

    async def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self.messages.mark_handled_many(batch)
            except BaseException:
                self._pending[:0] = batch  # kept for the next flush (the UPDATE is idempotent)
                raise


def _is_edit(msg: StoredMessage) -> bool:
    relates = msg.content.get("m.relates_to")
    return isinstance(relates, dict) and relates.get("rel_type") == "m.replace"
