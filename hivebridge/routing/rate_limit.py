"""Per-key token buckets, a reply-once latch, and a daily budget — all pure.

Time is passed in as seconds. To persist buckets across restarts (``export_state`` /
``import_state``) the caller must use a wall clock (``time.time()``), not a monotonic one.
Whether a key (an owner, say) is exempt is the caller's decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..utc import seconds_until_utc_midnight

__all__ = [
    "BudgetDecision",
    "DailyBudget",
    "NotifyLatch",
    "RateDecision",
    "RateLimiter",
    "format_retry_after",
    "seconds_until_utc_midnight",
]


@dataclass(frozen=True, slots=True)
class RateDecision:
    """``notify`` is True on the first refusal of a streak only: reply once, then be quiet."""

    allowed: bool
    retry_after_s: float = 0.0
    notify: bool = False


class NotifyLatch:
    """Remembers, per key, until when we have already told the user to wait.

    ``should_notify(key, now, until)`` is True once; afterwards False until ``now`` passes
    the ``until`` we announced (then a new refusal may be announced again).
    """

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def should_notify(self, key: str, now: float, until: float) -> bool:
        announced = self._until.get(key)
        if announced is not None and now < announced:
            return False
        self._until[key] = until
        return True

    def clear(self, key: str) -> None:
        self._until.pop(key, None)

    def prune(self, now: float) -> None:
        for key in [k for k, until in self._until.items() if now >= until]:
            del self._until[key]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated_at: float


class RateLimiter:
    """Token bucket per key: ``per_minute`` refill rate, ``burst`` capacity (default: rate)."""

    def __init__(self, per_minute: float, burst: float | None = None):
        if not per_minute > 0 or not math.isfinite(per_minute):
            raise ValueError("per_minute must be a positive finite number")
        self.rate = per_minute / 60.0  # tokens per second
        self.capacity = float(burst if burst is not None else max(1.0, per_minute))
        if not self.capacity >= 1 or not math.isfinite(self.capacity):
            raise ValueError("burst must be >= 1")
        self._buckets: dict[str, _Bucket] = {}
        self._latch = NotifyLatch()
        self._pruned_at: float | None = None

    def _refill(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.capacity, now)
            return bucket
        elapsed = max(0.0, now - bucket.updated_at)  # a clock stepping back adds nothing
        bucket.tokens = min(self.capacity, bucket.tokens + elapsed * self.rate)
        bucket.updated_at = max(bucket.updated_at, now)
        return bucket

    def check(self, key: str, now: float, cost: float = 1.0) -> RateDecision:
        """Spend ``cost`` tokens if available; otherwise say how long to wait."""
        if cost > self.capacity:
            raise ValueError("cost exceeds burst capacity; it could never be allowed")
        # Full buckets equal fresh ones: forget them once per refill time, so the
        # state is bounded by the keys seen recently, not every key ever seen.
        if self._pruned_at is None:
            self._pruned_at = now
        elif now - self._pruned_at >= self.capacity / self.rate:
            self._pruned_at = now
            self.prune(now)
        bucket = self._refill(key, now)
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            self._latch.clear(key)
            return RateDecision(True)
        retry = (cost - bucket.tokens) / self.rate
        notify = self._latch.should_notify(key, now, now + retry)
        return RateDecision(False, retry, notify)

    def peek(self, key: str, now: float) -> float:
        """Tokens available now, without spending any."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.capacity
        elapsed = max(0.0, now - bucket.updated_at)
        return min(self.capacity, bucket.tokens + elapsed * self.rate)

    def prune(self, now: float) -> None:
        """Forget buckets that have refilled completely: they equal fresh ones."""
        for key in [k for k in self._buckets if self.peek(k, now) >= self.capacity]:
            del self._buckets[key]
        self._latch.prune(now)

    def export_state(self) -> dict[str, dict[str, float]]:
        return {
            key: {"tokens": b.tokens, "updated_at": b.updated_at}
            for key, b in self._buckets.items()
        }

    def import_state(self, state: Mapping[str, Any]) -> int:
        """Load exported buckets, skipping malformed entries; returns how many loaded."""
        loaded = 0
        if not isinstance(state, Mapping):
            return 0
        for key, entry in state.items():
            if not isinstance(key, str) or not isinstance(entry, Mapping):
                continue
            tokens, updated = entry.get("tokens"), entry.get("updated_at")
            if not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in (tokens, updated)
            ):
                continue
            assert isinstance(tokens, int | float) and isinstance(updated, int | float)
            self._buckets[key] = _Bucket(min(max(float(tokens), 0.0), self.capacity), updated)
            loaded += 1
        return loaded


def format_retry_after(seconds: float) -> str:
    """Human wording for a wait, rounded up: "1 second", "42 seconds", "3 min 5 s", "2 h 1 min"."""
    if not math.isfinite(seconds):
        return "later"
    total = max(1, math.ceil(seconds))
    if total < 60:
        return "1 second" if total == 1 else f"{total} seconds"
    if total < 3600:
        minutes, secs = divmod(total, 60)
        return f"{minutes} min" + (f" {secs} s" if secs else "")
    hours, rest = divmod(total, 3600)
    minutes = math.ceil(rest / 60)
    if minutes == 60:
        hours, minutes = hours + 1, 0
    return f"{hours} h" + (f" {minutes} min" if minutes else "")


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    allowed: bool
    remaining: int | None  # None: unlimited
    reset_in_s: float  # until the counter starts over (next UTC midnight)


@dataclass(frozen=True, slots=True)
class DailyBudget:
    """Tokens per UTC day; ``limit=None`` means unlimited. Counting is the caller's job."""

    limit: int | None

    def check(self, used_today: int, now: float | datetime) -> BudgetDecision:
        reset_in = seconds_until_utc_midnight(now)
        if self.limit is None:
            return BudgetDecision(True, None, reset_in)
        remaining = max(0, self.limit - max(0, used_today))
        return BudgetDecision(remaining > 0, remaining, reset_in)
