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
        rpm = config.requests_per_minute
        self.rate = RateLimiter(rpm, config.burst) if rpm > 0 else None
        scopes: list[tuple[Scope, str, int | None]] = [
            ("user_id", "your", config.user_tokens_per_day),
            ("room_id", "this room's", config.room_tokens_per_day),
            ("persona", "the persona's", config.persona_tokens_per_day),
        ]
        self._budgets = [(s, what, DailyBudget(n)) for s, what, n in scopes if n]

    async def apply_config(self, config: Config) -> None:
        """New rates and budgets from a reloaded config, from the next request on.

        What users have spent carries over: buckets keep their level (capped at
        a smaller burst), and budgets count the same usage rows.
        """
        if config.limits == self.config:
            return
        old = self.rate
        self._configure(config.limits)
        if old is not None and self.rate is not None:
            self.rate.import_state(old.export_state())
        elif self.rate is not None:  # the limit was off: start from what was saved
            self.rate.import_state(await self.state.load())

    async def load(self) -> int:
        """Restore bucket state saved before a restart; returns how many buckets."""
        if self.rate is None:
            return 0
        return self.rate.import_state(await self.state.load())

    def exempt(self, user: str | None) -> bool:
        return bool(user) and self.config.exempt_owners and self.role_of(user or "") == "owner"

    async def check(
        self, user: str | None, room_id: str, persona: str | None = None, *, spend: bool = True
    ) -> LimitVerdict:
        """May ``user`` have an answer in ``room_id`` (from ``persona``) now?

        ``spend=False`` checks budgets only (a second persona answering the same
        message costs no extra request). ``user=None`` (a persona speaking) skips
        the user's limits but not the room's or the persona's budget.
        """
        if self.exempt(user):
            return ALLOW
        now = self.clock()
        day = utc_day(now)
        for scope, what, budget in self._budgets:
            value = {"user_id": user, "room_id": room_id, "persona": persona}[scope]
            if value is None:
                continue
            used = await self.usage.tokens_on(day, scope, value)
            decision = budget.check(used, now)
            if not decision.allowed:
                notify = self._latch.should_notify(
                    f"{scope}:{value}", now, now + decision.reset_in_s
                )
                wait = format_retry_after(decision.reset_in_s)
                subject = "your" if scope == "user_id" else what
                if scope == "persona":
                    subject = f"{persona}'s"
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
        if self.rate is None or user is None or not spend:
            return ALLOW
        key = f"user:{user}"
        rate = self.rate.check(key, now)
        try:
            saved = self.rate.export_state().get(key)
            if saved is not None:
                await self.state.save(key, saved)
        except Exception:
            log.warning("could not save rate-limit state", exc_info=True)
        if rate.allowed:
            return ALLOW
        text = (
            f"{_who(user)}you are over the limit of {self.config.requests_per_minute:g} requests "
            f"per minute; try again in {format_retry_after(rate.retry_after_s)}."
        )
        return LimitVerdict(
            False, rate.notify, text if rate.notify else "", rate.retry_after_s, scope="user"
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
