"""The seam between conversation code and every inference backend.

Nothing here knows about Matrix: a backend gets chat messages and sampling
parameters and streams text back. A local llama.cpp engine and a remote
OpenAI-compatible endpoint implement the same :class:`Backend` protocol, so the
router can put either behind a persona.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling; ``None`` fields fall back to the worker profile."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def with_(self, **changes: object) -> SamplingParams:
        return replace(self, **changes)  # type: ignore[arg-type]


FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(slots=True)
class GenerationStats:
    """What one request cost; filled in while the stream runs."""

    model: str = ""
    backend: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache
    evaluated_tokens: int = 0  # prompt tokens actually prefilled
    completion_tokens: int = 0
    ttft_s: float | None = None
    queue_wait_s: float | None = None  # submitted -> admitted (a local engine's queue)
    total_s: float = 0.0
    finish_reason: FinishReason | None = None
    started_at: float = field(default_factory=time.monotonic)

    def mark_first_token(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.monotonic() - self.started_at

    def finish(self, reason: FinishReason) -> None:
        self.finish_reason = reason
        self.total_s = time.monotonic() - self.started_at


class InferenceError(Exception):
    """A request failed; the message is safe to show to a user."""


class BackendUnavailable(InferenceError):
    """The backend cannot take requests right now (unloaded, down, cooling off)."""


@runtime_checkable
class Generation(Protocol):
    """A running request: iterate for text pieces; ``stats`` is final after the end."""

    stats: GenerationStats

    def __aiter__(self) -> AsyncIterator[str]: ...

    async def aclose(self) -> None:
        """Cancel the request and free what it holds; safe to call twice."""
        ...


class Backend(Protocol):
    """Anything that can answer chat messages with a stream of text."""

    name: str

    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        *,
        session: str | None = None,
    ) -> Generation:
        """Start a request. ``session`` names a conversation (e.g. room + persona)

        so a backend can keep its cache warm for it: the local engine keeps the
        room's KV sequence, a remote router keeps the room on one endpoint.
        """
        ...


async def collect(gen: Generation) -> str:
    """Drain a generation into one string."""
    parts = [piece async for piece in gen]
    return "".join(parts)
