"""The breaker's trip, cooldown, probe and backoff rules, on a fake clock."""

from __future__ import annotations

import pytest

from hivebridge.inference.health import BreakerConfig, BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, **changes: float) -> CircuitBreaker:
    return CircuitBreaker(BreakerConfig(**changes), clock=clock)  # type: ignore[arg-type]


def test_consecutive_failures_open_then_half_open_probe_closes(clock: Clock) -> None:
    b = make(clock)
    for _ in range(2):
        b.record_failure("boom")
        assert b.state is BreakerState.CLOSED and b.allow()
    b.record_failure("boom")
    assert b.state is BreakerState.OPEN
    assert not b.allow() and not b.available
    assert b.cooldown_remaining() == pytest.approx(5.0)
    clock.advance(5.0)
    assert b.state is BreakerState.HALF_OPEN and b.available
    assert b.allow()  # the probe
    assert not b.allow() and not b.available  # only one probe at a time
    b.record_success(0.2)
    assert b.state is BreakerState.CLOSED and b.allow()
    assert b.consecutive_failures == 0 and b.last_error == "boom"


def test_failed_probe_doubles_cooldown_up_to_cap(clock: Clock) -> None:
    b = make(clock, consecutive_failures=1, cooldown_s=5.0, max_cooldown_s=12.0)
    b.record_failure("down")
    cooldowns = []
    for _ in range(3):
        cooldowns.append(b.cooldown_remaining())
        clock.advance(b.cooldown_remaining())
        assert b.allow()
        b.record_failure("still down")
    cooldowns.append(b.cooldown_remaining())
    assert cooldowns == [5.0, 10.0, 12.0, 12.0]
    clock.advance(12.0)
    assert b.allow()
    b.record_success()
    b.record_failure("again")
    assert b.cooldown_remaining() == 5.0  # success reset the backoff


def test_failure_ratio_in_window_trips(clock: Clock) -> None:
    b = make(clock, consecutive_failures=100, min_requests=4, failure_ratio=0.5)
    for ok in (True, False, False, True):
        b.record_success() if ok else b.record_failure("x")
    assert b.state is BreakerState.CLOSED  # 2/4 is not more than half
    b.record_failure("x")
    assert b.state is BreakerState.OPEN  # 3/5


def test_old_outcomes_leave_the_window(clock: Clock) -> None:
    b = make(clock, consecutive_failures=100, min_requests=4, window_s=60.0)
    for _ in range(3):
        b.record_failure("x")
        b.record_success()
    clock.advance(61.0)
    b.record_failure("x")
    b.record_success()
    b.record_failure("x")
    assert b.state is BreakerState.CLOSED  # only 3 recent requests: below min_requests


def test_trip_opens_at_once(clock: Clock) -> None:
    b = make(clock)
    b.record_failure("HTTP 401", trip=True)
    assert b.state is BreakerState.OPEN and b.trips == 1


def test_release_and_stale_probe_free_the_slot(clock: Clock) -> None:
    b = make(clock, consecutive_failures=1, probe_timeout_s=30.0)
    b.record_failure("x")
    clock.advance(5.0)
    assert b.allow()
    b.release()
    assert b.allow()  # released: another probe may go
    assert not b.allow()
    clock.advance(30.0)
    assert b.allow()  # the silent probe was forgotten


def test_latency_is_an_ewma(clock: Clock) -> None:
    b = make(clock, latency_alpha=0.5)
    assert b.latency_s is None
    b.record_success(1.0)
    b.record_success(0.0)
    b.record_success(None)
    assert b.latency_s == pytest.approx(0.5)


def test_late_failure_while_open_does_not_extend_cooldown(clock: Clock) -> None:
    b = make(clock, consecutive_failures=1)
    b.record_failure("x")
    clock.advance(3.0)
    b.record_failure("late")
    assert b.cooldown_remaining() == pytest.approx(2.0)
