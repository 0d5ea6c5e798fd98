"""Messages: a command goes to the bot; otherwise each persona in the room decides.

Per persona: dispatch rules (routing/dispatch.py), the loop guard, rate limits
and budgets, then a reply job (personas/replies.py). A message resumed after a
crash first finishes the replies decided for it before the crash.
"""

from __future__ import annotations

import logging
import time

from mautrix.appservice import AppService

from .. import metrics
from ..bounded import LruDict
from ..commands.base import CommandContext, CommandTable
from ..config import Config, ConfigError
from ..db.messages import MessageStore, StoredMessage
from ..db.personas import Persona
from ..db.rooms import RoomStore
from ..matrix.content import is_edit, scene_of
from ..matrix.members import RoomMembers
from ..matrix.sender import Sender, stable_txn_id
from ..permissions import Roles
from ..personas.directory import PersonaDirectory
from ..personas.limits import Limits
from ..personas.replies import ReplyService
from ..personas.scenes import SceneService
from ..routing.dispatch import (
    ADDRESSED_REASONS,
    MessageView,
    PersonaView,
    Reason,
    RoomView,
    addressed_in_thread,
    decide,
    name_position,
    next_bounce_limit,
)
from ..routing.loop_guard import GuardVerdict, LoopGuard

log = logging.getLogger("hivebridge.handler")

#: Threads remembered per room for "follow-ups in a thread it was addressed in".
MAX_THREADS_PER_ROOM = 256
#: Rooms whose thread and limit state is kept in memory (least recently active go first).
MAX_ROOMS_CACHED = 4096

#: What the room is told when the loop guard stops personas (once per stop).
PING_PONG_NOTICE = (
    "Loop limit reached: the personas here kept answering each other in the same "
    "pattern, so they pause until someone else speaks."
)
BOUNCE_NOTICE = (
    "Loop limit reached: personas answered each other {limit} times in a row "
    "(routing.bounce_limit), so this chain ends here until someone else speaks."
)
TURN_CAP_NOTICE = (
    "Turn limit reached: personas took {cap} turns here in the last minute "
    "(routing.max_persona_turns_per_minute); they answer again in about {wait:.0f}s."
)


