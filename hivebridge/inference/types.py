"""The seam between conversation code and every inference backend.

Nothing here knows about Matrix: a backend gets chat messages and sampling
parameters and streams text back. A local llama.cpp engine and a remote
OpenAI-compatible endpoint implement the same :class:`Backend` protocol, so the
router can put either behind a persona.

Tools ride on the same seam, in the OpenAI shape because it is the common
one: a request may offer :class:`ToolSpec` s (``SamplingParams.tools``) and
say how free the model is to call them (``tool_choice``); a generation then
streams the answer's text as usual and, when the model asked for tools
instead, ends with :attr:`StreamingGeneration.tool_calls` set. The results go
back as ``role="tool"`` messages. ``response_format`` asks for JSON of a
schema instead of free text; a backend without native tool calls (the local
engine) builds on it (see :mod:`.envelope`).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant", "tool"]

#: ``tool_choice`` values besides a tool's name: the model decides, must not call
#: any tool, or must call one.
AUTO, NONE, REQUIRED = "auto", "none", "required"


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool as a model sees it: a name, what it does, and its arguments' JSON schema."""

    name: str
    description: str
    parameters: Mapping[str, Any]  # a JSON schema of type "object"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model asked for; ``id`` pairs it with its ``role="tool"`` result."""

    id: str
    name: str
    arguments: Mapping[str, Any]

    def arguments_json(self) -> str:
        return json.dumps(dict(self.arguments), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a chat. An assistant message may carry ``tool_calls`` (its
    ``content`` is then what the model said along with them, often empty); a
    ``tool`` message is a call's result, answering ``tool_call_id``."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None  # the tool a ``tool`` message answers for


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Ask for one JSON value matching ``schema`` instead of free text."""

    name: str
    schema: Mapping[str, Any]

    def schema_json(self) -> str:
        """The schema as JSON text, keys in their given order: a grammar built from
        it keeps that order, so ``type`` comes first in an envelope."""
        return json.dumps(self.schema, ensure_ascii=False)


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
    #: (token id, bias) pairs added to the logits; -100 bans a token, as in OpenAI's API.
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: Generate exactly ``max_tokens`` tokens, end-of-generation tokens suppressed
    #: (benchmarks, load tests; llama.cpp servers take it as ``ignore_eos``).
    ignore_eos: bool = False
    #: Tools the model may call, and how free it is to: ``"auto"``, ``"none"``,
    #: ``"required"`` or one tool's name (that tool, and no answer in text).
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = AUTO
    response_format: ResponseFormat | None = None

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
    """A running request: iterate for text pieces; ``stats`` is final after the end.

    A generation of a request with tools also has ``tool_calls`` (and
    ``tool_note``) once it ended; read them with :func:`tool_calls_of`.
    """

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


def tool_calls_of(gen: Generation) -> tuple[tuple[ToolCall, ...], str]:
    """The calls a finished generation asked for and the words that came with them
    (not streamed); ``((), "")`` for a generation that knows nothing of tools."""
    calls = tuple(getattr(gen, "tool_calls", ()) or ())
    return calls, str(getattr(gen, "tool_note", "") or "")


async def collect(gen: Generation) -> str:
    """Drain a generation into one string."""
    parts = [piece async for piece in gen]
    return "".join(parts)
