"""Render chat messages with the model's own chat template, and fit them into a budget.

Rendering must be deterministic and append-only: turn N+1's prompt has to start
with turn N's prompt so the KV of the room's sequence can be reused. ChatML
(SmolLM2's template) is append-only; the persona prefix is the rendering of the
system message alone, used only when it really is a prefix of the full prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from hivebridge.inference.types import ChatMessage

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _raise(message: str) -> None:
    raise ValueError(message)


class PromptRenderer:
    """Jinja2 rendering of a GGUF ``tokenizer.chat_template`` (ChatML when absent)."""

    def __init__(self, template: str | None, bos_text: str = "", eos_text: str = "") -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = template or CHATML_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(self.source)
        self._bos = bos_text
        self._eos = eos_text
        self.template_hash = hashlib.sha256(self.source.encode()).hexdigest()

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        data: list[dict[str, Any]] = [{"role": m.role, "content": m.content} for m in messages]
        return str(
            self._template.render(
                messages=data,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        )

    def system_prefix(self, messages: Sequence[ChatMessage], full: str) -> str | None:
        """The rendered system block when it is a text prefix of ``full``, else None."""
        if not messages or messages[0].role != "system":
            return None
        block = self.render(messages[:1], add_generation_prompt=False)
        return block if block and full.startswith(block) else None


def fit_messages(
    messages: Sequence[ChatMessage],
    count: Callable[[Sequence[ChatMessage]], int],
    budget: int,
) -> list[ChatMessage]:
    """Drop the oldest history, then truncate, until ``count(result) <= budget``.

    Keeps the system message and the last user message (and anything after it);
    drops the oldest other messages first; if that is still too long, cuts the
    last message's beginning (its end is what the model must answer), then the
    system message's end. Never raises: the caller always gets something to run.
    """
    msgs = list(messages)
    if not msgs or count(msgs) <= budget:
        return msgs
    system = msgs[:1] if msgs[0].role == "system" else []
    rest = msgs[len(system) :]
    last_user = max((i for i, m in enumerate(rest) if m.role == "user"), default=len(rest) - 1)
    middle, tail = rest[:last_user], rest[last_user:]
    # Fewest oldest messages to drop (binary search: O(log n) full counts).
    lo, hi = 0, len(middle)
    while lo < hi:
        mid = (lo + hi) // 2
        if count(system + middle[mid:] + tail) <= budget:
            hi = mid
        else:
            lo = mid + 1
    msgs = system + middle[lo:] + tail
    if count(msgs) <= budget:
        return msgs
    msgs = system + tail[-1:] if tail else system
    if count(msgs) <= budget or not tail:
        return msgs if count(msgs) <= budget else _cut(msgs, 0, count, budget, keep_end=False)
    last = len(msgs) - 1
    fitted = _cut(msgs, last, count, budget, keep_end=True)
    if count(fitted) <= budget or not system:
        return fitted
    return _cut(fitted, 0, count, budget, keep_end=False)


def _cut(
    msgs: list[ChatMessage],
    index: int,
    count: Callable[[Sequence[ChatMessage]], int],
    budget: int,
    *,
    keep_end: bool,
) -> list[ChatMessage]:
    """Binary-search the longest slice of msgs[index].content that fits."""
    content = msgs[index].content

    def with_len(n: int) -> list[ChatMessage]:
        text = content[len(content) - n :] if keep_end else content[:n]
        out = list(msgs)
        out[index] = ChatMessage(msgs[index].role, text)
        return out

    lo, hi = 0, len(content)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(with_len(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return with_len(lo)
