"""Scenes: personas that talk to each other on purpose, turn by turn, within a budget.

``!scene start`` stores a scene (``db/scenes.py``); the room's ordered queue then
runs one :meth:`SceneService.step` at a time: pick the speaker
(``routing/scene_turns.py``), skip with a one-line notice whoever cannot speak
(gone, over a budget, model unavailable), wait for the room's persona turns per
minute, count the turn, and let the speaker answer the room's latest message
through the normal reply path (:mod:`.replies`) with the scene's note in its
prompt. When the reply is out the next step is queued behind whatever arrived
meanwhile, so a human message or ``!scene stop`` sent during a turn is handled
before the next turn starts. A scene turn's message is marked with the scene
(``matrix/content.py``): no persona answers it through routing and the loop
guard does not count it, during the scene or after.

``!scene stop`` lets a reply in flight finish (it is already streaming into the
room) and starts no further turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from .. import metrics
from ..config import Config
from ..db.messages import MessageStore, StoredMessage
from ..db.personas import Persona
from ..db.rooms import RoomStore
from ..db.scenes import Scene, SceneStore
from ..matrix.content import is_edit
from ..matrix.members import RoomMembers
from ..matrix.sender import Sender, stable_txn_id
from ..routing.dispatch import PersonaView
from ..routing.scene_turns import (
    SceneEnd,
    SceneOrder,
    SceneView,
    Skip,
    after_human,
    mentioned_in_order,
    next_turn,
    scene_note,
)
from .directory import PersonaDirectory
from .history import SceneCue
from .limits import Limits
from .replies import ReplyService, SceneTurn

log = logging.getLogger("hivebridge.scenes")

#: Messages read back to find what the next speaker answers (the room's latest).
TRIGGER_SCAN = 50

#: ``wake(room_id, delay_s)``: queue a scene step for the room after ``delay_s``.
Wake = Callable[[str, float], None]
#: ``turn_wait(room_id, now)``: 0 when the room's turn cap allows a turn (taken), else
#: the seconds to wait.
TurnWait = Callable[[str, float], float]


class SceneError(Exception):
    """What is wrong with a scene request; its text is the whole reply."""


class SceneService:
    """Owns every room's scene: start, stop, status, and the turn driver."""

    def __init__(
        self,
        config: Config,
        personas: PersonaDirectory,
        members: RoomMembers,
        messages: MessageStore,
        rooms: RoomStore,
        store: SceneStore,
        replies: ReplyService,
        limits: Limits,
        sender: Sender,
        *,
        model_problem: Callable[[Persona], str | None],
        wake: Wake,
    ) -> None:
        """``model_problem(persona)``: why its model cannot answer now, None when it can.
        ``wake``: queues a step on the room's ordered queue (the event handler's)."""
        self.config = config
        self.personas = personas
        self.members = members
        self.messages = messages
        self.rooms = rooms
        self.store = store
        self.replies = replies
        self.limits = limits
        self.sender = sender
        self.model_problem = model_problem
        self.wake = wake
        self._active: dict[str, Scene] = {}
        self._stopping: set[str] = set()

    async def apply_config(self, config: Config) -> None:
        """Reloaded bounds hold for the next ``!scene start``; running scenes keep theirs."""
        self.config = config

    async def load(self) -> list[str]:
        """Read the active scenes (after a restart); returns their rooms, to be woken."""
        self._active = {s.room_id: s for s in await self.store.all_active()}
        return list(self._active)

    # --- what routing asks ----------------------------------------------------------

    def active(self, room_id: str) -> Scene | None:
        return self._active.get(room_id)

    def participants(self, room_id: str) -> frozenset[str]:
        """The user ids of the active scene's personas (they speak on their turn only)."""
        scene = self._active.get(room_id)
        if scene is None:
            return frozenset()
        return frozenset(self.personas.config.persona_mxid(n) for n in scene.personas)

    def turn_of(self, room_id: str, persona: Persona) -> SceneTurn | None:
        """The turn ``persona`` was taking when the bridge stopped (a resumed reply)."""
        scene = self._active.get(room_id)
        if scene is None or scene.last_speaker != persona.name:
            return None
        return SceneTurn(scene.id, self._cue(scene, persona))

    async def on_human(self, room_id: str, event_id: str, addressed: list[str]) -> None:
        """A human spoke during the scene (``event_id``), addressing ``addressed`` (persona
        names, first named first): the first participant among them answers it next."""
        scene = self._active.get(room_id)
        if scene is None:
            return
        view = _view(scene)
        after = after_human(view, addressed)
        if after is view:
            return  # it addressed none of the scene's personas
        await self.store.request(scene.id, after.requested, event_id)
        self._active[room_id] = replace(scene, requested=after.requested, requested_event=event_id)

    def request_stop(self, room_id: str) -> None:
        """``!scene stop`` arrived: no turn starts from now, even before the command runs
        (it waits in the room's queue behind a turn in flight)."""
        if room_id in self._active:
            self._stopping.add(room_id)

    # --- commands -------------------------------------------------------------------

    async def start(
        self,
        room_id: str,
        starter: str,
        names: list[str],
        *,
        turns: int | None,
        topic: str,
        order: str,
    ) -> Scene:
        """Start a scene of ``names`` (persona names, speaking order); raises
        :class:`SceneError` with the reason it cannot."""
        cfg = self.config.scenes
        prefix = self.config.routing.command_prefix
        names = [_name_of(n, self.personas) for n in names]
        if len(set(names)) != len(names):
            raise SceneError("Name each persona once.")
        if not 2 <= len(names) <= cfg.max_personas:
            raise SceneError(f"A scene needs 2 to {cfg.max_personas} personas.")
        turns = cfg.default_turns if turns is None else turns
        if not 1 <= turns <= cfg.max_turns:
            raise SceneError(f"turns must be between 1 and {cfg.max_turns}.")
        members = set(await self.members.joined(room_id))
        for name in names:
            persona = self.personas.get(self.personas.config.persona_mxid(name))
            if persona is None:
                raise SceneError(f"No persona named {name!r}; {prefix}persona list shows them.")
            if persona.mxid not in members:
                raise SceneError(f"{persona.displayname} is not in this room.")
        if not (await self.rooms.get(room_id)).active:
            raise SceneError(f"Personas are silent here; {prefix}start first.")
        verdict = await self.limits.check(starter, room_id, None)
        if not verdict.allowed:
            raise SceneError(verdict.message or "You are over a limit; try again later.")
        scene = await self.store.create(
            room_id, tuple(names), SceneOrder(order).value, topic.strip(), turns, starter
        )
        if scene is None:
            raise SceneError(f"A scene is already running here; {prefix}scene stop ends it.")
        self._active[room_id] = scene
        self._stopping.discard(room_id)
        metrics.SCENES_STARTED.inc()
        log.info("scene %d started: %s", scene.id, ", ".join(names), extra={"room_id": room_id})
        self.wake(room_id, 0.0)
        return scene

    async def stop(self, room_id: str, by: str) -> Scene | None:
        """End the room's scene (``!scene stop``); None when none runs."""
        self._stopping.discard(room_id)
        scene = await self.store.active(room_id)
        if scene is None:
            self._active.pop(room_id, None)
            return None
        reason = "stopped_by_starter" if by == scene.started_by else "stopped_by_other"
        await self._end(scene, "stopped", reason, stopped_by=by)
        return await self.store.get(scene.id)

    async def status(self, room_id: str) -> Scene | None:
        """The room's scene: the active one, else the last one (None: never had one)."""
        return await self.store.latest(room_id)

    # --- the turn driver ------------------------------------------------------------

    async def step(self, room_id: str, turn_wait: TurnWait) -> None:
        """Take the next turn of the room's scene (run on the room's ordered queue)."""
        scene = self._active.get(room_id)
        if scene is None or room_id in self._stopping:
            return
        if not (await self.rooms.get(room_id)).active:
            await self._end(scene, "room_stopped", "room_stopped")
            await self._notice(scene, "end", "🎬 Scene over: the personas here were stopped.")
            return
        trigger = await self._trigger(scene)
        if trigger is None:
            await self._end(scene, "nobody", "nobody")
            return
        views = self._views(scene)
        mentioned: list[str] = []
        if scene.order == SceneOrder.MENTION and trigger.persona in scene.personas:
            mentioned = mentioned_in_order(trigger.body, views)
        decision = next_turn(
            _view(scene), mentioned=mentioned, unavailable=await self._unavailable(scene)
        )
        if decision.speaker is None:
            await self._skipped(scene, decision.skipped)
            if decision.end is SceneEnd.TURNS:
                await self._finish(scene)
            else:
                await self._end(scene, "nobody", "nobody")
                await self._notice(
                    scene, "end", "🎬 Scene over: none of its personas can speak now."
                )
            return
        wait = turn_wait(room_id, time.time())
        if wait > 0:
            # The room's persona turns per minute: the scene pauses, it does not skip.
            log.info(
                "scene %d waits %.1fs for the turn cap", scene.id, wait, extra={"room_id": room_id}
            )
            self.wake(room_id, wait)
            return
        await self._skipped(scene, decision.skipped)
        speaker = self.personas.get(self.personas.config.persona_mxid(decision.speaker))
        assert speaker is not None  # _unavailable names a persona that is gone
        if not await self.store.take_turn(scene.id, speaker.name):
            self._active.pop(room_id, None)  # ended meanwhile
            return
        turn = scene.turns_taken + 1
        scene = replace(
            scene,
            turns_taken=turn,
            last_speaker=speaker.name,
            requested=None,
            requested_event=None,
        )
        self._active[room_id] = scene
        metrics.SCENE_TURNS.labels(metrics.persona_label(speaker.name)).inc()
        log.info(
            "scene %d turn %d/%d: %s (%s)",
            scene.id,
            turn,
            scene.max_turns,
            speaker.name,
            decision.why,
            extra={"room_id": room_id},
        )
        try:
            await self.replies.reply(
                speaker,
                trigger,
                self.config.routing.bounce_limit,
                group=True,
                scene=SceneTurn(scene.id, self._cue(scene, speaker)),
            )
        except Exception:
            # The turn is spent either way; a failed send must not stall the scene.
            log.warning("scene %d: turn %d failed", scene.id, turn, exc_info=True)
        current = self._active.get(room_id)
        if current is None or current.id != scene.id or room_id in self._stopping:
            return  # stopped while the turn ran
        if scene.turns_taken >= scene.max_turns:
            await self._finish(scene)
        else:
            self.wake(room_id, 0.0)

    # --- helpers --------------------------------------------------------------------

    def _views(self, scene: Scene) -> list[PersonaView]:
        views = []
        for name in scene.personas:
            persona = self.personas.get(self.personas.config.persona_mxid(name))
            if persona is not None:
                views.append(PersonaView(persona.mxid, persona.name, persona.displayname))
        return views

    def _cue(self, scene: Scene, speaker: Persona) -> SceneCue:
        others = [
            p.displayname
            for n in scene.personas
            if n != speaker.name
            and (p := self.personas.get(self.personas.config.persona_mxid(n))) is not None
        ]
        opening = (
            f"Begin the scene. The topic: {scene.topic}" if scene.topic else "Begin the scene."
        )
        return SceneCue(
            scene_note(speaker.displayname, others, scene.topic, scene.max_turns), opening
        )

    async def _trigger(self, scene: Scene) -> StoredMessage | None:
        """What the next speaker answers: the human message that asked for it, else the
        room's latest message since the scene started (a human's or the last turn's),
        the start command at first."""
        if scene.requested_event is not None:
            asked = await self.messages.get(scene.requested_event)
            if asked is not None:
                return asked
        prefix = self.config.routing.command_prefix
        since = scene.started_at - 5 * 60_000  # the start command came before the row
        found = await self.messages.recent(scene.room_id, since, TRIGGER_SCAN)
        opening: StoredMessage | None = None
        for m in reversed(found):
            if m.msgtype == "m.notice" or not m.body or is_edit(m.content):
                continue
            if m.body.startswith(prefix) and not m.persona:
                if opening is None and _starts_scene(m.body, prefix):
                    opening = m
                continue
            if m.ts >= scene.started_at or scene.turns_taken > 0:
                return m
        return opening

    async def _unavailable(self, scene: Scene) -> dict[str, str]:
        """Participants that cannot speak now, and why (one line each)."""
        members = set(await self.members.joined(scene.room_id))
        out: dict[str, str] = {}
        for name in scene.personas:
            persona = self.personas.get(self.personas.config.persona_mxid(name))
            if persona is None:
                out[name] = "it no longer exists"
                continue
            if persona.mxid not in members:
                out[name] = "it left the room"
                continue
            problem = self.model_problem(persona)
            if problem:
                out[name] = problem
                continue
            verdict = await self.limits.check(scene.started_by, scene.room_id, name, spend=False)
            if not verdict.allowed:
                out[name] = _limit_reason(verdict.scope)
        return out

    async def _skipped(self, scene: Scene, skipped: tuple[Skip, ...]) -> None:
        for skip in skipped:
            persona = self.personas.get(self.personas.config.persona_mxid(skip.persona))
            who = persona.displayname if persona is not None else skip.persona
            await self._notice(
                scene,
                f"skip-{scene.turns_taken}-{skip.persona}",
                f"⏭️ {who} skips this turn: {skip.reason}.",
            )

    async def _finish(self, scene: Scene) -> None:
        await self._end(scene, "turns", "turns")
        await self._notice(
            scene,
            "end",
            f"🎬 Scene over: {scene.turns_taken} of {scene.max_turns} turns "
            f"({', '.join(scene.personas)}).",
        )

    async def _end(
        self, scene: Scene, reason: str, metric: str, stopped_by: str | None = None
    ) -> None:
        self._active.pop(scene.room_id, None)
        self._stopping.discard(scene.room_id)
        if await self.store.end(scene.id, reason, stopped_by):
            metrics.SCENES_ENDED.labels(metrics.bounded(metric, metrics.SCENE_END_REASONS)).inc()
            log.info("scene %d ended: %s", scene.id, metric, extra={"room_id": scene.room_id})

    async def _notice(self, scene: Scene, tag: str, text: str) -> None:
        """A notice from the bot (from the first participant in a room without it)."""
        members = await self.members.joined(scene.room_id)
        intent = self.personas.appservice.intent
        if self.personas.bot_mxid not in members:
            speakers = [p for n in scene.personas if (p := self._persona(n)) is not None]
            if not speakers:
                return
            intent = self.personas.intent(speakers[0])
        await self.sender.send_text(
            intent,
            scene.room_id,
            text,
            txn_id=stable_txn_id(f"scene:{scene.id}", tag),
            notice=True,
        )

    def _persona(self, name: str) -> Persona | None:
        return self.personas.get(self.personas.config.persona_mxid(name))


def _view(scene: Scene) -> SceneView:
    return SceneView(
        personas=scene.personas,
        max_turns=scene.max_turns,
        turns_taken=scene.turns_taken,
        order=SceneOrder(scene.order),
        last_speaker=scene.last_speaker,
        requested=scene.requested,
    )


def _name_of(typed: str, personas: PersonaDirectory) -> str:
    """A persona name from a name or a persona's user id."""
    persona = personas.get(typed) if typed.startswith("@") else None
    return persona.name if persona is not None else typed


def _starts_scene(body: str, prefix: str) -> bool:
    words = body[len(prefix) :].split()
    return len(words) >= 2 and words[0].lower() == "scene" and words[1].lower() == "start"


def _limit_reason(scope: str) -> str:
    return {
        "persona": "it is over its daily token budget",
        "room": "this room's daily token budget is used up",
        "daily_budget": "the scene's starter is over their daily token budget",
    }.get(scope, "it is over a limit")
