"""Prompt assembly: roles, budget, append-only prefixes, summaries, rollback."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivebridge.conversation.context import (
    MESSAGE_OVERHEAD,
    SUMMARY_HEADER,
    TRUNCATION_MARKER,
    Prompt,
    Turn,
    apply_reset,
    build_prompt,
    build_summary_request,
    render_turn,
    rollback,
    select_turns,
    summary_due,
    system_content,
)
from hivebridge.inference.types import ChatMessage


def chars(text: str) -> int:
    """A deterministic stand-in tokenizer: one token per character."""
    return len(text)


def words(text: str) -> int:
    return len(text.split())


def turn(
    i: int,
    body: str | None = None,
    *,
    me: bool = False,
    name: str = "Alice",
    thread: str | None = None,
) -> Turn:
    return Turn(
        event_id=f"$ev{i}",
        sender_mxid="@bot:hs" if me else f"@{name.lower()}:hs",
        sender_name="Bot" if me else name,
        is_self=me,
        body=body if body is not None else f"message {i}",
        ts=1_700_000_000_000 + i,
        thread_root=thread,
    )


def prompt(
    turns: Sequence[Turn],
    new: Turn,
    *,
    budget: int = 10_000,
    is_group: bool = False,
    summary: str | None = None,
    system: str = "You are Bot.",
    count: object = chars,
) -> Prompt:
    return build_prompt(
        system,
        summary,
        turns,
        new,
        is_group=is_group,
        budget=budget,
        count_tokens=count,  # type: ignore[arg-type]
    )


# -- roles and rendering ----------------------------------------------------------------


def test_dm_turns_have_no_name_prefix_and_own_turns_are_assistant() -> None:
    p = prompt([turn(1, "hi"), turn(2, "hello!", me=True)], turn(3, "how are you?"))
    assert p.messages == [
        ChatMessage("system", "You are Bot."),
        ChatMessage("user", "hi"),
        ChatMessage("assistant", "hello!"),
        ChatMessage("user", "how are you?"),
    ]


def test_group_user_turns_carry_display_names_other_personas_included() -> None:
    turns = [
        turn(1, "hi all"),
        turn(2, "greetings", name="Sage"),  # another persona: still a user turn
        turn(3, "hey", me=True),
    ]
    p = prompt(turns, turn(4, "what now?", name="Bob"), is_group=True)
    assert [(m.role, m.content) for m in p.messages[1:]] == [
        ("user", "Alice: hi all"),
        ("user", "Sage: greetings"),
        ("assistant", "hey"),
        ("user", "Bob: what now?"),
    ]


def test_consecutive_user_turns_stay_separate_messages() -> None:
    p = prompt([turn(1, "a"), turn(2, "b")], turn(3, "c"))
    assert [m.content for m in p.messages[1:]] == ["a", "b", "c"]


def test_summary_goes_into_the_single_system_message() -> None:
    p = prompt([turn(1)], turn(2), summary="  They talked about cats.  ")
    system = [m for m in p.messages if m.role == "system"]
    assert len(system) == 1 and p.messages[0] is system[0]
    assert system[0].content == "You are Bot." + SUMMARY_HEADER + "They talked about cats."
    assert system_content("S", None) == "S" == system_content("S", "   ")


def test_no_ids_or_timestamps_in_the_text() -> None:
    turns = [turn(i, me=i % 2 == 1) for i in range(6)]
    p = prompt(turns, turn(6), is_group=True)
    text = "\n".join(m.content for m in p.messages)
    for t in [*turns, turn(6)]:
        assert t.event_id not in text
        assert str(t.ts) not in text
        assert t.sender_mxid not in text


def test_copy_of_new_message_in_history_is_ignored() -> None:
    new = turn(3, "latest")
    with_copy = prompt([turn(1), turn(2, me=True), new], new)
    without = prompt([turn(1), turn(2, me=True)], new)
    assert with_copy == without
    assert [m.content for m in with_copy.messages].count("latest") == 1


def test_render_turn() -> None:
    assert render_turn(turn(1, "x"), True) == ChatMessage("user", "Alice: x")
    assert render_turn(turn(1, "x"), False) == ChatMessage("user", "x")
    assert render_turn(turn(1, "x", me=True), True) == ChatMessage("assistant", "x")


# -- accounting and budget --------------------------------------------------------------


def test_accounting_adds_up() -> None:
    turns = [turn(i, f"body {i}", me=i % 2 == 1) for i in range(5)]
    p = prompt(turns, turn(5, "new"), summary="sum")
    assert p.system_tokens == len("You are Bot.") + MESSAGE_OVERHEAD
    assert p.summary_tokens == len(SUMMARY_HEADER + "sum")
    assert p.turns_tokens == sum(len(t.body) + MESSAGE_OVERHEAD for t in turns)
    assert p.new_message_tokens == len("new") + MESSAGE_OVERHEAD
    assert p.turns_included == 5 and p.turns_dropped == 0 and p.dropped_tokens == 0
    assert p.total_tokens == sum(len(m.content) + MESSAGE_OVERHEAD for m in p.messages)
    assert p.included == tuple(turns) and p.dropped == ()
    assert p.budget == 10_000 and not p.new_message_truncated


def test_trimming_drops_whole_oldest_turns_down_to_the_low_water_mark() -> None:
    # Each turn costs 10 + 4 = 14 tokens; system costs 4 + 4 = 8.
    turns = [turn(i, f"{i:010d}") for i in range(30)]
    budget = 8 + 14 * 10  # room for exactly 10 turns including the new one
    dropped_before = 0
    trims = 0
    for k in range(30):
        p = prompt(turns[:k], turns[k], budget=budget, system="S" * 4)
        assert p.total_tokens <= budget
        available = budget - p.system_tokens
        if p.turns_dropped != dropped_before:  # the window just moved: cut to 75 %
            trims += 1
            assert p.turns_tokens + p.new_message_tokens <= 0.75 * available
            assert p.turns_tokens + p.new_message_tokens + 14 > 0.75 * available
        assert p.included == tuple(turns[p.turns_dropped : k])
        assert p.dropped == tuple(turns[: p.turns_dropped])
        assert p.turns_dropped + p.turns_included == k
        assert p.dropped_tokens == 14 * p.turns_dropped
        dropped_before = p.turns_dropped
    assert trims >= 3


def test_window_start_moves_in_chunks_not_every_turn() -> None:
    turns = [turn(i, f"{i:010d}", me=i % 2 == 1) for i in range(60)]
    budget = 8 + 14 * 10
    starts = [
        prompt(turns[:k], turns[k], budget=budget, system="S" * 4).turns_dropped for k in range(60)
    ]
    assert starts == sorted(starts)
    jumps = [k for k in range(1, 60) if starts[k] != starts[k - 1]]
    # 10 fit, the window is cut to 7 (75 %) and stays put while it refills.
    assert len(jumps) >= 5
    assert all(b - a >= 3 for a, b in itertools.pairwise(jumps))


def test_oversized_new_message_is_cut_in_the_middle() -> None:
    body = "HEAD " + "filler " * 500 + " the actual question?"
    p = prompt([turn(1), turn(2, me=True)], turn(3, body), budget=300)
    last = p.messages[-1]
    assert p.new_message_truncated
    assert p.turns_included == 0 and p.turns_dropped == 2
    assert TRUNCATION_MARKER in last.content
    assert last.content.startswith("HEAD ")
    assert last.content.endswith("the actual question?")
    assert p.total_tokens <= 300
    # The kept text uses most of what is available, not a sliver of it.
    assert p.total_tokens >= 300 - 5
    head, tail = last.content.split(TRUNCATION_MARKER)
    assert len(tail) >= len(head)


def test_oversized_new_message_keeps_group_name_prefix() -> None:
    p = prompt([], turn(1, "z" * 1000, name="Carol"), budget=200, is_group=True)
    assert p.messages[-1].content.startswith("Carol: zz")
    assert p.total_tokens <= 200


def test_budget_only_exceeded_when_system_block_leaves_no_room() -> None:
    p = prompt([turn(1)], turn(2, "hello there"), budget=5, system="a long system prompt")
    assert p.new_message_truncated
    assert p.messages[-1].content == TRUNCATION_MARKER  # the marker alone
    assert p.total_tokens > 5


def test_low_water_must_be_a_fraction() -> None:
    with pytest.raises(ValueError):
        build_prompt(
            "s", None, [], turn(1), is_group=False, budget=9, count_tokens=chars, low_water=0
        )


# -- properties -------------------------------------------------------------------------

bodies = st.text(alphabet=st.sampled_from("abc xyz.\n"), min_size=0, max_size=40)
turn_lists = st.lists(
    st.tuples(bodies, st.booleans(), st.sampled_from(["Ann", "Bo"])), min_size=1, max_size=40
)


def make_turns(spec: list[tuple[str, bool, str]]) -> list[Turn]:
    return [turn(i, body, me=me, name=name) for i, (body, me, name) in enumerate(spec)]


@settings(max_examples=150, deadline=None)
@given(turn_lists, st.integers(20, 400), st.booleans(), st.sampled_from([None, "old stuff"]))
def test_same_inputs_give_identical_prompts(
    spec: list[tuple[str, bool, str]], budget: int, group: bool, summary: str | None
) -> None:
    turns = make_turns(spec)
    a = prompt(turns[:-1], turns[-1], budget=budget, is_group=group, summary=summary)
    b = prompt(list(turns[:-1]), turns[-1], budget=budget, is_group=group, summary=summary)
    assert a == b
    assert [m.content.encode() for m in a.messages] == [m.content.encode() for m in b.messages]


@settings(max_examples=150, deadline=None)
@given(turn_lists, st.integers(30, 400), st.booleans(), st.sampled_from([chars, words]))
def test_adding_a_turn_only_appends_unless_the_window_jumps(
    spec: list[tuple[str, bool, str]], budget: int, group: bool, count: object
) -> None:
    turns = make_turns(spec)
    previous: Prompt | None = None
    for k in range(len(turns)):
        p = prompt(turns[:k], turns[k], budget=budget, is_group=group, count=count)
        if previous is not None:
            assert p.turns_dropped >= previous.turns_dropped
            if p.turns_dropped == previous.turns_dropped and not previous.new_message_truncated:
                assert p.messages[: len(previous.messages)] == previous.messages
                assert len(p.messages) == len(previous.messages) + 1
        previous = p


@settings(max_examples=150, deadline=None)
@given(turn_lists, st.integers(0, 400), st.booleans(), st.sampled_from([chars, words]))
def test_budget_holds_unless_the_system_block_fills_it(
    spec: list[tuple[str, bool, str]], budget: int, group: bool, count: object
) -> None:
    turns = make_turns(spec)
    p = prompt(turns[:-1], turns[-1], budget=budget, is_group=group, count=count)
    counter = count  # same counter the prompt used
    marker_only = counter(TRUNCATION_MARKER) + MESSAGE_OVERHEAD  # type: ignore[operator]
    if budget - p.system_tokens - p.summary_tokens >= marker_only + 10:
        assert p.total_tokens <= budget
    assert p.messages[0].role == "system"
    assert p.turns_included + p.turns_dropped == len(turns) - 1
    assert p.new_message_truncated or p.messages[-1] == render_turn(turns[-1], group)
    assert p.messages[1:-1] == [render_turn(t, group) for t in p.included]


# -- selection, reset, rollback ---------------------------------------------------------


def test_select_turns_room_and_thread() -> None:
    root = turn(1, "root")
    t = [
        root,
        turn(2),
        turn(3, thread="$ev1"),
        turn(4, me=True, thread="$ev1"),
        turn(5, thread="$other"),
    ]
    assert select_turns(t, None, "room") == [root, t[1]]
    assert select_turns(t, "$ev1", "thread") == [root, t[2], t[3]]
    with pytest.raises(ValueError):
        select_turns(t, None, "thread")


def test_apply_reset() -> None:
    t = [turn(i) for i in range(5)]
    assert apply_reset(t, "$ev2") == t[3:]
    assert apply_reset(t, "$ev4") == []
    assert apply_reset(t, "$missing") == t
    assert apply_reset(t, None) == t


def test_rollback_removes_exchanges_from_the_end() -> None:
    u1, a1, u2, a2 = turn(1), turn(2, me=True), turn(3), turn(4, me=True)
    t = [u1, a1, u2, a2]
    assert rollback(t, 0) == t
    assert rollback(t, 1) == [u1, a1]
    assert rollback(t, 2) == []
    assert rollback(t, 9) == []


def test_rollback_group_and_split_replies() -> None:
    u1, u2 = turn(1, name="Ann"), turn(2, name="Bo")
    a1, a1b = turn(3, me=True), turn(4, me=True)  # one reply split in two events
    u3 = turn(5)  # unanswered: goes with the last exchange
    assert rollback([u1, u2, a1, a1b, u3], 1) == [u1]
    assert rollback([u1, u2], 1) == [u1, u2]  # nothing answered, nothing rolled back
    assert rollback([a1, u1, a1b], 2) == []  # a reply with no user turn before it


# -- summaries --------------------------------------------------------------------------


def test_summary_due_when_enough_turns_are_dropped() -> None:
    turns = [turn(i, f"{i:010d}") for i in range(40)]
    p = prompt(turns, turn(40, "x" * 10), budget=8 + 14 * 10, system="S" * 4)
    assert p.turns_dropped >= 8
    assert summary_due(p)
    assert not summary_due(p, min_dropped_turns=p.turns_dropped + 1)
    assert not summary_due(p, min_dropped_tokens=p.dropped_tokens + 1)
    small = prompt(turns[:3], turn(3))
    assert not summary_due(small) and not summary_due(small, min_dropped_turns=0)


def test_summary_request_covers_dropped_turns_with_names() -> None:
    turns = [turn(1, "I like tea"), turn(2, "noted", me=True), turn(3, "and cake", name="Bo")]
    req = build_summary_request(
        turns, "Earlier: hello.", budget=10_000, count_tokens=chars, persona_name="Bot"
    )
    assert [m.role for m in req.messages] == ["system", "user"]
    assert "Bot" in req.messages[0].content
    user = req.messages[1].content
    assert "Previous summary:\nEarlier: hello." in user
    assert user.endswith("Alice: I like tea\nBot: noted\nBo: and cake")
    assert req.covered == tuple(turns)
    assert (req.up_to_event_id, req.up_to_ts) == ("$ev3", turns[-1].ts)
    assert "$ev" not in user


def test_summary_request_respects_its_budget() -> None:
    turns = [turn(i, "x" * 50) for i in range(20)]
    req = build_summary_request(turns, None, budget=600, count_tokens=chars)
    assert 0 < len(req.covered) < 20
    assert req.covered == tuple(turns[: len(req.covered)])
    assert req.up_to_event_id == req.covered[-1].event_id
    assert sum(len(m.content) + MESSAGE_OVERHEAD for m in req.messages) <= 600
    assert "Previous summary" not in req.messages[1].content


def test_summary_request_always_covers_one_turn() -> None:
    req = build_summary_request(
        [turn(1, "y" * 5000), turn(2)], None, budget=900, count_tokens=chars
    )
    assert req.covered == (turn(1, "y" * 5000),)
    assert TRUNCATION_MARKER in req.messages[1].content
    assert sum(len(m.content) + MESSAGE_OVERHEAD for m in req.messages) <= 900
    with pytest.raises(ValueError):
        build_summary_request([], None, budget=10, count_tokens=chars)
