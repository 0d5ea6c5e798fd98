"""Stop-string holdback, history trimming and prompt rendering (no model needed)."""

from __future__ import annotations

from collections.abc import Sequence

from hivebridge.inference.local.prompt import PromptRenderer, fit_messages
from hivebridge.inference.local.sampler import StopMatcher
from hivebridge.inference.local.settings import EngineSettings, WorkerProfile, usable_cores
from hivebridge.inference.types import ChatMessage


def run_stop(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        text, stopped = m.feed(p)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(m.flush())
    return "".join(out), False


def test_stop_string_split_across_pieces_never_leaks() -> None:
    m = StopMatcher(("###",))
    assert m.feed("Hello #") == ("Hello ", False)
    assert m.feed("#") == ("", False)
    assert m.feed("#tail") == ("", True)


def test_false_alarm_is_released() -> None:
    assert run_stop(["a #", "b"], ("##",)) == ("a #b", False)
    assert run_stop(["abc", "de", "fg"], ("xyz",)) == ("abcdefg", False)


def test_earliest_of_several_stops() -> None:
    assert run_stop(["one STOP two END"], ("END", "STOP")) == ("one ", True)


def test_flush_releases_held_tail() -> None:
    assert run_stop(["ends with <", "|"], ("<|im_end|>",)) == ("ends with <|", False)


def count_chars(ms: Sequence[ChatMessage]) -> int:
    return sum(len(m.content) + 4 for m in ms)


def test_fit_keeps_system_and_last_user_and_drops_oldest() -> None:
    msgs = [
        ChatMessage("system", "S" * 10),
        ChatMessage("user", "u1" * 20),
        ChatMessage("assistant", "a1" * 20),
        ChatMessage("user", "u2" * 5),
        ChatMessage("assistant", "a2" * 5),
        ChatMessage("user", "last"),
    ]
    out = fit_messages(msgs, count_chars, 50)
    assert out[0] == msgs[0] and out[-1] == msgs[-1]
    assert count_chars(out) <= 50
    assert msgs[1] not in out  # oldest dropped first
    assert msgs[4] in out  # newest history kept


def test_fit_truncates_the_last_message_keeping_its_end() -> None:
    msgs = [ChatMessage("system", "sys"), ChatMessage("user", "x" * 100 + "QUESTION?")]
    out = fit_messages(msgs, count_chars, 40)
    assert count_chars(out) <= 40
    assert out[0].content == "sys" and out[-1].content.endswith("QUESTION?")


def test_fit_truncates_system_as_last_resort() -> None:
    msgs = [ChatMessage("system", "s" * 100), ChatMessage("user", "hi")]
    out = fit_messages(msgs, count_chars, 20)
    assert count_chars(out) <= 20


def test_chatml_rendering_is_append_only() -> None:
    r = PromptRenderer(None)
    turn1 = [ChatMessage("system", "You are P."), ChatMessage("user", "hi")]
    p1 = r.render(turn1)
    p2 = r.render([*turn1, ChatMessage("assistant", "hello"), ChatMessage("user", "again")])
    assert p2.startswith(p1)
    assert p1 == (
        "<|im_start|>system\nYou are P.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert r.system_prefix(turn1, p1) == "<|im_start|>system\nYou are P.<|im_end|>\n"


def test_profile_applies_over_settings() -> None:
    base = EngineSettings()
    s = WorkerProfile("small", n_ctx=2048, temperature=0.2, max_tokens=64).apply(base)
    assert s.n_ctx == 2048 and s.sampling.temperature == 0.2 and s.sampling.max_tokens == 64
    assert s.n_seq_max == base.n_seq_max and s.sampling.top_k == base.sampling.top_k


def test_threads_never_exceed_usable_cores() -> None:
    t, tb = EngineSettings(threads=64, threads_batch=64).resolved_threads()
    assert t == tb == usable_cores()
    assert EngineSettings().resolved_threads()[0] == usable_cores()