class MessageHandler:
    def __init__(
        self,
        config: Config,
        appservice: AppService,
        personas: PersonaDirectory,
        members: RoomMembers,
        messages: MessageStore,
        rooms: RoomStore,
        roles: Roles,
        commands: CommandTable,
        sender: Sender,
        replies: ReplyService,
        limits: Limits,
        scenes: SceneService | None = None,
    ) -> None:
        """``scenes``: the rooms' scenes (None: no scenes); their participants speak on
        their turns only."""
        self.config = config
        self.appservice = appservice
        self.personas = personas
        self.members = members
        self.messages = messages
        self.rooms = rooms
        self.roles = roles
        self.commands = commands
        self.sender = sender
        self.replies = replies
        self.limits = limits
        self.scenes = scenes
        r = config.routing
        self.loop_guard = LoopGuard(
            threshold=r.ping_pong_threshold,
            cooldown_s=r.ping_pong_cooldown_s,
            max_turns_per_minute=r.max_persona_turns_per_minute,
        )
        self._threads: LruDict[str, dict[tuple[str, str], None]] = LruDict(MAX_ROOMS_CACHED)
        # room -> event whose request was counted
        self._limit_charged: LruDict[str, str] = LruDict(MAX_ROOMS_CACHED)

    def check_config(self, config: Config) -> None:
        """The loop guard's own rules on its thresholds (a reload refuses what it would)."""
        r = config.routing
        try:
            LoopGuard().reconfigure(
                r.ping_pong_threshold, r.ping_pong_cooldown_s, r.max_persona_turns_per_minute
            )
        except ValueError as e:
            key = "ping_pong_cooldown_s" if "cooldown" in str(e) else "ping_pong_threshold"
            raise ConfigError(f"routing.{key}", str(e)) from None

    async def apply_config(self, config: Config) -> None:
        """Routing thresholds and reply settings of a reloaded config, from the next message."""
        self.config = config
        r = config.routing
        self.loop_guard.reconfigure(
            r.ping_pong_threshold, r.ping_pong_cooldown_s, r.max_persona_turns_per_minute
        )

    def forget_room(self, room_id: str) -> None:
        """Drop cached loop and thread state (after !start/!stop/!reset or leaving)."""
        self.loop_guard.forget(room_id)
        self._threads.pop(room_id, None)
        self._limit_charged.pop(room_id, None)

    def takes_command(self, msg: StoredMessage) -> bool:
        """A command for the bot (never one a persona or the bot itself wrote)."""
        return (
            msg.sender != self.personas.bot_mxid
            and not self.personas.is_ours(msg.sender)
            and self.commands.is_command(msg.body)
        )

    async def on_message(self, room_id: str, msg: StoredMessage, resumed: bool = False) -> None:
        if msg.sender == self.personas.bot_mxid:
            return
        members = await self.members.joined(room_id)
        decided: set[str] = set()
        if resumed:
            decided = await self._resume_replies(msg, members)
            if msg.handled:
                return  # routed before the crash; only its replies were unfinished
        is_ours = self.personas.is_ours(msg.sender)
        if not is_ours and self.commands.is_command(msg.body):
            await self._run_command(room_id, msg, members)
            return  # commands are the bot's; personas never answer them
        if msg.msgtype == "m.notice" or is_edit(msg.content):
            # Edits and notices trigger nobody and are no turn: counting a streamed
            # reply's edits as turns would hide the A→B pattern from the loop guard.
            return
        if is_ours and scene_of(msg.content) is not None:
            # A scene's turn drives its scene only (personas/scenes.py): nobody answers
            # it through routing and the loop guard never sees it, during the scene
            # or after, so a scene neither trips the guard nor leaves it primed.
            return
        now = time.time()
        verdict = self.loop_guard.observe(room_id, msg.sender, now, is_bot=is_ours)
        if verdict.notify:
            names = ", ".join(sorted({self._name(m) for m in verdict.pattern}))
            log.info(
                "loop guard: %s answered each other in the same pattern %d times; "
                "paused until someone else speaks",
                names,
                self.loop_guard.threshold,
                extra={"room_id": room_id},
            )
            await self._stop_notice(room_id, msg, members, None, PING_PONG_NOTICE, "loop")
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
        in_scene = self.scenes.participants(room_id) if self.scenes is not None else frozenset()
        if in_scene:
            # Participants speak on their turns only; a human addressing one makes it next.
            if not is_ours:
                await self._scene_interjection(room_id, view, room, personas, in_scene)
            personas = [p for p in personas if p.mxid not in in_scene]
        for persona in personas:
            pview = PersonaView(persona.mxid, persona.name, persona.displayname)
            decision = decide(view, pview, room)
            metrics.ROUTING_DECISIONS.labels(
                "yes" if decision.answer else "no", metrics.reason_label(decision.reason)
            ).inc()
            if decision.reason is Reason.BOUNCE_LIMIT_REACHED:
                log.info("%s suppressed: bounce_limit", persona.name, extra={"room_id": room_id})
                _count_guard(GuardVerdict.BOUNCE_LIMIT, persona.name)
                await self._guard_stop(room_id, msg, members, persona, GuardVerdict.BOUNCE_LIMIT)
                continue
            if not decision.answer:
                log.debug("%s: no (%s)", persona.name, decision.reason, extra={"room_id": room_id})
                continue
            pair = addressed_in_thread(view, pview, decision)
            if pair is not None:
                self._remember_thread(room_id, pair)
            guard = self.loop_guard.check_turn(
                room_id, persona.mxid, now, incoming_bounce_limit=view.bounce_limit
            )
            if guard is not GuardVerdict.ALLOW:
                log.info("%s suppressed: %s", persona.name, guard, extra={"room_id": room_id})
                _count_guard(guard, persona.name)
                await self._guard_stop(room_id, msg, members, persona, guard)
                continue
            if not await self._within_limits(room_id, msg, members, persona, is_ours):
                continue
            bounce = next_bounce_limit(
                view.bounce_limit if is_ours else None, self.config.routing.bounce_limit
            )
            await self.replies.reply(persona, msg, bounce, group=len(members) > 2)

    async def scene_step(self, room_id: str) -> None:
        """The next turn of the room's scene, in room order (queued by the scene)."""
        if self.scenes is not None:
            await self.scenes.step(room_id, self.loop_guard.scene_turn)

    def before_queue(self, room_id: str, msg: StoredMessage) -> None:
        """Seen as it arrives, ahead of the room's queue: ``!scene stop`` keeps any
        further turn from starting while a turn in flight finishes."""
        if self.scenes is None or self.personas.is_ours(msg.sender):
            return
        words = msg.body.split()
        prefix = self.commands.prefix
        if len(words) >= 2 and words[0].lower() == f"{prefix}scene" and words[1].lower() == "stop":
            self.scenes.request_stop(room_id)

    async def _scene_interjection(
        self,
        room_id: str,
        view: MessageView,
        room: RoomView,
        personas: list[Persona],
        in_scene: frozenset[str],
    ) -> None:
        """Tell the scene which of its personas a human message addresses, first named
        first (an m.mentions-only address counts after those named in the text)."""
        addressed: list[tuple[int, str]] = []
        for persona in personas:
            if persona.mxid not in in_scene:
                continue
            pview = PersonaView(persona.mxid, persona.name, persona.displayname)
            if decide(view, pview, room).reason in ADDRESSED_REASONS:
                pos = name_position(view.body, pview)
                addressed.append((len(view.body) if pos is None else pos, persona.name))
        assert self.scenes is not None
        names = [name for _, name in sorted(addressed)]
        await self.scenes.on_human(room_id, view.event_id, names)

    async def _resume_replies(self, msg: StoredMessage, members: list[str]) -> set[str]:
        """Finish the replies to ``msg`` decided before a restart.

        Returns the personas that have a reply job for it: routing never decides
        for them again (idempotent resume), whatever the job's state. Pending
        jobs are answered now; a persona no longer in the room fails its job.
        """
        jobs = self.replies.jobs
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
            scene = self.scenes.turn_of(msg.room_id, persona) if self.scenes else None
            await self.replies.reply(
                persona, msg, job.bounce_limit, group=len(members) > 2, job=job, scene=scene
            )
        return set(found)

    async def _within_limits(
        self, room_id: str, msg: StoredMessage, members: list[str], persona: Persona, is_ours: bool
    ) -> bool:
        """Rate and budgets (personas/limits.py); over a limit, one notice, then quiet.

        One message costs its sender one request however many personas answer it.
        """
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
            room_id,
            msg.sender,
            self.roles.role_of(msg.sender),
            msg.event_id,
            reply,
            prefix=self.commands.prefix,
        )
        await self.commands.run(ctx, msg.body)

    async def _guard_stop(
        self,
        room_id: str,
        msg: StoredMessage,
        members: list[str],
        persona: Persona,
        verdict: GuardVerdict,
    ) -> None:
        """Announce a stop by the bounce limit or the turn cap, once (see LoopGuard.announce).

        A ping-pong suppression is announced when the pattern trips, not here.
        """
        if verdict is GuardVerdict.PING_PONG or not self.loop_guard.announce(room_id, verdict):
            return
        r = self.config.routing
        if verdict is GuardVerdict.BOUNCE_LIMIT:
            log.info(
                "loop guard: personas answered each other until the bounce limit (%d hops); "
                "the chain ends here",
                r.bounce_limit,
                extra={"room_id": room_id},
            )
            text = BOUNCE_NOTICE.format(limit=r.bounce_limit)
        else:
            wait = self.loop_guard.turn_retry_after(room_id, time.time())
            log.info(
                "loop guard: personas took %d turns in a minute; quiet for %.0fs",
                r.max_persona_turns_per_minute,
                wait,
                extra={"room_id": room_id},
            )
            text = TURN_CAP_NOTICE.format(cap=r.max_persona_turns_per_minute, wait=max(1, wait))
        await self._stop_notice(room_id, msg, members, persona, text, str(verdict))

    async def _stop_notice(
        self,
        room_id: str,
        msg: StoredMessage,
        members: list[str],
        persona: Persona | None,
        text: str,
        tag: str,
    ) -> None:
        """One notice from the bot; in a room without it, from the persona speaking."""
        intent = self.appservice.intent
        if self.personas.bot_mxid not in members:
            speaker = self.personas.get(msg.sender) or persona
            if speaker is None:
                return
            intent = self.personas.intent(speaker)
        await self.sender.send_text(
            intent, room_id, text, txn_id=stable_txn_id(msg.event_id, tag), notice=True
        )

    def _name(self, mxid: str) -> str:
        persona = self.personas.get(mxid)
        return persona.name if persona is not None else mxid

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
            addressed_threads=frozenset(self._threads.get(room_id) or {}),
        )

    def _remember_thread(self, room_id: str, pair: tuple[str, str]) -> None:
        threads = self._threads.setdefault(room_id, dict)
        threads[pair] = None
        while len(threads) > MAX_THREADS_PER_ROOM:
            del threads[next(iter(threads))]


def _count_guard(verdict: GuardVerdict, persona: str) -> None:
    """The loop guard's refusals: a loop (pattern or bounce limit) or the room's turn cap."""
    if verdict is GuardVerdict.TURN_CAP:
        metrics.ROUTING_RATE_LIMITED.labels("turn_cap").inc()
    else:
        metrics.ROUTING_PINGPONG_SUPPRESSED.labels(metrics.persona_label(persona)).inc()
