"""Request rates and daily token budgets applied before a persona reply or an ``!ask``.

The arithmetic is :mod:`hivebridge.routing.rate_limit` (pure); this module adds the
state that makes it hold across restarts: bucket state in ``rate_limits``, and daily
budgets counted from the ``usage`` rows that :meth:`Limits.record` writes.
Over a limit the caller gets one message to post (``notify``), then silence until the
announced time, so a limited user cannot make the bot flood the room either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Config, LimitsConfig
from ..db.usage import RateLimitStore, Scope, UsageKind, UsageRecord, UsageStore
from ..permissions import Role
from ..routing.rate_limit import DailyBudget, NotifyLatch, RateLimiter, format_retry_after
from ..utc import utc_day

log = logging.getLogger("hivebridge.limits")


@dataclass(frozen=True, slots=True)
class LimitVerdict:
    """``message`` is set when ``notify``: the one reply to post; otherwise stay quiet."""

    allowed: bool
    notify: bool = False
    message: str = ""
    retry_after_s: float = 0.0
    #: Which limit refused (a ``hivebridge_routing_rate_limited`` scope); "" when allowed.
    scope: str = ""


ALLOW = LimitVerdict(True)
#: Metric scope of each daily budget; the per-user request rate is scope "user".
_BUDGET_SCOPES: dict[Scope, str] = {
    "user_id": "daily_budget",
    "room_id": "room",
    "persona": "persona",
}
#: The ``limits.overrides`` field that names each scope.
_OVERRIDE_SCOPE: dict[Scope, str] = {"user_id": "user", "room_id": "room", "persona": "persona"}


def _limiter(per_minute: float, burst: int | None) -> RateLimiter | None:
    return RateLimiter(per_minute, burst) if per_minute > 0 else None


class Limits:
    def __init__(
        self,
        config: LimitsConfig,
        usage: UsageStore,
        state: RateLimitStore,
        role_of: Callable[[str], Role],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.usage = usage
        self.state = state
        self.role_of = role_of
        self.clock = clock  # wall clock: bucket state is persisted
        self.rate: RateLimiter | None = None
        self._configure(config)
        self._latch = NotifyLatch()

    def _configure(self, config: LimitsConfig) -> None:
        self.config = config
        self.rate = _limiter(config.requests_per_minute, config.burst)
        #: Rates of overrides that set one: (scope, key) -> limiter (None: no limit).
        self._rates: dict[tuple[str, str], RateLimiter | None] = {}
        #: Daily budgets of overrides that set one: (scope, key) -> tokens (0: unlimited).
        self._tokens: dict[tuple[str, str], int] = {}
        self._rpm: dict[tuple[str, str], float] = {}
        for o in config.overrides:
            if o.requests_per_minute is not None:
                self._rates[(o.scope, o.key)] = _limiter(o.requests_per_minute, o.burst)
                self._rpm[(o.scope, o.key)] = o.requests_per_minute
            if o.tokens_per_day is not None:
                self._tokens[(o.scope, o.key)] = o.tokens_per_day
        self._defaults: dict[Scope, int | None] = {
            "user_id": config.user_tokens_per_day,
            "room_id": config.room_tokens_per_day,
            "persona": config.persona_tokens_per_day,
        }

    def _limiters(self) -> list[RateLimiter]:
        return [r for r in (self.rate, *self._rates.values()) if r is not None]

    def _state(self) -> dict[str, dict[str, float]]:
        state: dict[str, dict[str, float]] = {}
        for limiter in self._limiters():
            state.update(limiter.export_state())
        return state

    async def apply_config(self, config: Config) -> None:
        """New rates and budgets from a reloaded config, from the next request on.

        What users have spent carries over: buckets keep their level (capped at
        a smaller burst), and budgets count the same usage rows.
        """
        if config.limits == self.config:
            return
        had = bool(self._limiters())
        state = self._state()
        self._configure(config.limits)
        if not had:  # the limits were off: start from what was saved
            state = await self.state.load()
        for limiter in self._limiters():
            limiter.import_state(state)

    async def load(self) -> int:
        """Restore bucket state saved before a restart; returns how many buckets."""
        limiters = self._limiters()
        if not limiters:
            return 0
        state = await self.state.load()
        return max(limiter.import_state(state) for limiter in limiters)

    def exempt(self, user: str | None) -> bool:
        return bool(user) and self.config.exempt_owners and self.role_of(user or "") == "owner"

    def _budget(self, scope: Scope, value: str) -> DailyBudget | None:
        """The daily budget of a user, room or persona: its override's, else the default."""
        tokens = self._tokens.get((_OVERRIDE_SCOPE[scope], value), self._defaults[scope])
        return DailyBudget(tokens) if tokens else None

    def _rate_for(
        self, user: str, room_id: str, persona: str | None
    ) -> tuple[RateLimiter | None, str, float]:
        """The request limiter for ``user`` here, its bucket key and its rate per minute:
        an override of the user, else of the room, else of the persona, else the default.
        Each override counts in buckets of its own."""
        for scope, value in (("user", user), ("room", room_id), ("persona", persona)):
            if value is not None and (scope, value) in self._rates:
                key = f"user:{user}" if scope == "user" else f"{scope}:{value}|user:{user}"
                return self._rates[(scope, value)], key, self._rpm[(scope, value)]
        return self.rate, f"user:{user}", self.config.requests_per_minute

    async def check(
        self, user: str | None, room_id: str, persona: str | None = None, *, spend: bool = True
    ) -> LimitVerdict:
        """May ``user`` have an answer in ``room_id`` (from ``persona``) now?

        ``spend=False`` checks budgets only (a second persona answering the same
        message costs no extra request). ``user=None`` (a persona speaking: a persona
        answering a persona) skips every limit of a user, so no human's request rate
        or budget pays for it, but not the room's or the persona's budget.
        """
        if self.exempt(user):
            return ALLOW
        now = self.clock()
        day = utc_day(now)
        scopes: list[tuple[Scope, str, str | None]] = [
            ("user_id", "your", user),
            ("room_id", "this room's", room_id),
            ("persona", f"{persona}'s", persona),
        ]
        for scope, subject, value in scopes:
            budget = self._budget(scope, value) if value is not None else None
            if budget is None or value is None:
                continue
            used = await self.usage.tokens_on(day, scope, value)
            decision = budget.check(used, now)
            if not decision.allowed:
                notify = self._latch.should_notify(
                    f"{scope}:{value}", now, now + decision.reset_in_s
                )
                wait = format_retry_after(decision.reset_in_s)
                text = (
                    f"{_who(user)}{subject} daily token budget ({budget.limit} tokens) is used "
                    f"up; try again in {wait} (the budget starts over at 00:00 UTC)."
                )
                return LimitVerdict(
                    False,
                    notify,
                    text if notify else "",
                    decision.reset_in_s,
                    scope=_BUDGET_SCOPES[scope],
                )
        if user is None or not spend:
            return ALLOW
        rate, key, per_minute = self._rate_for(user, room_id, persona)
        if rate is None:
            return ALLOW
        answer = rate.check(key, now)
        try:
            saved = rate.export_state().get(key)
            if saved is not None:
                await self.state.save(key, saved)
        except Exception:
            log.warning("could not save rate-limit state", exc_info=True)
        if answer.allowed:
            return ALLOW
        text = (
            f"{_who(user)}you are over the limit of {per_minute:g} requests "
            f"per minute; try again in {format_retry_after(answer.retry_after_s)}."
        )
        return LimitVerdict(
            False,
            answer.notify,
            text if answer.notify else "",
            answer.retry_after_s,
            scope="user",
        )

    async def record(
        self,
        *,
        user: str,
        room_id: str,
        persona: str | None,
        model: str,
        kind: UsageKind,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Count one answered request (the usage row budgets and !stats read)."""
        now = self.clock()
        await self.usage.record(
            UsageRecord(
                ts=int(now * 1000),
                day=utc_day(now),
                user_id=user,
                room_id=room_id,
                persona=persona,
                model=model,
                kind=kind,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
        )


def _who(user: str | None) -> str:
    return f"{user}: " if user else ""
