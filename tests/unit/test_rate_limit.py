"""Token buckets, the reply-once latch, persistence, and the daily budget."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivebridge.routing.rate_limit import (
    DailyBudget,
    NotifyLatch,
    RateDecision,
    RateLimiter,
    format_retry_after,
)
from hivebridge.utc import seconds_until_utc_midnight, utc_day


def test_burst_then_refill_at_rate() -> None:
    rl = RateLimiter(per_minute=6, burst=3)  # one token every 10 s
    assert [rl.check("u", 0).allowed for _ in range(3)] == [True, True, True]
    denied = rl.check("u", 0)
    assert not denied.allowed and denied.retry_after_s == pytest.approx(10)
    assert rl.check("u", 5).retry_after_s == pytest.approx(5)
    assert rl.check("u", 10).allowed
    assert not rl.check("u", 10).allowed


def test_default_burst_equals_rate() -> None:
    rl = RateLimiter(per_minute=4)
    assert sum(rl.check("u", 0).allowed for _ in range(10)) == 4
    assert RateLimiter(per_minute=0.5).capacity == 1


def test_keys_are_independent() -> None:
    rl = RateLimiter(per_minute=1, burst=1)
    assert rl.check("a", 0).allowed
    assert not rl.check("a", 0).allowed
    assert rl.check("b", 0).allowed


def test_notify_once_per_refusal_streak() -> None:
    rl = RateLimiter(per_minute=1, burst=1)  # 60 s per token
    assert rl.check("u", 0) == RateDecision(True)
    first = rl.check("u", 1)
    assert not first.allowed and first.notify and first.retry_after_s == pytest.approx(59)
    storm = [rl.check("u", t) for t in range(2, 60)]
    assert not any(d.allowed or d.notify for d in storm)  # no reply storm
    assert rl.check("u", 60).allowed  # refilled; latch cleared
    again = rl.check("u", 61)
    assert not again.allowed and again.notify  # a new streak gets one new notice


def test_notices_are_per_key() -> None:
    rl = RateLimiter(per_minute=1, burst=1)
    rl.check("a", 0)
    rl.check("b", 0)
    assert rl.check("a", 1).notify and rl.check("b", 1).notify
    assert not rl.check("a", 2).notify and not rl.check("b", 2).notify


def test_cost_and_impossible_cost() -> None:
    rl = RateLimiter(per_minute=60, burst=5)
    assert rl.check("u", 0, cost=5).allowed
    denied = rl.check("u", 0, cost=2)
    assert denied.retry_after_s == pytest.approx(2)
    with pytest.raises(ValueError):
        rl.check("u", 0, cost=6)


def test_clock_stepping_back_adds_no_tokens() -> None:
    rl = RateLimiter(per_minute=60, burst=1)
    assert rl.check("u", 100).allowed
    assert not rl.check("u", 50).allowed
    assert not rl.check("u", 100.5).allowed
    assert rl.check("u", 101).allowed


def test_constructor_validation() -> None:
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            RateLimiter(per_minute=bad)
    with pytest.raises(ValueError):
        RateLimiter(per_minute=5, burst=0.5)


def test_export_import_round_trip() -> None:
    rl = RateLimiter(per_minute=6, burst=3)
    for _ in range(3):
        rl.check("u", 0)
    state = rl.export_state()
    assert state == {"u": {"tokens": 0.0, "updated_at": 0}}
    restored = RateLimiter(per_minute=6, burst=3)
    assert restored.import_state(state) == 1
    assert not restored.check("u", 5).allowed
    assert restored.check("u", 10).allowed


def test_import_skips_garbage_and_clamps() -> None:
    rl = RateLimiter(per_minute=6, burst=3)
    state = {
        "ok": {"tokens": 99, "updated_at": 0},
        "neg": {"tokens": -5, "updated_at": 0},
        "nan": {"tokens": float("nan"), "updated_at": 0},
        "bool": {"tokens": True, "updated_at": 0},
        "str": {"tokens": "1", "updated_at": 0},
        "list": [1, 2],
        5: {"tokens": 1, "updated_at": 0},
    }
    assert rl.import_state(state) == 2  # type: ignore[arg-type]
    assert rl.peek("ok", 0) == 3 and rl.peek("neg", 0) == 0
    assert rl.import_state("nonsense") == 0  # type: ignore[arg-type]


def test_prune_forgets_full_buckets() -> None:
    rl = RateLimiter(per_minute=6, burst=3)
    rl.check("a", 0)
    rl.check("b", 25)
    rl.prune(30)
    assert set(rl.export_state()) == {"b"}
    assert rl.peek("never", 0) == 3


@given(
    per_minute=st.integers(1, 120),
    burst=st.integers(1, 10),
    times=st.lists(st.floats(0, 300, allow_nan=False), max_size=100),
)
def test_never_exceeds_burst_plus_rate(per_minute: int, burst: int, times: list[float]) -> None:
    rl = RateLimiter(per_minute=per_minute, burst=burst)
    allowed = [t for t in sorted(times) if rl.check("k", t).allowed]
    if allowed:
        span = allowed[-1] - allowed[0]
        assert len(allowed) <= burst + span * per_minute / 60 + 1e-6


@given(times=st.lists(st.floats(0, 1000, allow_nan=False), max_size=100))
def test_at_most_one_notice_per_announced_wait(times: list[float]) -> None:
    rl = RateLimiter(per_minute=2, burst=1)
    quiet_until = -1.0
    for t in sorted(times):
        decision = rl.check("k", t)
        if decision.notify:
            assert t >= quiet_until or quiet_until < 0
            quiet_until = t + decision.retry_after_s
        if decision.allowed:
            assert decision.retry_after_s == 0 and not decision.notify
        else:
            assert decision.retry_after_s > 0


def test_notify_latch_standalone() -> None:
    latch = NotifyLatch()
    assert latch.should_notify("k", 0, until=10)
    assert not latch.should_notify("k", 5, until=20)
    assert latch.should_notify("k", 10, until=30)
    latch.clear("k")
    assert latch.should_notify("k", 11, until=12)
    latch.prune(100)
    assert latch.should_notify("k", 100, until=101)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "1 second"),
        (0.2, "1 second"),
        (1, "1 second"),
        (41.1, "42 seconds"),
        (60, "1 min"),
        (185, "3 min 5 s"),
        (3600, "1 h"),
        (3600 + 61, "1 h 2 min"),
        (2 * 3600 - 1, "2 h"),
        (float("inf"), "later"),
    ],
)
def test_format_retry_after(seconds: float, text: str) -> None:
    assert format_retry_after(seconds) == text


def test_seconds_until_utc_midnight() -> None:
    noon = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert seconds_until_utc_midnight(noon) == 12 * 3600
    assert seconds_until_utc_midnight(noon.timestamp()) == 12 * 3600
    midnight = datetime(2024, 5, 2, tzinfo=UTC)
    assert seconds_until_utc_midnight(midnight) == 86400
    # an aware non-UTC time is converted, a naive one is taken as UTC
    plus2 = datetime(2024, 5, 1, 23, 0, tzinfo=timezone(timedelta(hours=2)))
    assert seconds_until_utc_midnight(plus2) == 3 * 3600
    assert seconds_until_utc_midnight(datetime(2024, 5, 1, 23, 59, 30)) == 30
    assert utc_day(plus2) == "2024-05-01"
    assert utc_day(midnight.timestamp()) == "2024-05-02"


def test_daily_budget() -> None:
    now = datetime(2024, 5, 1, 18, 0, tzinfo=UTC)
    budget = DailyBudget(limit=1000)
    ok = budget.check(400, now)
    assert ok.allowed and ok.remaining == 600 and ok.reset_in_s == 6 * 3600
    spent = budget.check(1000, now)
    assert not spent.allowed and spent.remaining == 0
    assert not budget.check(5000, now).allowed
    assert budget.check(-3, now).remaining == 1000
    assert not DailyBudget(limit=0).check(0, now).allowed
    unlimited = DailyBudget(limit=None).check(10**9, now)
    assert unlimited.allowed and unlimited.remaining is None


def test_full_buckets_are_forgotten_as_requests_arrive() -> None:
    """Bounded by the users seen within one refill time, not every user ever seen."""
    rl = RateLimiter(per_minute=6)
    for i in range(10_000):
        assert rl.check(f"@u{i}:x", 0.0).allowed
    assert len(rl.export_state()) == 10_000
    rl.check("@late:x", 61.0)
    assert len(rl.export_state()) == 1
