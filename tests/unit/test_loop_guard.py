"""Ping-pong detection, turn caps, and the LoopGuard facade."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivebridge.routing.loop_guard import (
    GuardVerdict,
    LoopGuard,
    LoopStatus,
    PersonaTurnLimiter,
    PingPongDetector,
    find_repeating_pattern,
)

A, B, C, D = "@a:x", "@b:x", "@c:x", "@d:x"
HUMAN = "@human:x"


def feed(det: PingPongDetector, senders: list[str], start: float = 0.0, step: float = 1.0) -> list:
    return [det.observe(s, start + i * step) for i, s in enumerate(senders)]


def trip_index(det: PingPongDetector, senders: list[str]) -> int | None:
    """Index of the message whose observation tripped the chain."""
    for i, verdict in enumerate(feed(det, senders)):
        if verdict.status is LoopStatus.TRIPPED:
            return i
    return None


# --- find_repeating_pattern ------------------------------------------------------------------


def test_pattern_definition_examples() -> None:
    assert find_repeating_pattern([A, B] * 5, 5) == (A, B)
    assert find_repeating_pattern([B] + [A, B] * 4 + [A], 5) == (B, A)
    assert find_repeating_pattern([A, B] * 4 + [A], 5) is None
    assert find_repeating_pattern([A, B, C] * 5, 5) == (A, B, C)
    assert find_repeating_pattern([A, B, A, C] * 5, 5) == (A, B, A, C)
    assert find_repeating_pattern([A] * 20, 5) is None  # one sender is no ping-pong
    assert find_repeating_pattern([A, A, B] * 3, 3) == (A, A, B)
    assert find_repeating_pattern([C, D, A, B, A, B, A, B], 3) == (A, B)
    assert find_repeating_pattern([A, B] * 10, 5, max_period=1) is None
    assert find_repeating_pattern([], 5) is None
    with pytest.raises(ValueError):
        find_repeating_pattern([A], 0)


# --- PingPongDetector ------------------------------------------------------------------------


def test_two_bots_trip_after_n_repetitions_and_notify_once() -> None:
    det = PingPongDetector(threshold=5)
    verdicts = feed(det, [A, B] * 8)
    statuses = [v.status for v in verdicts]
    assert statuses[:9] == [LoopStatus.OK] * 9
    assert statuses[9] is LoopStatus.TRIPPED
    assert statuses[10:] == [LoopStatus.SUPPRESSED] * 6
    assert [v.notify for v in verdicts].count(True) == 1
    assert verdicts[9].notify and verdicts[9].pattern == (A, B)
    assert verdicts[9].suppressed == {A, B}
    assert det.is_suppressed(A, 20) and det.is_suppressed(B, 20)
    assert not det.is_suppressed(C, 20)


@pytest.mark.parametrize("threshold", [2, 3, 5, 8])
def test_threshold_is_configurable(threshold: int) -> None:
    assert trip_index(PingPongDetector(threshold), [A, B] * 10) == 2 * threshold - 1


def test_three_participants() -> None:
    det = PingPongDetector(threshold=5)
    assert trip_index(det, [A, B, C] * 6) == 14
    assert all(det.is_suppressed(p, 20) for p in (A, B, C))


def test_regular_interleavings_are_longer_periods() -> None:
    assert trip_index(PingPongDetector(5), [A, B, A, C] * 6) == 19  # A talks to B and C
    assert trip_index(PingPongDetector(5), [A, C, B, D] * 6) == 19  # two pairs, interleaved
    assert trip_index(PingPongDetector(3), [A, A, B] * 4) == 8


def test_irregular_bot_chatter_does_not_trip() -> None:
    det = PingPongDetector(threshold=5)
    assert trip_index(det, [A, B, C, A, C, B, B, A, C, C, A, B, C, B, A, A, C, B]) is None


def test_human_message_resets_the_chain_and_unsuppresses() -> None:
    det = PingPongDetector(threshold=5)
    feed(det, [A, B] * 5)
    assert det.tripped
    verdict = det.observe(HUMAN, 100, is_bot=False)
    assert verdict.status is LoopStatus.RESET and not verdict.notify
    assert not det.tripped and det.history == ()
    assert not det.is_suppressed(A, 100)
    # and a human interjection before the threshold delays the trip by a full chain
    det2 = PingPongDetector(threshold=5)
    seq = [A, B] * 4
    feed(det2, seq)
    det2.observe(HUMAN, 8.5, is_bot=False)
    assert trip_index(det2, [A, B] * 5) == 9


def test_human_driven_conversation_is_never_silenced() -> None:
    det = PingPongDetector(threshold=2)
    for i in range(100):
        det.observe(HUMAN, 2 * i, is_bot=False)
        verdict = det.observe(A, 2 * i + 1)
        assert verdict.status is LoopStatus.OK
        assert not det.is_suppressed(A, 2 * i + 1)


def test_new_bot_does_not_reset_and_is_not_suppressed() -> None:
    det = PingPongDetector(threshold=5)
    feed(det, [A, B] * 5)
    verdict = det.observe(C, 20)
    assert verdict.status is LoopStatus.SUPPRESSED and not verdict.notify
    assert det.is_suppressed(A, 20) and not det.is_suppressed(C, 20)


def test_retrip_extends_suppression_without_second_notice() -> None:
    det = PingPongDetector(threshold=3, max_history=64)
    feed(det, [A, B] * 3)
    verdicts = feed(det, [C, D] * 3, start=10)
    assert not any(v.notify for v in verdicts)
    assert verdicts[-1].suppressed == {A, B, C, D}


def test_cooldown_of_silence_resets() -> None:
    det = PingPongDetector(threshold=5, cooldown_s=60)
    feed(det, [A, B] * 5)
    assert det.is_suppressed(A, 9 + 59.9)
    assert not det.is_suppressed(A, 9 + 60)
    assert det.history == ()
    # the next chain needs the full N repetitions again and notifies again
    verdicts = feed(det, [A, B] * 5, start=200)
    assert verdicts[-1].status is LoopStatus.TRIPPED and verdicts[-1].notify


def test_slow_messages_never_accumulate_a_chain() -> None:
    det = PingPongDetector(threshold=2, cooldown_s=30)
    verdicts = feed(det, [A, B] * 20, step=31)
    assert all(v.status is LoopStatus.OK for v in verdicts)


def test_clock_going_backwards_is_harmless() -> None:
    det = PingPongDetector(threshold=5, cooldown_s=60)
    feed(det, [A, B] * 5, start=1000)
    assert det.observe(A, 5).status is LoopStatus.SUPPRESSED
    assert det.last_seen == 1009


def test_history_is_bounded() -> None:
    det = PingPongDetector(threshold=2, max_history=10)
    feed(det, [A, B, C, D, C, A, D, B, A, C, B, D] * 10)
    assert len(det.history) == 10


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        PingPongDetector(threshold=1)
    with pytest.raises(ValueError):
        PingPongDetector(cooldown_s=0)
    with pytest.raises(ValueError):
        PingPongDetector(threshold=5, max_history=9)


# --- properties ------------------------------------------------------------------------------

_bots = st.sampled_from([A, B, C])


@given(
    block=st.lists(_bots, min_size=2, max_size=4).filter(lambda b: len(set(b)) >= 2),
    threshold=st.integers(2, 6),
)
def test_any_repeated_block_trips_within_n_periods(block: list[str], threshold: int) -> None:
    det = PingPongDetector(threshold=threshold, max_history=64)
    index = trip_index(det, block * (threshold + 1))
    assert index is not None and index <= threshold * len(block) - 1
    assert set(block) <= set(det.history)


@given(
    events=st.lists(st.tuples(st.sampled_from([A, B, C, HUMAN]), st.integers(0, 100)), max_size=60)
)
def test_at_most_one_notice_per_chain(events: list[tuple[str, int]]) -> None:
    det = PingPongDetector(threshold=3, cooldown_s=50)
    now = 0.0
    notices_since_reset = 0
    for sender, gap in events:
        if det.last_seen is not None and gap >= 50:
            notices_since_reset = 0
        now += gap
        verdict = det.observe(sender, now, is_bot=sender != HUMAN)
        if verdict.status is LoopStatus.RESET:
            notices_since_reset = 0
            assert not det.tripped
        notices_since_reset += verdict.notify
        assert notices_since_reset <= 1
        assert verdict.notify == (verdict.status is LoopStatus.TRIPPED)


@given(
    chain=st.lists(st.sampled_from([A, B]), max_size=30),
    humans_every=st.integers(1, 4),
)
def test_regular_human_turns_prevent_any_trip(chain: list[str], humans_every: int) -> None:
    """With a human message at least every ``2·N - 2`` bot messages, nothing ever trips."""
    threshold = humans_every + 1
    det = PingPongDetector(threshold=threshold, max_history=64)
    for i, sender in enumerate(chain):
        if i % (2 * threshold - 2) == 0:
            det.observe(HUMAN, i, is_bot=False)
        assert det.observe(sender, i + 0.5).status is LoopStatus.OK


@given(prefix=st.lists(_bots, max_size=12), threshold=st.integers(2, 5))
def test_two_bot_ping_pong_always_trips_eventually(prefix: list[str], threshold: int) -> None:
    det = PingPongDetector(threshold=threshold, max_history=64)
    feed(det, prefix)
    feed(det, [A, B] * threshold, start=len(prefix))
    assert det.is_suppressed(A, len(prefix) + 2 * threshold)
    assert det.is_suppressed(B, len(prefix) + 2 * threshold)


# --- PersonaTurnLimiter ----------------------------------------------------------------------


def test_turn_limiter_sliding_window_per_room() -> None:
    lim = PersonaTurnLimiter(max_per_minute=3)
    assert [lim.allow("!r", t) for t in (0, 10, 20, 30)] == [True, True, True, False]
    assert lim.allow("!other", 30)  # rooms are independent
    assert lim.retry_after("!r", 30) == pytest.approx(30)
    assert not lim.allow("!r", 59.9)
    assert lim.allow("!r", 60)  # the turn at t=0 left the window
    assert not lim.allow("!r", 60)


def test_refused_turns_do_not_count() -> None:
    lim = PersonaTurnLimiter(max_per_minute=1)
    assert lim.allow("!r", 0)
    for t in range(1, 60):
        assert not lim.allow("!r", t)
    assert lim.allow("!r", 60)


def test_turn_limiter_zero_and_prune() -> None:
    lim = PersonaTurnLimiter(max_per_minute=0)
    assert not lim.allow("!r", 0)
    assert lim.retry_after("!r", 0) == float("inf")
    lim2 = PersonaTurnLimiter(max_per_minute=2)
    lim2.allow("!r", 0)
    assert lim2.retry_after("!r", 1) == 0
    lim2.prune(100)
    assert lim2.allow("!r", 100) and lim2.allow("!r", 100)
    with pytest.raises(ValueError):
        PersonaTurnLimiter(-1)


@given(times=st.lists(st.floats(0, 600), max_size=80), cap=st.integers(1, 5))
def test_never_more_than_cap_turns_in_any_window(times: list[float], cap: int) -> None:
    lim = PersonaTurnLimiter(max_per_minute=cap)
    allowed = [t for t in sorted(times) if lim.allow("!r", t)]
    for t in allowed:
        assert sum(1 for u in allowed if t - 60 < u <= t) <= cap


# --- LoopGuard facade ------------------------------------------------------------------------


def test_loop_guard_combines_checks_in_order() -> None:
    guard = LoopGuard(threshold=3, cooldown_s=60, max_turns_per_minute=100)
    now = 0.0
    notices = 0
    for sender in [A, B] * 3:
        verdict = guard.observe("!r", sender, now, is_bot=True)
        notices += verdict.notify
        now += 1
    assert notices == 1
    assert guard.check_turn("!r", A, now) is GuardVerdict.PING_PONG
    assert guard.check_turn("!r", C, now) is GuardVerdict.ALLOW
    assert guard.check_turn("!other", A, now) is GuardVerdict.ALLOW  # per room
    assert guard.check_turn("!r", C, now, incoming_bounce_limit=0) is GuardVerdict.BOUNCE_LIMIT
    guard.observe("!r", HUMAN, now, is_bot=False)
    assert guard.check_turn("!r", A, now, incoming_bounce_limit=2) is GuardVerdict.ALLOW


def test_loop_guard_turn_cap() -> None:
    guard = LoopGuard(max_turns_per_minute=2)
    assert guard.check_turn("!r", A, 0) is GuardVerdict.ALLOW
    assert guard.check_turn("!r", B, 1) is GuardVerdict.ALLOW
    assert guard.check_turn("!r", C, 2) is GuardVerdict.TURN_CAP
    assert guard.check_turn("!r2", C, 2) is GuardVerdict.ALLOW
    assert guard.check_turn("!r", C, 61) is GuardVerdict.ALLOW


def test_loop_guard_forget_and_prune() -> None:
    guard = LoopGuard(threshold=2, cooldown_s=10)
    for i, sender in enumerate([A, B, A, B]):
        guard.observe("!r", sender, i, is_bot=True)
    guard.observe("!quiet", HUMAN, 0, is_bot=False)
    assert len(guard) == 2
    guard.forget("!r")
    assert guard.check_turn("!r", A, 4) is GuardVerdict.ALLOW
    guard.prune(100)
    assert len(guard) == 0
    with pytest.raises(ValueError):
        LoopGuard(threshold=1)


def test_reconfigure_applies_new_limits_from_the_next_message() -> None:
    guard = LoopGuard(threshold=5, cooldown_s=300, max_turns_per_minute=2)
    assert guard.check_turn("!r", "@a:x", 0.0) is GuardVerdict.ALLOW
    guard.reconfigure(threshold=3, cooldown_s=60, max_turns_per_minute=1)
    # the turn already taken this minute counts against the new cap of 1
    assert guard.check_turn("!r", "@a:x", 1.0) is GuardVerdict.TURN_CAP
    assert guard.detector("!r").threshold == 3 and guard.detector("!r").cooldown_s == 60
    with pytest.raises(ValueError):
        guard.reconfigure(threshold=1, cooldown_s=60, max_turns_per_minute=1)
    assert guard.threshold == 3  # a refused change leaves the running one


def test_state_of_quiet_rooms_is_dropped_as_messages_arrive() -> None:
    """Before: LoopGuard.prune was never called; every room ever seen kept its state."""
    guard = LoopGuard(cooldown_s=300.0, max_turns_per_minute=20)
    for i in range(10_000):
        room = f"!r{i}:x"
        guard.observe(room, A, 0.0, is_bot=True)
        assert guard.check_turn(room, A, 0.0) is GuardVerdict.ALLOW
    assert guard.rooms_tracked() == 10_000
    guard.observe("!busy:x", A, 301.0, is_bot=True)
    assert guard.rooms_tracked() == 1


# --- one notice per stop ---------------------------------------------------------------------


def test_shipped_settings_let_the_pattern_stop_two_personas_first() -> None:
    """With the shipped routing settings the ping-pong guard, which speaks, stops a loop of
    two personas before the bounce limit (silent on old settings) or the turn cap."""
    from hivebridge.config import RoutingConfig
    from hivebridge.routing.dispatch import next_bounce_limit

    r = RoutingConfig()
    guard = LoopGuard(
        r.ping_pong_threshold, r.ping_pong_cooldown_s, 64, r.max_persona_turns_per_minute
    )
    bounce = next_bounce_limit(None, r.bounce_limit)  # the first persona answered a human
    now = 0.0
    for n, sender in enumerate([A, B] * 20, start=1):
        verdict = guard.observe("!r", sender, now, is_bot=True)
        if verdict.notify:
            break
        assert bounce > 0, f"the bounce limit ended the chain silently after {n} messages"
        answering = B if sender == A else A
        assert guard.check_turn("!r", answering, now, incoming_bounce_limit=bounce) is (
            GuardVerdict.ALLOW
        )
        bounce = next_bounce_limit(bounce, r.bounce_limit)
        now += 1
    assert n == 2 * r.ping_pong_threshold == 10


def test_pattern_and_bounce_limit_share_one_announcement_per_chain() -> None:
    guard = LoopGuard(threshold=3, cooldown_s=60, max_turns_per_minute=100)
    notices = sum(guard.observe("!r", s, i, is_bot=True).notify for i, s in enumerate([A, B] * 3))
    assert notices == 1
    assert not guard.announce("!r", GuardVerdict.BOUNCE_LIMIT)  # the pattern spoke already
    guard.observe("!r", HUMAN, 10, is_bot=False)  # a new chain
    assert guard.announce("!r", GuardVerdict.BOUNCE_LIMIT)
    assert not guard.announce("!r", GuardVerdict.BOUNCE_LIMIT)
    # ... and a pattern in the same chain after a bounce stop stays quiet
    chain = [guard.observe("!r", s, 11 + i, is_bot=True) for i, s in enumerate([A, B] * 3)]
    notices = sum(v.notify for v in chain)
    assert notices == 0 and guard.check_turn("!r", A, 20) is GuardVerdict.PING_PONG
    assert guard.announce("!other", GuardVerdict.BOUNCE_LIMIT)  # per room
    # a chain that went quiet for the cooldown is a new chain
    guard.observe("!r", A, 100, is_bot=True)
    assert guard.announce("!r", GuardVerdict.BOUNCE_LIMIT)


def test_turn_cap_is_announced_once_until_a_turn_is_allowed_again() -> None:
    guard = LoopGuard(max_turns_per_minute=1)
    assert guard.check_turn("!r", A, 0) is GuardVerdict.ALLOW
    assert guard.check_turn("!r", B, 1) is GuardVerdict.TURN_CAP
    assert guard.turn_retry_after("!r", 1) == 59
    assert guard.announce("!r", GuardVerdict.TURN_CAP)
    assert guard.check_turn("!r", B, 2) is GuardVerdict.TURN_CAP
    assert not guard.announce("!r", GuardVerdict.TURN_CAP)
    assert guard.check_turn("!r", B, 61) is GuardVerdict.ALLOW
    assert guard.check_turn("!r", A, 62) is GuardVerdict.TURN_CAP
    assert guard.announce("!r", GuardVerdict.TURN_CAP)
    assert not guard.announce("!r", GuardVerdict.ALLOW)
