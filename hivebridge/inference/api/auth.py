"""Bearer tokens with names, their limits and their usage.

Each configured token has a name: usage is counted per name (never per
secret), and each name has its own limits (requests per minute, requests at
once, tokens per UTC day). Secrets are compared in constant time against
every token, so the time taken says nothing about which one nearly matched.
"""

from __future__ import annotations

import hmac
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import rate_limited


@dataclass(frozen=True, slots=True)
class ApiToken:
    """One client's token: a name for accounting, the secret, its limits (0: none)."""

    name: str
    secret: str = field(repr=False)
    requests_per_minute: float = 0.0
    max_concurrent: int = 0
    tokens_per_day: int = 0


@dataclass(slots=True)
class Usage:
    """What one token name used since start (and today, for its daily limit)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    rejected: int = 0
    day: int = 0
    day_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "rejected": self.rejected,
            "tokens_today": self.day_tokens,
        }


class TokenTable:
    """The configured tokens; :meth:`find` checks a presented secret."""

    def __init__(self, tokens: Sequence[ApiToken]) -> None:
        self._tokens = list(tokens)

    def find(self, presented: str | None) -> ApiToken | None:
        if not presented:
            return None
        found = None
        for token in self._tokens:  # no early exit: the same work whichever matches
            if hmac.compare_digest(token.secret.encode(), presented.encode()):
                found = token
        return found

    def names(self) -> list[str]:
        return [t.name for t in self._tokens]


class Limiter:
    """Per token name: a sliding minute of requests, requests running, tokens today."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.usage: dict[str, Usage] = {}
        self._recent: dict[str, deque[float]] = {}
        self._running: dict[str, int] = {}

    def usage_of(self, name: str) -> Usage:
        usage = self.usage.get(name)
        if usage is None:
            usage = self.usage[name] = Usage()
        today = int(time.time() // 86400)
        if usage.day != today:
            usage.day, usage.day_tokens = today, 0
        return usage

    def running(self, name: str) -> int:
        return self._running.get(name, 0)

    def admit(self, token: ApiToken) -> None:
        """Count a request in, or raise a 429 ``ApiError`` saying which limit it hit."""
        usage = self.usage_of(token.name)
        now = self.clock()
        recent = self._recent.setdefault(token.name, deque())
        while recent and now - recent[0] >= 60.0:
            recent.popleft()
        try:
            if token.max_concurrent and self.running(token.name) >= token.max_concurrent:
                raise rate_limited(
                    f"Too many requests at once for token '{token.name}' "
                    f"(limit {token.max_concurrent}).",
                    1.0,
                )
            if token.requests_per_minute and len(recent) >= token.requests_per_minute:
                raise rate_limited(
                    f"Rate limit reached for token '{token.name}': "
                    f"{token.requests_per_minute:g} requests per minute.",
                    60.0 - (now - recent[0]),
                )
            if token.tokens_per_day and usage.day_tokens >= token.tokens_per_day:
                left = 86400 - time.time() % 86400
                raise rate_limited(
                    f"Token '{token.name}' used its {token.tokens_per_day} tokens for today.",
                    left,
                )
        except Exception:
            usage.rejected += 1
            raise
        recent.append(now)
        self._running[token.name] = self.running(token.name) + 1
        usage.requests += 1

    def done(self, token: ApiToken, prompt: int, completion: int, cached: int) -> None:
        """The request ended: count what it used, free its place."""
        self._running[token.name] = max(0, self.running(token.name) - 1)
        usage = self.usage_of(token.name)
        usage.prompt_tokens += prompt
        usage.completion_tokens += completion
        usage.cached_tokens += cached
        usage.day_tokens += prompt + completion
