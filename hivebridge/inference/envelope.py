"""The reply envelope: tool calls for a backend that can only write text.

A model without native tool calls (the local engine) answers with one JSON
object instead of free text, either the final response or a tool call::

    {"type": "response", "text": "It is 12 °C and cloudy in London."}
    {"type": "tool_call", "name": "get_weather", "arguments": {"location": "London"},
     "message": "Checking the weather in London…"}

:func:`envelope_schema` is the JSON schema of that object for the offered
tools (one alternative per tool, each with that tool's own argument schema),
so a backend that constrains output to a schema (a grammar on the local
engine) always produces an envelope that parses, with arguments that match.
:func:`envelope_request` turns a request with tools into such a text request:
the tool descriptions are appended to the system message (stable text, so the
persona's pinned KV prefix still covers them), earlier calls and results are
written the way the model writes them, and ``response_format`` carries the
schema. :class:`EnvelopeGeneration` reads the model's JSON back: the response's
text streams as it is generated (never the JSON around it) and a tool call
ends the generation with ``tool_calls`` set, like a native one.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .generation import StreamingGeneration
from .types import (
    AUTO,
    NONE,
    REQUIRED,
    ChatMessage,
    Generation,
    InferenceError,
    ResponseFormat,
    SamplingParams,
    ToolCall,
    ToolSpec,
)

RESPONSE = "response"
TOOL_CALL = "tool_call"
#: Completion tokens added to a request's max_tokens for the JSON around the
#: answer, so the envelope does not shorten what the model may say.
ENVELOPE_OVERHEAD_TOKENS = 48
#: The longest note a call may carry (the grammar stops a rambling one there).
MAX_NOTE_CHARS = 120
#: How a tool's result is put before the model (a ``user`` message: small chat
#: templates know no ``tool`` role).
TOOL_RESULT_PREFIX = "Tool result"

__all__ = [
    "RESPONSE",
    "TOOL_CALL",
    "Envelope",
    "EnvelopeGeneration",
    "EnvelopeStream",
    "envelope_messages",
    "envelope_request",
    "envelope_schema",
    "parse_envelope",
    "render_call",
    "render_response",
    "tool_instructions",
]


# --- the schema and the prompt ----------------------------------------------------------


def _response_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"type": {"const": RESPONSE}, "text": {"type": "string"}},
        "required": ["type", "text"],
        "additionalProperties": False,
    }


def _call_schema(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "type": {"const": TOOL_CALL},
            "name": {"const": tool.name},
            "arguments": dict(tool.parameters),
            "message": {"type": "string", "maxLength": MAX_NOTE_CHARS},
        },
        "required": ["type", "name", "arguments"],
        "additionalProperties": False,
    }


def envelope_schema(tools: Sequence[ToolSpec], choice: str = AUTO) -> dict[str, Any]:
    """The JSON schema of one reply: a response or a call of one of ``tools``.

    ``choice`` narrows it as OpenAI's ``tool_choice`` does: ``"none"`` only a
    response, ``"required"`` only a call, a tool's name only that call.
    """
    if choice == NONE or not tools:
        alternatives = [_response_schema()]
    elif choice in (AUTO, REQUIRED):
        calls = [_call_schema(t) for t in tools]
        alternatives = calls if choice == REQUIRED else [_response_schema(), *calls]
    else:
        chosen = [t for t in tools if t.name == choice]
        if not chosen:
            raise InferenceError(f"tool_choice {choice!r} names none of the offered tools")
        alternatives = [_call_schema(chosen[0])]
    if len(alternatives) == 1:
        return alternatives[0]
    return {"oneOf": alternatives}


def _argument_hint(tool: ToolSpec) -> str:
    """``{"location": string (a place name)}``: each argument with its description."""
    props = tool.parameters.get("properties")
    if not isinstance(props, Mapping) or not props:
        return "{}"
    parts = []
    for name, prop in props.items():
        prop = prop if isinstance(prop, Mapping) else {}
        kind = str(prop.get("type", "value"))
        if isinstance(prop.get("enum"), list):
            kind = " | ".join(json.dumps(v, ensure_ascii=False) for v in prop["enum"])
        desc = prop.get("description")
        parts.append(f'"{name}": {kind}' + (f" ({desc})" if desc else ""))
    return "{" + ", ".join(parts) + "}"


_PLACEHOLDERS: dict[str, Any] = {"string": "text", "integer": 1, "number": 1, "boolean": True}


def example_arguments(tool: ToolSpec) -> dict[str, Any]:
    """Arguments for the prompt's example call: each required property's first
    ``examples`` value (JSON schema's own keyword), else a plain value of its type."""
    props = tool.parameters.get("properties")
    props = props if isinstance(props, Mapping) else {}
    out: dict[str, Any] = {}
    for name in tool.parameters.get("required", ()):
        prop = props.get(name)
        prop = prop if isinstance(prop, Mapping) else {}
        examples = prop.get("examples")
        if isinstance(examples, list) and examples:
            out[name] = examples[0]
        elif isinstance(prop.get("enum"), list) and prop["enum"]:
            out[name] = prop["enum"][0]
        else:
            out[name] = _PLACEHOLDERS.get(str(prop.get("type")), "text")
    return out


def tool_instructions(tools: Sequence[ToolSpec]) -> str:
    """What the system message gains for ``tools``: the envelope and each tool.

    Shown with examples rather than placeholders (a small model copies
    ``<placeholders>`` into its answers). Depends on the tools only, never on
    the choice or the hop, so the system block, and the KV prefix pinned for
    it, stays the same across a reply and across replies.
    """
    if not tools:
        return ""
    first = tools[0]
    example = ToolCall("example", first.name, example_arguments(first))
    lines = [
        "You can use tools. Always reply with exactly one JSON object. To answer:",
        render_response("Hello! How can I help?"),
        "To use a tool:",
        render_call(example),
        f'The tool\'s result comes back in a message starting with "{TOOL_RESULT_PREFIX}". '
        "Use it in your answer.",
        "Tools:",
    ]
    for tool in tools:
        lines.append(f"- {tool.name}: {tool.description} Arguments: {_argument_hint(tool)}")
    return "\n".join(lines)


def render_response(text: str) -> str:
    """A response envelope, written as the model is shown to write it."""
    return json.dumps({"type": RESPONSE, "text": text}, ensure_ascii=False)


def render_call(call: ToolCall, note: str = "") -> str:
    """A tool call envelope, written as the model is shown to write it."""
    data: dict[str, Any] = {"type": TOOL_CALL, "name": call.name, "arguments": call.arguments}
    if note:
        data["message"] = note
    return json.dumps(data, ensure_ascii=False)


def envelope_messages(
    messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]
) -> list[ChatMessage]:
    """``messages`` as a text-only model sees them when it answers in envelopes.

    The tool instructions join the system message (one is added if there is
    none); the assistant's earlier answers and calls are envelopes; results
    are user messages naming their tool.
    """
    out: list[ChatMessage] = []
    instructions = tool_instructions(tools)
    msgs = list(messages)
    if msgs and msgs[0].role == "system":
        out.append(ChatMessage("system", f"{msgs[0].content}\n\n{instructions}"))
        msgs = msgs[1:]
    else:
        out.append(ChatMessage("system", instructions))
    for m in msgs:
        if m.role == "assistant" and m.tool_calls:
            # One envelope holds one call; several calls of one turn are written in a row.
            for i, call in enumerate(m.tool_calls):
                out.append(ChatMessage("assistant", render_call(call, m.content if i == 0 else "")))
        elif m.role == "assistant":
            out.append(ChatMessage("assistant", render_response(m.content)))
        elif m.role == "tool":
            result = f"{TOOL_RESULT_PREFIX} ({m.name or 'tool'}): {m.content}"
            out.append(ChatMessage("user", result))
        else:
            out.append(ChatMessage(m.role, m.content))
    return out


