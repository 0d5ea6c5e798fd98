"""The live-reply edit throttle and the whole-word helper."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivebridge.conversation.streaming import EditThrottle, StreamAction, stable_prefix

# -- stable_prefix ----------------------------------------------------------------------


def test_stable_prefix_cuts_an_incomplete_last_word() -> None:
    assert stable_prefix("Hello wor") == "Hello "
    assert stable_prefix("Hello world.\nNe") == "Hello world.\n"
    assert stable_prefix("Hello ") == "Hello "
    assert stable_prefix("") == ""


def test_stable_prefix_waits_for_the_first_word() -> None:
    assert stable_prefix("Hel") == ""


def test_stable_prefix_does_not_stall_on_long_runs() -> None:
    url = "see https://example.com/" + "a" * 100
    assert stable_prefix(url) == url
    assert stable_prefix("x" * 100) == "x" * 100
    assert stable_prefix("ab cdef", max_holdback=2) == "ab cdef"
    assert stable_prefix("ab cd", max_holdback=2) == "ab "


def test_stable_prefix_understands_cjk_punctuation() -> None:
    assert stable_prefix("你好。今天") == "你好。"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab \n.。"), max_size=80))
def test_stable_prefix_is_a_prefix_and_holds_back_little(text: str) -> None:
    out = stable_prefix(text, max_holdback=10)
    assert text.startswith(out)
    assert len(text) - len(out) <= 11 or out == ""


# -- EditThrottle -----------------------------------------------------------------------


def test_first_visible_text_is_sent_at_once() -> None:
    t = EditThrottle(interval_s=1.5, max_edits=5)
    assert t.update("", 0.0) == StreamAction("none")
    assert t.update("   \n", 0.1) == StreamAction("none")
    assert t.update("Hello ", 0.2) == StreamAction("send", "Hello ")
    assert t.started


def test_edits_wait_for_the_interval_and_need_a_change() -> None:
    t = EditThrottle(interval_s=1.5, max_edits=5)
    t.update("Hello ", 0.0)
    assert t.update("Hello there ", 1.0) == StreamAction("none")  # too soon
    assert t.update("Hello there ", 1.5) == StreamAction("edit", "Hello there ")
    assert t.update("Hello there ", 5.0) == StreamAction("none")  # unchanged
    assert t.update("Hello there frie", 5.0) == StreamAction("none")  # same whole words
    assert t.update("Hello there friend ", 5.0) == StreamAction("edit", "Hello there friend ")


def test_edit_interval_counts_from_the_last_send() -> None:
    t = EditThrottle(interval_s=2.0, max_edits=10)
    t.update("a ", 10.0)
    assert not t.update("a b ", 11.9).needed
    assert t.update("a b ", 12.0).kind == "edit"
    assert not t.update("a b c ", 13.9).needed
    assert t.update("a b c ", 14.0).kind == "edit"


def test_edits_stop_at_the_cap_and_the_final_always_goes_out() -> None:
    t = EditThrottle(interval_s=1.0, max_edits=2)
    t.update("a ", 0.0)
    assert t.update("a b ", 1.0).kind == "edit"
    assert t.update("a b c ", 2.0).kind == "edit"
    assert not t.update("a b c d ", 3.0).needed
    assert t.edits == 2
    final = t.finish("a b c d e", 3.1)  # inside the interval: still sent
    assert final == StreamAction("edit", "a b c d e")
    assert not t.update("more ", 10.0).needed
    assert not t.finish("again", 10.0).needed


def test_final_is_skipped_when_nothing_changed() -> None:
    t = EditThrottle()
    t.update("done ", 0.0)
    assert t.finish("done ") == StreamAction("none")


def test_final_carries_the_whole_text_including_a_partial_last_word() -> None:
    t = EditThrottle()
    assert t.update("Hi", 0.0) == StreamAction("none")  # first word still arriving
    assert t.finish("Hi") == StreamAction("send", "Hi")


def test_blank_reply_sends_nothing() -> None:
    t = EditThrottle()
    assert t.finish("  ") == StreamAction("none")


def test_without_whole_words_raw_text_is_shown() -> None:
    t = EditThrottle(whole_words=False)
    assert t.update("Hel", 0.0) == StreamAction("send", "Hel")


def test_zero_edits_means_initial_plus_final_only() -> None:
    t = EditThrottle(interval_s=0.0, max_edits=0)
    assert t.update("a ", 0.0).kind == "send"
    assert not t.update("a b ", 100.0).needed
    assert t.finish("a b c").kind == "edit"


def test_rejects_negative_settings() -> None:
    with pytest.raises(ValueError):
        EditThrottle(interval_s=-1)
    with pytest.raises(ValueError):
        EditThrottle(max_edits=-1)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 3, allow_nan=False), st.sampled_from(["a", "b ", " ", ".\n", ""])),
        max_size=80,
    ),
    st.floats(0.1, 2.0, allow_nan=False),
    st.integers(0, 6),
    st.booleans(),
)
def test_throttle_never_exceeds_its_limits(
    steps: list[tuple[float, str]], interval: float, max_edits: int, whole_words: bool
) -> None:
    t = EditThrottle(interval_s=interval, max_edits=max_edits, whole_words=whole_words)
    now = 0.0
    text = ""
    sends: list[tuple[float, StreamAction]] = []
    for dt, piece in steps:
        now += dt
        text += piece
        action = t.update(text, now)
        if action.needed:
            sends.append((now, action))
            assert text.startswith(action.text) or not whole_words
            assert action.text.strip()
    final = t.finish(text, now)

    kinds = [a.kind for _, a in sends]
    assert kinds.count("send") <= 1 and (not kinds or kinds[0] == "send")
    assert kinds.count("edit") <= max_edits
    for (t0, _), (t1, _) in itertools.pairwise(sends):
        assert t1 - t0 >= interval
    shown = [a.text for _, a in sends]
    assert all(a != b for a, b in itertools.pairwise(shown))
    # After the final action the message shows exactly the whole text (or nothing at all).
    last = final.text if final.needed else (shown[-1] if shown else "")
    assert last == text or (not text.strip() and not shown)
    assert len(sends) + final.needed <= 1 + max_edits + 1
