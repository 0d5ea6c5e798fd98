"""Who speaks next in a scene: a directed conversation between personas with a turn budget.

Pure rules over plain data, like the rest of ``routing/``: the caller describes the
scene (:class:`SceneView`), says who cannot speak now and why, and which participants
the last message named, and gets one :class:`TurnDecision` back. Nothing here reads
the database, the clock or Matrix.

The rules, in order:

1. the scene's budget: after ``max_turns`` turns the scene ends (``turns``);
2. a human who addressed a participant since the last turn (``requested``): that
   persona speaks next;
3. ``order="mention"``: the first participant named in the last reply (other than its
   author) speaks next;
4. otherwise round robin: the participant after the last speaker, in the order the
   scene was started with (the first one opens the scene).

A candidate that cannot speak (rate limited, over budget, model unavailable, gone) is
skipped with its reason and the next one in round-robin order is tried; when nobody
can speak the scene ends (``nobody``) instead of stalling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from .dispatch import PersonaView, name_position

__all__ = [
    "SceneEnd",
    "SceneOrder",
    "SceneView",
    "Skip",
    "TurnDecision",
    "Why",
    "after_human",
    "mentioned_in_order",
    "next_turn",
    "scene_note",
]


class SceneOrder(StrEnum):
    ROUND_ROBIN = "round_robin"
    MENTION = "mention"


class Why(StrEnum):
    """Why this persona speaks now."""

    OPENING = "opening"  # the first turn of the scene
    ROUND_ROBIN = "round_robin"
    MENTIONED = "mentioned"  # named in the last reply (order=mention)
    HUMAN = "human"  # a human addressed it during the scene


class SceneEnd(StrEnum):
    """Why a scene is over; the ``stopped`` reasons come from a command, not from here."""

    TURNS = "turns"  # the budget is spent
    NOBODY = "nobody"  # no participant can speak


@dataclass(frozen=True, slots=True)
class SceneView:
    """A scene as the policy sees it; participants are persona names, in speaking order."""

    personas: tuple[str, ...]
    max_turns: int
    turns_taken: int = 0
    order: SceneOrder = SceneOrder.ROUND_ROBIN
    last_speaker: str | None = None
    #: A participant a human addressed since the last turn: it speaks next.
    requested: str | None = None


@dataclass(frozen=True, slots=True)
class Skip:
    persona: str
    reason: str  # one line for the room, e.g. "over its daily token budget"


@dataclass(frozen=True, slots=True)
class TurnDecision:
    """``speaker`` None means the scene ends (``end`` says why)."""

    speaker: str | None
    why: Why | None = None
    skipped: tuple[Skip, ...] = ()
    end: SceneEnd | None = None


def next_turn(
    scene: SceneView,
    *,
    mentioned: Sequence[str] = (),
    unavailable: Mapping[str, str] | None = None,
) -> TurnDecision:
    """Who takes the next turn of ``scene``.

    ``mentioned``: participants named in the last reply, in the order they appear
    (read only with ``order="mention"``). ``unavailable``: participant -> why it cannot
    speak now.
    """
    if scene.turns_taken >= scene.max_turns:
        return TurnDecision(None, end=SceneEnd.TURNS)
    blocked = unavailable or {}
    first, why = _preferred(scene, mentioned)
    skipped: list[Skip] = []
    for candidate in _round_from(scene.personas, first):
        if candidate in blocked:
            skipped.append(Skip(candidate, blocked[candidate]))
            why = Why.ROUND_ROBIN if scene.last_speaker is not None else Why.OPENING
            continue
        return TurnDecision(candidate, why, tuple(skipped))
    return TurnDecision(None, skipped=tuple(skipped), end=SceneEnd.NOBODY)


def after_human(scene: SceneView, addressed: Sequence[str]) -> SceneView:
    """The scene after a human message that addressed ``addressed`` (any personas, in the
    order the message names them): the first participant among them speaks next."""
    wanted = next((p for p in addressed if p in scene.personas), None)
    return scene if wanted is None else replace(scene, requested=wanted)


def _preferred(scene: SceneView, mentioned: Sequence[str]) -> tuple[str, Why]:
    if scene.requested in scene.personas:
        return scene.requested, Why.HUMAN
    if scene.order is SceneOrder.MENTION:
        named = next(
            (p for p in mentioned if p in scene.personas and p != scene.last_speaker), None
        )
        if named is not None:
            return named, Why.MENTIONED
    if scene.last_speaker not in scene.personas:
        return scene.personas[0], Why.OPENING if scene.last_speaker is None else Why.ROUND_ROBIN
    i = scene.personas.index(scene.last_speaker)
    return scene.personas[(i + 1) % len(scene.personas)], Why.ROUND_ROBIN


def _round_from(personas: tuple[str, ...], first: str) -> list[str]:
    i = personas.index(first)
    return list(personas[i:] + personas[:i])


def mentioned_in_order(body: str, personas: Sequence[PersonaView]) -> list[str]:
    """The personas ``body`` names (display name, localpart or user id), first named first;
    returns their localparts (persona names)."""
    found = [(pos, p.localpart) for p in personas if (pos := name_position(body, p)) is not None]
    return [name for _, name in sorted(found)]


def scene_note(speaker: str, others: Sequence[str], topic: str, max_turns: int) -> str:
    """What a speaker is told about the scene, after its own system prompt.

    The same for all of a speaker's turns (no turn counter), so the local engine
    reuses the prompt's cached prefix from one turn to the next."""
    with_whom = ", ".join(others) if others else "the others"
    about = f" The topic: {topic}." if topic else ""
    return (
        f"You are {speaker} in a scene with {with_whom}.{about} "
        f"The scene lasts {max_turns} turns. Add one short contribution in character "
        "and speak to the others by name."
    )