def envelope_request(
    messages: Sequence[ChatMessage], params: SamplingParams
) -> tuple[list[ChatMessage], SamplingParams]:
    """A request with tools as a plain text request constrained to the envelope."""
    schema = envelope_schema(params.tools, params.tool_choice)
    return envelope_messages(messages, params.tools), params.with_(
        tools=(),
        tool_choice=AUTO,
        response_format=ResponseFormat("reply_envelope", schema),
        max_tokens=params.max_tokens + ENVELOPE_OVERHEAD_TOKENS,
    )


# --- reading it back -------------------------------------------------------------------


class EnvelopeError(InferenceError):
    """The model's output is no envelope (only possible without a grammar, or cut off)."""


@dataclass(frozen=True, slots=True)
class Envelope:
    kind: str  # RESPONSE or TOOL_CALL
    text: str = ""  # the response
    call: ToolCall | None = None
    note: str = ""  # the call's message
    truncated: bool = False  # cut off inside the response's text; the text is what came


def new_call_id() -> str:
    return "call_" + secrets.token_hex(6)


def parse_envelope(raw: str, tools: Sequence[ToolSpec]) -> Envelope:
    """One envelope from the model's whole output; :class:`EnvelopeError` if it is none."""
    try:
        # strict=False: llama.cpp's JSON grammar lets raw control characters into strings.
        data = json.loads(raw, strict=False)
    except ValueError:
        raise EnvelopeError("the model's reply is not valid JSON") from None
    if not isinstance(data, dict):
        raise EnvelopeError("the model's reply is not a JSON object")
    kind = data.get("type")
    if kind == RESPONSE:
        text = data.get("text")
        if not isinstance(text, str):
            raise EnvelopeError("the model's response has no text")
        return Envelope(RESPONSE, text=text)
    if kind == TOOL_CALL:
        name, args = data.get("name"), data.get("arguments", {})
        if not isinstance(name, str) or name not in {t.name for t in tools}:
            raise EnvelopeError(f"the model called an unknown tool {str(name)[:40]!r}")
        if not isinstance(args, dict):
            raise EnvelopeError(f"the model's call of {name} has no argument object")
        note = data.get("message")
        return Envelope(
            TOOL_CALL,
            call=ToolCall(new_call_id(), name, args),
            note=note.strip() if isinstance(note, str) else "",
        )
    raise EnvelopeError("the model's reply is neither a response nor a tool call")


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class EnvelopeStream:
    """Reads an envelope as it is generated and lets only the response's text through.

    A small scanner of the top-level object: it remembers the ``type`` and
    decodes the ``text`` string (escapes included) piece by piece. Text that
    comes before the ``type`` says it is a response is held back until it
    does; the JSON itself is never shown.
    """

    def __init__(self) -> None:
        self.raw = ""
        self.kind: str | None = None
        self._depth = 0
        self._in_string = False
        self._escape = ""  # an escape sequence being read ("\\", "\\u12"...)
        self._high: int | None = None  # a UTF-16 high surrogate awaiting its pair
        self._is_key = False
        self._after_colon = False
        self._last_key = ""
        self._string = ""  # the key or short value being read
        self._in_text = False  # inside the response's "text" string
        self.text = ""  # decoded text so far
        self._shown = 0  # of self.text, already let through

    def feed(self, piece: str) -> str:
        """Take generated text; return what may be shown of the response now."""
        self.raw += piece
        for ch in piece:
            self._step(ch)
        return self._release()

    def _release(self) -> str:
        if self.kind != RESPONSE:
            return ""
        out = self.text[self._shown :]
        self._shown = len(self.text)
        return out

    def _step(self, ch: str) -> None:
        if self._in_string:
            self._string_char(ch)
            return
        if ch == '"':
            self._in_string = True
            self._is_key = self._depth == 1 and not self._after_colon
            self._string = ""
            self._in_text = self._depth == 1 and not self._is_key and self._last_key == "text"
        elif ch in "{[":
            self._depth += 1
            self._after_colon = False
        elif ch in "}]":
            self._depth -= 1
        elif ch == ":" and self._depth == 1:
            self._after_colon = True
        elif ch == "," and self._depth == 1:
            self._after_colon = False

    def _string_char(self, ch: str) -> None:
        if self._escape:
            self._escape += ch
            if self._escape[1] != "u":
                self._emit(_ESCAPES.get(ch, ch))
                self._escape = ""
            elif len(self._escape) == 6:
                try:
                    code = int(self._escape[2:], 16)
                except ValueError:
                    code = 0xFFFD
                self._escape = ""
                self._emit_code(code)
            return
        if ch == "\\":
            self._escape = "\\"
            return
        if ch == '"':
            self._in_string = False
            if self._high is not None:
                self._emit("\ufffd")
                self._high = None
            if self._is_key:
                self._last_key = self._string
            elif self._depth == 1 and self._last_key == "type":
                self.kind = self._string
            self._in_text = False
            return
        self._emit(ch)

    def _emit_code(self, code: int) -> None:
        if 0xD800 <= code < 0xDC00:
            self._high = code
            return
        if 0xDC00 <= code < 0xE000 and self._high is not None:
            code = 0x10000 + ((self._high - 0xD800) << 10) + (code - 0xDC00)
            self._high = None
        self._emit(chr(code) if code < 0xD800 or code >= 0xE000 else "\ufffd")

    def _emit(self, text: str) -> None:
        if self._in_text:
            self.text += text
        elif len(self._string) < 256:  # keys and the type; long values need not be kept
            self._string += text

    def finish(self, tools: Sequence[ToolSpec]) -> tuple[Envelope, str]:
        """The envelope, and the response text not yet let through.

        Output cut off inside the response's text (max_tokens) is a response
        with the text that came; anything else that does not parse raises
        :class:`EnvelopeError`.
        """
        try:
            env = parse_envelope(self.raw, tools)
        except EnvelopeError:
            if self.kind == RESPONSE and (self._in_text or self.text):
                env = Envelope(RESPONSE, text=self.text, truncated=True)
            else:
                raise
        if env.kind != RESPONSE:
            return env, ""
        rest = env.text[self._shown :] if env.text.startswith(self.text[: self._shown]) else ""
        self._shown = len(env.text)
        return env, rest


