"""Pure routing rules: who answers (dispatch), loop brakes (loop_guard), rate limits.

No I/O and no Matrix library imports here; callers convert events into plain views.
"""

from hivebridge.routing.dispatch import (
    Decision,
    MessageView,
    PersonaView,
    Reason,
    RoomView,
    addressed_in_thread,
    decide,
    next_bounce_limit,
)
from hivebridge.routing.loop_guard import (
    GuardVerdict,
    LoopGuard,
    LoopStatus,
    LoopVerdict,
    PersonaTurnLimiter,
    PingPongDetector,
)
from hivebridge.routing.rate_limit import (
    BudgetDecision,
    DailyBudget,
    NotifyLatch,
    RateDecision,
    RateLimiter,
    format_retry_after,
    seconds_until_utc_midnight,
)

__all__ = [
    "BudgetDecision",
    "DailyBudget",
    "Decision",
    "GuardVerdict",
    "LoopGuard",
    "LoopStatus",
    "LoopVerdict",
    "MessageView",
    "NotifyLatch",
    "PersonaTurnLimiter",
    "PersonaView",
    "PingPongDetector",
    "RateDecision",
    "RateLimiter",
    "Reason",
    "RoomView",
    "addressed_in_thread",
    "decide",
    "format_retry_after",
    "next_bounce_limit",
    "seconds_until_utc_midnight",
]
