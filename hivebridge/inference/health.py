"""Per-endpoint health: a circuit breaker plus latency and last-error bookkeeping.

A dead endpoint should cost one failed connect, not one per room: after enough
failures the breaker opens and the router skips the endpoint until a cooldown
has passed, then lets a single probe request through (half-open). The policy
follows LiteLLM's deployment cooldown (5 s; trip on more than half of the last
minute's requests failing) plus a consecutive-failure trip so that a quiet bot
notices a dead endpoint after a few requests. Time is injectable for tests.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"  # healthy: requests flow
    OPEN = "open"  # cooling down: requests are refused
    HALF_OPEN = "half-open"  # cooldown over: one probe may go through


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    consecutive_failures: int = 3  # trip after this many failures in a row
    window_s: float = 60.0  # sliding window for the failure-ratio trip
    failure_ratio: float = 0.5  # trip when failures/requests in the window exceed this
    min_requests: int = 4  # ... and the window holds at least this many requests
    cooldown_s: float = 5.0  # first cooldown
    backoff_factor: float = 2.0  # each failed probe multiplies the cooldown
    max_cooldown_s: float = 60.0  # cap on the cooldown
    probe_timeout_s: float = 120.0  # a probe that never reports is forgotten after this
    latency_alpha: float = 0.3  # EWMA weight of the newest latency sample


class CircuitBreaker:
    """Tracks one endpoint's outcomes and decides whether to send it requests."""

    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or BreakerConfig()
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._cooldown = self.config.cooldown_s
        self._probe_started: float | None = None
        self._window: deque[tuple[float, bool]] = deque()
        self.consecutive_failures = 0
        self.latency_s: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.trips = 0

    # --- state -----------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._cooldown:
            self._state = BreakerState.HALF_OPEN
            self._probe_started = None
        return self._state

    @property
    def available(self) -> bool:
        """Whether a request could be sent now (no side effect, unlike :meth:`allow`)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        return not self._probe_busy()

    def cooldown_remaining(self) -> float:
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._cooldown - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        """Ask to send one request; in half-open state this reserves the single probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._probe_busy():
            return False
        self._probe_started = self._clock()
        return True

    def release(self) -> None:
        """The request ended without a verdict (cancelled): free the probe slot."""
        self._probe_started = None

    # --- outcomes ----------------------------------------------------------------

    def record_success(self, latency_s: float | None = None) -> None:
        now = self._clock()
        if latency_s is not None:
            alpha = self.config.latency_alpha
            old = self.latency_s
            self.latency_s = latency_s if old is None else alpha * latency_s + (1 - alpha) * old
        self.consecutive_failures = 0
        if self.state is not BreakerState.CLOSED:
            # A probe (or a late success) proves the endpoint is back: start afresh.
            self._state = BreakerState.CLOSED
            self._cooldown = self.config.cooldown_s
            self._window.clear()
        self._probe_started = None
        self._push(now, ok=True)

    def record_failure(self, error: str, *, trip: bool = False) -> None:
        """Count a failure; ``trip`` opens at once (e.g. the endpoint rejected our key)."""
        now = self._clock()
        self.last_error = error
        self.last_error_at = now
        self.consecutive_failures += 1
        state = self.state
        self._probe_started = None
        if state is BreakerState.HALF_OPEN:
            self._open(now, self._cooldown * self.config.backoff_factor)
            return
        if state is BreakerState.OPEN:
            return  # a request that started before the trip; the cooldown already runs
        self._push(now, ok=False)
        if (
            trip
            or self.consecutive_failures >= self.config.consecutive_failures
            or self._ratio_exceeded()
        ):
            self._open(now, self.config.cooldown_s)

    def mark_down(self, error: str) -> None:
        """Passive health: a request gave up on this endpoint, so it is down now (not
        after more failures); a probe after the cooldown brings it back."""
        if self.state is BreakerState.CLOSED:
            now = self._clock()
            self.last_error = error
            self.last_error_at = now
            self._probe_started = None
            self._open(now, self.config.cooldown_s)

    @property
    def status(self) -> str:
        """One word for people and dashboards: ``up``, ``down`` or ``probing``."""
        state = self.state
        if state is BreakerState.CLOSED:
            return "up"
        return "probing" if state is BreakerState.HALF_OPEN and self._probe_busy() else "down"

    # --- internals ---------------------------------------------------------------

    def _probe_busy(self) -> bool:
        started = self._probe_started
        return started is not None and self._clock() - started < self.config.probe_timeout_s

    def _open(self, now: float, cooldown: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._cooldown = min(cooldown, self.config.max_cooldown_s)
        self._window.clear()
        self.trips += 1

    def _push(self, now: float, *, ok: bool) -> None:
        self._window.append((now, ok))
        horizon = now - self.config.window_s
        while self._window and self._window[0][0] < horizon:
            self._window.popleft()

    def _ratio_exceeded(self) -> bool:
        total = len(self._window)
        if total < self.config.min_requests:
            return False
        failures = sum(1 for _, ok in self._window if not ok)
        return failures / total > self.config.failure_ratio
