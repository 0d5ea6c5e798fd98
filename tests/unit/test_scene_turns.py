"""Who speaks next in a scene: round robin, mention order, skips, human interjection."""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from hivebridge.routing.dispatch import PersonaView
from hivebridge.routing.loop_guard import GuardVerdict, LoopGuard
from hivebridge.routing.scene_turns import (
    SceneEnd,
    SceneOrder,
    SceneView,
    Skip,
    TurnDecision,
    Why,
    after_human,
    mentioned_in_order,
    next_turn,
    scene_note,
)

ABC = ("ada", "bob", "cy")


def play(scene: SceneView, unavailable: dict[str, str] | None = None) -> list[str]:
    """Every speaker of a scene played to its end, with nobody interrupting."""
    spoken = []
    while (d := next_turn(scene, unavailable=unavailable)).speaker is not None:
        spoken.append(d.speaker)
        scene = replace(scene, turns_taken=scene.turns_taken + 1, last_speaker=d.speaker)
    return spoken


# --- round robin ---------------------------------------------------------------------------


def test_round_robin_in_start_order_for_exactly_the_budget() -> None:
    assert play(SceneView(ABC, max_turns=6)) == ["ada", "bob", "cy", "ada", "bob", "cy"]
    assert play(SceneView(ABC, max_turns=4)) == ["ada", "bob", "cy", "ada"]


def test_first_turn_opens_then_round_robin() -> None:
    first = next_turn(SceneView(ABC, max_turns=3))
    assert first == TurnDecision("ada", Why.OPENING)
    second = next_turn(SceneView(ABC, max_turns=3, turns_taken=1, last_speaker="ada"))
    assert second == TurnDecision("bob", Why.ROUND_ROBIN)


def test_budget_spent_ends_the_scene() -> None:
    done = next_turn(SceneView(ABC, max_turns=2, turns_taken=2, last_speaker="bob"))
    assert done.speaker is None and done.end is SceneEnd.TURNS


def test_last_speaker_gone_from_the_scene_starts_over() -> None:
    d = next_turn(SceneView(ABC, max_turns=5, turns_taken=1, last_speaker="zed"))
    assert d.speaker == "ada" and d.why is Why.ROUND_ROBIN


@given(
    n=st.integers(min_value=2, max_value=6),
    turns=st.integers(min_value=1, max_value=30),
)
def test_round_robin_properties(n: int, turns: int) -> None:
    names = tuple(f"p{i}" for i in range(n))
    spoken = play(SceneView(names, max_turns=turns))
    assert len(spoken) == turns  # exactly the budget
    assert all(a != b for a, b in itertools.pairwise(spoken))  # nobody twice in a row
    assert spoken == [names[i % n] for i in range(turns)]  # fair: start order, cyclic


# --- mention order -------------------------------------------------------------------------


def test_mention_order_follows_the_named_persona() -> None:
    scene = SceneView(ABC, max_turns=6, turns_taken=1, last_speaker="ada", order=SceneOrder.MENTION)
    d = next_turn(scene, mentioned=["cy", "bob"])
    assert d == TurnDecision("cy", Why.MENTIONED)


def test_mention_order_ignores_the_speaker_naming_itself_and_strangers() -> None:
    scene = SceneView(ABC, max_turns=6, turns_taken=1, last_speaker="ada", order=SceneOrder.MENTION)
    assert next_turn(scene, mentioned=["ada", "zed"]) == TurnDecision("bob", Why.ROUND_ROBIN)
    assert next_turn(scene, mentioned=["ada", "cy"]).speaker == "cy"


def test_round_robin_order_ignores_mentions() -> None:
    scene = SceneView(ABC, max_turns=6, turns_taken=1, last_speaker="ada")
    assert next_turn(scene, mentioned=["cy"]).speaker == "bob"


def test_mentioned_in_order_reads_names_pills_and_display_names() -> None:
    views = [
        PersonaView("@hive_ada:x", "ada", "Ada Lovelace"),
        PersonaView("@hive_bob:x", "bob", "Bob"),
        PersonaView("@hive_cy:x", "cy", None),
    ]
    assert mentioned_in_order("What do you think, Bob? And Ada Lovelace?", views) == ["bob", "ada"]
    assert mentioned_in_order("@hive_cy:x first, then ada", views) == ["cy", "ada"]
    assert mentioned_in_order("nobody here; bobcat is no name", views) == []


# --- skips ---------------------------------------------------------------------------------


