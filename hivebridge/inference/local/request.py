"""What the engine thread knows of one request, and what it tells the event loop."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hivebridge.inference.types import FinishReason

from .sampler import Detokenizer, ResolvedSampling, SamplerChain, StopMatcher
from .sequences import Seq


@dataclass(slots=True)
class Update:
    """What the engine thread tells one request's Generation after a step."""

    text: str = ""
    first_token: bool = False
    prompt_tokens: int = 0
    cached_tokens: int = 0
    evaluated_tokens: int = 0
    completion_tokens: int = 0
    finish: FinishReason | None = None
    error: Exception | None = None
    tokens: list[int] | None = None  # on finish: the completion's token ids
    queue_wait_s: float | None = None  # submitted -> admitted, once admitted


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


@dataclass(eq=False, slots=True)
class Request:
    rid: int
    prompt: list[int]
    sampling: ResolvedSampling
    session: str | None
    emit: Callable[[Update], None]
    pin_len: int = 0  # tokens of the persona (system) prefix to pin, 0 = none
    #: Higher goes first: admitted and prefilled before lower ones (rooms 0, the API
    #: below by default, so API load cannot starve rooms).
    priority: int = 0
    phase: Phase = Phase.WAITING
    seq: Seq | None = None
    n_past: int = 0  # prompt tokens in the KV
    cached: int = 0
    evaluated: int = 0
    completion: int = 0
    generated: list[int] = field(default_factory=list)
    pending: int | None = None  # sampled, not yet decoded
    first_sent: bool = False
    no_snapshot: bool = False
    sampler: SamplerChain | None = None
    detok: Detokenizer | None = None
    stop: StopMatcher | None = None
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None