class EnvelopeGeneration(StreamingGeneration):
    """A generation of envelopes read back as text and tool calls (shares the stats)."""

    def __init__(self, inner: Generation, tools: Sequence[ToolSpec]) -> None:
        super().__init__(inner.stats)
        self.inner = inner
        self.tools = tuple(tools)
        self.envelope: Envelope | None = None
        self.raw = ""  # the model's output as generated (tests, diagnostics)

    async def _release(self) -> None:
        await self.inner.aclose()

    async def _stream(self) -> AsyncGenerator[str, None]:
        reader = EnvelopeStream()
        async for piece in self.inner:
            self.raw += piece
            shown = reader.feed(piece)
            if shown:
                yield shown
        env, rest = reader.finish(self.tools)
        self.envelope = env
        if rest:
            yield rest
        if env.call is not None:
            self.tool_calls = [env.call]
            self.tool_note = env.note


def generate_with_envelope(
    generate: Callable[..., Generation],
    messages: Sequence[ChatMessage],
    params: SamplingParams,
    *,
    session: str | None = None,
) -> EnvelopeGeneration:
    """Run a request with tools on ``generate`` (a text backend's generate) in envelopes."""
    msgs, inner_params = envelope_request(messages, params)
    return EnvelopeGeneration(generate(msgs, inner_params, session=session), params.tools)
