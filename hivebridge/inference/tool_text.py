"""Tool calls written as plain text: the fallback when an endpoint does not parse them.

An OpenAI-compatible server returns ``tool_calls`` only when it understands
the model's call syntax (llama.cpp's server needs ``--jinja`` and a template
that knows tools). Otherwise the call arrives as text in ``content``, in the
shape the model learnt::

    <tool_call>{"name": "get_weather", "arguments": {"location": "London"}}</tool_call>
    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "London"}}]
    {"name": "get_weather", "parameters": {"location": "London"}}
    {"tool_call": {"name": "get_weather", "arguments": {"location": "London"}}}
    ```json {"name": "get_weather", "arguments": {...}} ```

:func:`parse_text_tool_calls` finds such calls of the offered tools (and only
those: an unknown name, or no argument object, is text, not a call), and
:class:`TextCallFilter` keeps the markup of a possible call out of the room
while the text streams.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .types import ToolCall

#: Where a call written as text may begin; text from one of these on is held
#: back while streaming until the end shows whether it was a call.
MARKERS = ("<tool_call>", "<function", "[TOOL_CALLS]", "```", "{", "[{")

_decoder = json.JSONDecoder(strict=False)


@dataclass(frozen=True, slots=True)
class TextCalls:
    """What a reply's text held: the calls, and the text without them."""

    calls: tuple[ToolCall, ...]
    text: str


def _objects(text: str) -> Iterator[tuple[int, int, Any]]:
    """Every JSON object or array that parses, starting at each ``{`` or ``[``,
    outermost first: (start, end, value). A broken outer value still yields the
    well-formed ones inside it."""
    i = 0
    n = len(text)
    while i < n:
        if text[i] in "{[":
            try:
                value, end = _decoder.raw_decode(text, i)
            except ValueError:
                i += 1
                continue
            yield i, end, value
            i = end
        else:
            i += 1


def _as_call(value: Any, names: set[str], new_id: Iterator[str]) -> list[ToolCall] | None:
    """The calls ``value`` stands for, in any of the common shapes; None if none."""
    if isinstance(value, list):
        calls: list[ToolCall] = []
        for item in value:
            found = _as_call(item, names, new_id)
            if found is None:
                return None
            calls.extend(found)
        return calls or None
    if not isinstance(value, Mapping):
        return None
    for wrapper in ("tool_call", "function_call"):
        if isinstance(value.get(wrapper), Mapping):
            return _as_call(value[wrapper], names, new_id)
    if isinstance(value.get("tool_calls"), list):
        return _as_call(value["tool_calls"], names, new_id)
    if isinstance(value.get("function"), Mapping):  # OpenAI's own shape, written out
        return _as_call(value["function"], names, new_id)
    name = value.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    args = value.get("arguments", value.get("parameters"))
    if isinstance(args, str):  # OpenAI sends arguments as a JSON string
        try:
            args = json.loads(args, strict=False)
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        return None
    return [ToolCall(next(new_id), name, dict(args))]


def _ids(prefix: str) -> Iterator[str]:
    n = 0
    while True:
        yield f"{prefix}{n}"
        n += 1


def parse_text_tool_calls(
    text: str, tool_names: Sequence[str], *, id_prefix: str = "call_text_"
) -> TextCalls:
    """The calls of ``tool_names`` written in ``text``, and the text around them.

    Markup that wraps a call (``<tool_call>`` tags, ``[TOOL_CALLS]``, a
    ```` ```json ```` fence) goes with it; what remains is what the model said
    besides. No call found: ``calls`` is empty and ``text`` is unchanged.
    """
    names = set(tool_names)
    new_id = _ids(id_prefix)
    calls: list[ToolCall] = []
    spans: list[tuple[int, int]] = []
    for start, end, value in _objects(text):
        found = _as_call(value, names, new_id)
        if found is None:
            # A broken list or wrapper may still hold well-formed calls inside.
            inner = text[start + 1 : end - 1]
            nested = parse_text_tool_calls(inner, tool_names, id_prefix=id_prefix + "n")
            if nested.calls:
                calls.extend(nested.calls)
                spans.append((start, end))
            continue
        calls.extend(found)
        spans.append((start, end))
    if not calls:
        # A value that never closed (cut off, or one brace short) still opens a call.
        for start in (i for i, ch in enumerate(text) if ch == "{"):
            found = _as_call(_close(text[start:]), names, new_id)
            if found:
                calls.extend(found)
                spans.append((start, len(text)))
                break
    if not calls:
        return TextCalls((), text)
    kept = []
    last = 0
    for start, end in spans:
        kept.append(text[last:start])
        last = end
    kept.append(text[last:])
    rest = "".join(kept)
    for mark in ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "```json", "```"):
        rest = rest.replace(mark, "")
    rest = _LEFTOVER.sub(" ", rest)  # brackets of a broken wrapper around the call
    return TextCalls(tuple(calls), " ".join(rest.split()).strip(" ,\"'"))


_LEFTOVER = re.compile(r"(?:(?<=\s)|^)[\[\]{}(),:;\"']+(?=\s|$)")


def _close(fragment: str) -> Any:
    """``fragment`` completed with the brackets it leaves open, parsed; None if that fails."""
    stack: list[str] = []
    in_string = escape = False
    for ch in fragment:
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return None
            if not stack:
                break
    if in_string:
        return None
    # Whatever trails the last bracket or string (a fence, words) is not JSON.
    end = max(fragment.rfind("}"), fragment.rfind("]"), fragment.rfind('"')) + 1
    try:
        return _decoder.raw_decode(fragment[:end] + "".join(reversed(stack)))[0]
    except ValueError:
        return None


class TextCallFilter:
    """Lets a streamed reply through, holding back what may be a call written as text.

    From the first :data:`MARKERS` on (or a prefix of one at the end of the
    text so far) the text waits for :meth:`finish`, which says whether it was a
    call; text before a marker streams as usual.
    """

    def __init__(self) -> None:
        self.text = ""
        self._shown = 0
        self._held_from: int | None = None

    def feed(self, piece: str) -> str:
        self.text += piece
        if self._held_from is not None:
            return ""
        text = self.text
        hold = len(text)
        for mark in MARKERS:
            i = text.find(mark, self._shown)
            if i >= 0:
                hold = min(hold, i)
        if hold < len(text):
            self._held_from = hold
        else:  # a marker's beginning at the very end: wait for the next piece
            for mark in MARKERS:
                for k in range(min(len(mark) - 1, len(text)), 0, -1):
                    if text.endswith(mark[:k]):
                        hold = min(hold, len(text) - k)
                        break
        out = text[self._shown : hold]
        self._shown = hold
        return out

    def finish(self, tool_names: Sequence[str]) -> tuple[str, tuple[ToolCall, ...]]:
        """(text still to show, calls found).

        With calls, everything held back goes: the markup, and whatever the
        model wrote after its call (a small model goes on to invent the result).
        """
        held = self.text[self._shown :]
        self._shown = len(self.text)
        found = parse_text_tool_calls(held, tool_names) if held else TextCalls((), "")
        if found.calls:
            return "", found.calls
        return held, ()