def test_unavailable_persona_is_skipped_with_its_reason() -> None:
    scene = SceneView(ABC, max_turns=6, turns_taken=1, last_speaker="ada")
    d = next_turn(scene, unavailable={"bob": "it is over its daily token budget"})
    assert d.speaker == "cy"
    assert d.skipped == (Skip("bob", "it is over its daily token budget"),)


def test_skipped_persona_does_not_spend_turns() -> None:
    spoken = play(SceneView(ABC, max_turns=4), unavailable={"bob": "model unavailable"})
    assert spoken == ["ada", "cy", "ada", "cy"]


def test_nobody_available_ends_instead_of_stalling() -> None:
    d = next_turn(SceneView(ABC, max_turns=6), unavailable={n: "gone" for n in ABC})
    assert d.speaker is None and d.end is SceneEnd.NOBODY
    assert [s.persona for s in d.skipped] == ["ada", "bob", "cy"]


@given(
    blocked=st.sets(st.sampled_from(ABC)),
    last=st.sampled_from((None, *ABC)),
    requested=st.sampled_from((None, *ABC)),
)
def test_a_blocked_persona_never_speaks(
    blocked: set[str], last: str | None, requested: str | None
) -> None:
    scene = SceneView(ABC, max_turns=9, turns_taken=0 if last is None else 1)
    scene = replace(scene, last_speaker=last, requested=requested)
    d = next_turn(scene, unavailable={b: "no" for b in blocked})
    assert d.speaker not in blocked
    assert (d.speaker is None) == (blocked == set(ABC))
    assert {s.persona for s in d.skipped} <= blocked


# --- humans --------------------------------------------------------------------------------


def test_human_addressing_a_participant_makes_it_next() -> None:
    scene = SceneView(ABC, max_turns=6, turns_taken=1, last_speaker="ada")
    asked = after_human(scene, ["zed", "cy", "bob"])
    assert asked.requested == "cy"
    assert next_turn(asked) == TurnDecision("cy", Why.HUMAN)
    # After cy's turn, round robin carries on from cy.
    later = replace(asked, turns_taken=2, last_speaker="cy", requested=None)
    assert next_turn(later).speaker == "ada"


def test_human_request_beats_mention_order_and_may_repeat_a_speaker() -> None:
    scene = SceneView(ABC, max_turns=6, turns_taken=1, last_speaker="ada", order=SceneOrder.MENTION)
    asked = after_human(scene, ["ada"])
    assert next_turn(asked, mentioned=["bob"]) == TurnDecision("ada", Why.HUMAN)


def test_human_addressing_nobody_in_the_scene_changes_nothing() -> None:
    scene = SceneView(ABC, max_turns=6, turns_taken=1, last_speaker="ada")
    assert after_human(scene, []) is scene
    assert after_human(scene, ["zed"]) is scene


def test_requested_but_unavailable_falls_back_to_the_next_one() -> None:
    scene = SceneView(ABC, max_turns=6, turns_taken=1, last_speaker="ada", requested="cy")
    d = next_turn(scene, unavailable={"cy": "it left the room"})
    assert d.speaker == "ada" and d.why is Why.ROUND_ROBIN
    assert d.skipped == (Skip("cy", "it left the room"),)


def test_budget_holds_even_when_a_human_asks() -> None:
    scene = SceneView(ABC, max_turns=2, turns_taken=2, last_speaker="bob", requested="ada")
    assert next_turn(scene).end is SceneEnd.TURNS


# --- what speakers are told, and the loop guard --------------------------------------------


def test_scene_note_names_topic_length_and_the_others() -> None:
    note = scene_note("Ada", ["Bob", "Cy"], "a lighthouse", 6)
    assert "Ada" in note and "Bob, Cy" in note and "a lighthouse" in note and "6 turns" in note


def test_scene_turns_pass_the_pattern_detector_but_not_the_turn_cap() -> None:
    guard = LoopGuard(threshold=2, max_turns_per_minute=3)
    # A tripped ping-pong between two personas outside a scene...
    for i, sender in enumerate(["@a:x", "@b:x"] * 2):
        guard.observe("!r", sender, float(i), is_bot=True)
    assert guard.check_turn("!r", "@a:x", 5.0) is GuardVerdict.PING_PONG
    # ...does not stop a scene turn, and neither does a spent bounce limit;
    assert guard.scene_turn("!r", 5.0) == 0.0
    # the room's turns per minute still do (the scene waits).
    assert guard.scene_turn("!r", 6.0) == 0.0
    assert guard.scene_turn("!r", 7.0) == 0.0
    wait = guard.scene_turn("!r", 8.0)
    assert wait == 57.0  # the first of the three turns leaves the window at 65 s
    assert guard.scene_turn("!r", 8.0 + wait) == 0.0
