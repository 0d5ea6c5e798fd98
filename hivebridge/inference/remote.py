"""One OpenAI-compatible endpoint (llama-server, vLLM, llama_cpp.server, OpenAI...).

The ``openai`` client's own retries are switched off (``max_retries=0``): they
only cover connecting and would hide failures from the router, which retries
across endpoints itself and only before the first token. Every error leaves this
module as an :class:`InferenceError` whose message is safe to show in a room:
it says what failed (status, timeout) but never what the endpoint answered, which
is the endpoint's text and may be anything; a short excerpt of it, key scrubbed,
goes to the log. The original exception is not chained.

Every request has a total deadline (:attr:`EndpointTimeouts.total_s`) and every
discovery one of its own (``discovery_s``): an endpoint that sends a chunk now
and then, each in time for the read timeout, cannot hold a reply for longer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import openai

from .affinity import Affinity, apply_affinity, session_id
from .envelope import EnvelopeStream, envelope_request, new_call_id
from .generation import StreamingGeneration
from .hooks import NO_HOOKS, InferenceHooks
from .tool_text import TextCallFilter
from .types import (
    AUTO,
    NONE,
    REQUIRED,
    BackendUnavailable,
    ChatMessage,
    GenerationStats,
    InferenceError,
    SamplingParams,
    ToolCall,
    ToolSpec,
)

log = logging.getLogger(__name__)

_NO_KEY = "no-key"  # sent when none is configured: the client insists on one
_MAX_DETAIL = 200
#: What one endpoint's ``/v1/models`` may add to the catalogue: every name becomes a
#: database row, a routing entry and a ``!models`` line, so a hostile or broken list
#: (ten thousand names, megabyte names) must not grow them without bound.
MAX_MODELS_PER_ENDPOINT = 256
MAX_MODEL_NAME_CHARS = 200
T = TypeVar("T")


class Secret:
    """A string that never shows itself in repr/str (dataclass reprs, logs, tracebacks)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(" + mask_key(self._value) + ")"

    __str__ = __repr__


def mask_key(key: str | None) -> str:
    """Show enough of a key to tell keys apart: ``sk-…abcd``; short keys become ``****``."""
    if not key:
        return "(none)"
    if len(key) < 12:
        return "****"
    prefix = key[:3] if key[:3].endswith("-") else ""
    return f"{prefix}…{key[-4:]}"


# --- errors --------------------------------------------------------------------------


class RemoteError(InferenceError):
    """A remote request failed.

    ``transient``: another try (here or elsewhere) may succeed (connect errors,
    timeouts, 429, 5xx). ``endpoint_fault``: the endpoint itself is to blame and
    should count against its health (as opposed to a bad request).
    """

    transient = False
    endpoint_fault = True

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        status: int | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status
        self._kind = kind

    @property
    def kind(self) -> str:
        """The ``kind`` label of ``hivebridge_endpoint_errors`` for this failure."""
        if self._kind is not None:
            return self._kind
        status = self.status
        if status in (401, 403):
            return "auth"
        if status == 429:
            return "rate_limited"
        if status is not None and status >= 500:
            return "http_5xx"
        if status is not None and status >= 400:
            return "http_4xx"
        return "bad_response"


class EndpointUnavailable(RemoteError, BackendUnavailable):
    """Connect error, timeout, 429 or 5xx: worth trying again or elsewhere."""

    transient = True


class EndpointAuthError(RemoteError):
    """401/403: the key is wrong; no retry will help until someone fixes it."""


class ModelNotServed(RemoteError):
    """404: this endpoint does not serve the model (another one may)."""


class RequestRejected(RemoteError):
    """400/422 and friends: the request itself is bad; other endpoints would agree."""

    endpoint_fault = False


class StreamInterrupted(RemoteError):
    """The stream broke after text had arrived; retrying would duplicate text."""

    transient = True


class DeadlineExceeded(EndpointUnavailable):
    """The request (or discovery) ran past its total deadline."""


@dataclass(frozen=True, slots=True)
class EndpointTimeouts:
    """Seconds. ``read_s`` bounds the wait for each chunk, so also time to first token;
    ``total_s`` the whole request, however the chunks trickle in."""

    connect_s: float = 5.0
    read_s: float = 60.0
    write_s: float = 10.0
    pool_s: float = 5.0
    discovery_s: float = 15.0  # whole /v1/models call
    total_s: float = 300.0  # whole chat completion, first byte to last


# --- endpoint ------------------------------------------------------------------------


class RemoteEndpoint:
    """An OpenAI-compatible server; implements :class:`Backend` for one of its models."""

    def __init__(
        self,
        name: str,
        base_url: str,
        api_key: str | None = None,
        *,
        timeouts: EndpointTimeouts | None = None,
        default_model: str | None = None,
        extra_sampling: bool = True,
        hooks: InferenceHooks = NO_HOOKS,
        affinity: Affinity | None = None,
        session_salt: bytes = b"",
    ) -> None:
        """``affinity``: where this endpoint's router reads the conversation's session id
        (a header by default); ``session_salt`` keys the hash that makes it opaque."""
        self.name = name
        self.affinity = affinity or Affinity()
        self._salt = session_salt
        #: llama-server slots read from ``/props`` (``id_slot`` affinity without ``slots``).
        self.slots = 0
        self.hooks = hooks
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts or EndpointTimeouts()
        self.default_model = default_model
        self.models: list[str] = []  # as of the last successful list_models()
        self._key = Secret(api_key or "")
        # Optional request fields (usage in stream, top_k/min_p/repeat_penalty) are
        # dropped for good the first time the server rejects them with a 400/422.
        self._optional_fields = True
        self._extra_sampling = extra_sampling
        #: False once the endpoint refused a request with tools: requests with tools
        #: then ask for the reply envelope under response_format (inference/envelope.py).
        self.native_tools = True
        t = self.timeouts
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=api_key or _NO_KEY,
            max_retries=0,
            timeout=openai.Timeout(t.read_s, connect=t.connect_s, write=t.write_s, pool=t.pool_s),
        )

    def __repr__(self) -> str:
        return f"RemoteEndpoint({self.name!r}, {self.base_url!r}, key={self.masked_key()})"

    __str__ = __repr__

    def masked_key(self) -> str:
        return mask_key(self._key.reveal())

    async def aclose(self) -> None:
        await self._client.close()

    async def list_models(self) -> list[str]:
        """Model ids served, via ``GET /v1/models``; also remembered in :attr:`models`."""
        limit = self.timeouts.discovery_s
        client = self._client.with_options(timeout=limit)
        try:
            page = await asyncio.wait_for(client.models.list(), limit)
            listed = [m.id for m in page.data]
        except TimeoutError:
            err: RemoteError = DeadlineExceeded(
                f"endpoint {self.name}: listing its models took over {limit:g}s",
                endpoint=self.name,
                kind="timeout",
            )
            self.count_error(err)
            raise err from None
        except Exception as exc:
            err = self.map_error(exc)
            self.count_error(err)
            raise err from None
        ids = usable_model_ids(listed)
        if len(ids) < len(listed):
            log.warning(
                "endpoint %s lists %d models; keeping %d (at most %d names of at most %d chars)",
                self.name,
                len(listed),
                len(ids),
                MAX_MODELS_PER_ENDPOINT,
                MAX_MODEL_NAME_CHARS,
            )
        self.models = ids
        if self.affinity.kind == "id_slot" and not self.affinity.slots:
            self.slots = await self._total_slots()
        return ids

    async def _total_slots(self) -> int:
        """llama-server's slot count from ``GET /props`` (0 when it does not say)."""
        root = self.base_url.removesuffix("/v1")
        headers = {"Authorization": f"Bearer {self._key.reveal()}"} if self._key.reveal() else {}
        timeout = aiohttp.ClientTimeout(total=self.timeouts.discovery_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.get(f"{root}/props", headers=headers) as resp,
            ):
                if resp.status != 200:
                    return 0
                return int((await resp.json(content_type=None)).get("total_slots", 0))
        except (aiohttp.ClientError, TimeoutError, ValueError, TypeError, AttributeError):
            return 0

    def session_id(self, session: str) -> str:
        """The opaque id sent for ``session`` (room + persona): a keyed hash of it."""
        return session_id(self._salt, session)

    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        *,
        session: str | None = None,
        model: str | None = None,
    ) -> RemoteGeneration:
        """Stream a chat completion; ``model`` defaults to the configured or only model."""
        chosen = model or self.default_model or (self.models[0] if len(self.models) == 1 else None)
        if chosen is None:
            raise RequestRejected(
                f"endpoint {self.name}: no model given and none is the default",
                endpoint=self.name,
            )
        return RemoteGeneration(self, chosen, messages, params, session)

    def count_error(self, err: RemoteError) -> None:
        """Report a failed call (labelled by endpoint name, never its URL or key)."""
        self.hooks.endpoint_error(self.name, err.kind)

    # --- helpers used by RemoteGeneration -------------------------------------------

    def _request_kwargs(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        session: str | None = None,
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": model,
            "messages": [_wire_message(m) for m in messages],
            "stream": True,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if params.stop:
            kwargs["stop"] = list(params.stop)
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if params.tools:
            kwargs["tools"] = [_wire_tool(t) for t in params.tools]
            kwargs["tool_choice"] = _wire_choice(params.tool_choice)
        if params.response_format is not None:
            # The nested form of OpenAI's API; llama.cpp's server turns it into a grammar.
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": params.response_format.name,
                    "schema": dict(params.response_format.schema),
                    "strict": True,
                },
            }
        if self._optional_fields:
            kwargs["stream_options"] = {"include_usage": True}
            if self._extra_sampling:
                # Understood by llama.cpp servers; vLLM ignores unknown fields.
                kwargs["extra_body"] = {
                    "top_k": params.top_k,
                    "min_p": params.min_p,
                    "repeat_penalty": params.repeat_penalty,
                }
        if params.logit_bias:
            kwargs["logit_bias"] = {str(t): b for t, b in params.logit_bias}
        if session is not None:
            apply_affinity(self.affinity, self.session_id(session), kwargs, slots=self.slots)
        return kwargs

    def scrub(self, text: str) -> str:
        """Remove the key from ``text`` and keep it short: an excerpt for the log."""
        key = self._key.reveal()
        if key and len(key) >= 4:
            text = text.replace(key, "***")
        text = " ".join(text.split())
        return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"

    def _log_detail(self, what: str, detail: str) -> None:
        """What the endpoint said, for the operator only (bounded, key scrubbed)."""
        if detail:
            log.info("endpoint %s: %s: %r", self.name, what, self.scrub(detail))

    async def within(self, step: Awaitable[T], deadline: float) -> T:
        """``step``, or :class:`DeadlineExceeded` once ``deadline`` (monotonic) passed."""
        try:
            return await asyncio.wait_for(step, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded(
                f"endpoint {self.name}: no complete answer within {self.timeouts.total_s:g}s",
                endpoint=self.name,
                kind="timeout",
            ) from None

    def map_error(self, exc: BaseException) -> RemoteError:
        """Translate a client exception into a safe :class:`RemoteError`."""
        name = self.name
        if isinstance(exc, RemoteError):
            return exc
        if isinstance(exc, openai.APITimeoutError):
            return EndpointUnavailable(f"endpoint {name}: timed out", endpoint=name, kind="timeout")
        if isinstance(exc, openai.APIConnectionError):
            return EndpointUnavailable(
                f"endpoint {name}: cannot connect", endpoint=name, kind="connect"
            )
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            # The body is the endpoint's text: logged, never put in a message for a room.
            self._log_detail(f"HTTP {status}", _status_detail(exc) or str(exc.body or ""))
            msg = f"endpoint {name}: HTTP {status}"
            if status in (401, 403):
                return EndpointAuthError(
                    f"endpoint {name}: HTTP {status}: the API key was refused",
                    endpoint=name,
                    status=status,
                )
            if status == 404:
                return ModelNotServed(msg, endpoint=name, status=status)
            if status in (408, 409, 425, 429) or status >= 500:
                return EndpointUnavailable(msg, endpoint=name, status=status)
            return RequestRejected(msg, endpoint=name, status=status)
        self._log_detail(type(exc).__name__, str(exc))
        if isinstance(exc, openai.OpenAIError):
            # Decoding errors and the like; their text may quote the response.
            return EndpointUnavailable(
                f"endpoint {name}: unusable answer ({type(exc).__name__})", endpoint=name
            )
        # Transport errors escaping the client mid-stream (httpx read errors etc.).
        return EndpointUnavailable(
            f"endpoint {name}: {type(exc).__name__}",
            endpoint=name,
            kind="timeout" if isinstance(exc, TimeoutError) else "connect",
        )


def _wire_message(m: ChatMessage) -> dict[str, Any]:
    """A message as the OpenAI API takes it (calls with JSON-string arguments)."""
    data: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.role == "assistant" and m.tool_calls:
        data["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments_json()},
            }
            for c in m.tool_calls
        ]
    if m.role == "tool":
        data["tool_call_id"] = m.tool_call_id or ""
    return data


def _wire_tool(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": dict(tool.parameters),
        },
    }


def _wire_choice(choice: str) -> Any:
    if choice in (AUTO, NONE, REQUIRED):
        return choice
    return {"type": "function", "function": {"name": choice}}


def _arguments(raw: str) -> dict[str, Any]:
    """A call's streamed argument text as an object; {} when it is not one (the
    tool then says which arguments are missing, and the model sees that)."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw, strict=False)
    except ValueError:
        log.info("a tool call's arguments are not JSON: %.80r", raw)
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(slots=True)
class _CallParts:
    """One streamed tool call being put together from its deltas."""

    id: str = ""
    name: str = ""
    arguments: str = ""

    def add(self, delta: Any) -> None:
        if getattr(delta, "id", None):
            self.id = str(delta.id)
        fn = getattr(delta, "function", None)
        if fn is None:
            return
        name = getattr(fn, "name", None)
        # Some servers (llama_cpp.server) repeat the whole name in every chunk.
        if name and name != self.name:
            self.name += name
        if getattr(fn, "arguments", None):
            self.arguments += fn.arguments


_OPTIONAL_FIELD_HINTS = ("stream_options", "top_k", "min_p", "repeat_penalty", "extra", "unrecog")


def _about_fields(exc: openai.APIStatusError) -> bool:
    """Whether a 400/422 complains about fields (not, say, a prompt that is too long)."""
    detail = (_status_detail(exc) or str(exc.body)).lower()
    return any(hint in detail for hint in _OPTIONAL_FIELD_HINTS)


def _about_tools(exc: openai.APIStatusError) -> bool:
    """Whether a 400/422 refuses tool calls (not something else about the request)."""
    detail = (_status_detail(exc) or str(exc.body)).lower()
    return "tool" in detail


def _status_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            message = inner.get("message") or inner.get("detail")
            if message:
                return str(message)
        elif isinstance(inner, str):
            return inner
    return ""


class RemoteGeneration(StreamingGeneration):
    """One streamed chat completion against a :class:`RemoteEndpoint`."""

    def __init__(
        self,
        endpoint: RemoteEndpoint,
        model: str,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        session: str | None,
    ) -> None:
        super().__init__(GenerationStats(model=model, backend=endpoint.name))
        self.endpoint = endpoint
        self.session = session
        self._messages = list(messages)
        self._params = params
        self._stream_response: Any = None
        #: The tools of a request sent in the reply envelope (the endpoint refused
        #: native tool calls): the answer is read back as an envelope.
        self._envelope_tools: tuple[ToolSpec, ...] = ()
        if params.tools and not endpoint.native_tools:
            self._to_envelope()

    def _to_envelope(self) -> None:
        self._envelope_tools = self._params.tools
        self._messages, self._params = envelope_request(self._messages, self._params)

    async def _release(self) -> None:
        stream, self._stream_response = self._stream_response, None
        if stream is not None:
            try:
                await stream.close()
            except Exception:  # closing a broken connection may fail again
                log.debug("closing stream of %s failed", self.endpoint.name, exc_info=False)

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, RemoteError):
            self.endpoint.count_error(exc)  # once per failed request, wherever in it it failed

    @property
    def _deadline(self) -> float:
        return self.stats.started_at + self.endpoint.timeouts.total_s

    async def _open(self) -> Any:
        ep = self.endpoint
        kwargs = ep._request_kwargs(self.stats.model, self._messages, self._params, self.session)
        try:
            return await ep.within(ep._client.chat.completions.create(**kwargs), self._deadline)
        except openai.APIStatusError as exc:
            if exc.status_code in (400, 422) and self._params.tools and _about_tools(exc):
                # vLLM without a tool parser, servers without tool support: ask for the
                # reply envelope under response_format instead, now and from now on.
                log.info("endpoint %s refused tool calls; using the reply envelope", ep.name)
                ep.native_tools = False
                self._to_envelope()
                return await self._open()
            if exc.status_code in (400, 422) and ep._optional_fields and _about_fields(exc):
                # Some servers reject stream_options or unknown sampling fields.
                log.info("endpoint %s rejected optional fields; retrying without", ep.name)
                ep._optional_fields = False
                kwargs = ep._request_kwargs(
                    self.stats.model, self._messages, self._params, self.session
                )
                try:
                    return await ep.within(
                        ep._client.chat.completions.create(**kwargs), self._deadline
                    )
                except Exception as exc2:
                    raise ep.map_error(exc2) from None
            raise ep.map_error(exc) from None
        except Exception as exc:
            raise ep.map_error(exc) from None

    async def _stream(self) -> AsyncGenerator[str, None]:
        ep, stats = self.endpoint, self.stats
        got_text = False
        finish: str | None = None
        chunks = 0
        # Calls written as text are looked for only when a call was possible.
        self._stream_response = await self._open()
        params = self._params  # the envelope's, if the endpoint refused tools
        names = [t.name for t in params.tools] if params.tool_choice != NONE else []
        text_calls = TextCallFilter() if names else None
        envelope = EnvelopeStream() if self._envelope_tools else None
        parts: dict[int, _CallParts] = {}
        chunk_iter = aiter(self._stream_response)
        try:
            while True:
                try:
                    chunk = await ep.within(anext(chunk_iter), self._deadline)
                except StopAsyncIteration:
                    break
                usage = getattr(chunk, "usage", None)
                if usage is not None:
                    _apply_usage(stats, usage)
                for choice in chunk.choices or ():
                    if choice.finish_reason:
                        finish = choice.finish_reason
                    delta = choice.delta
                    for call in (getattr(delta, "tool_calls", None) or ()) if delta else ():
                        stats.mark_first_token()
                        chunks += 1
                        parts.setdefault(int(getattr(call, "index", 0) or 0), _CallParts()).add(
                            call
                        )
                    text = delta.content if delta else None
                    if text:
                        stats.mark_first_token()
                        chunks += 1
                        if envelope is not None:
                            text = envelope.feed(text)
                        elif text_calls is not None:
                            text = text_calls.feed(text)
                        if text:
                            got_text = True
                            yield text
        except RemoteError:
            raise
        except Exception as exc:
            err = ep.map_error(exc)
            if got_text:
                raise StreamInterrupted(
                    f"endpoint {ep.name}: stream broke after the reply started ({err})",
                    endpoint=ep.name,
                    kind=err.kind,
                ) from None
            raise err from None
        if finish is None:
            err_msg = f"endpoint {ep.name}: stream ended without a finish reason"
            if got_text:
                raise StreamInterrupted(err_msg, endpoint=ep.name)
            raise EndpointUnavailable(err_msg, endpoint=ep.name)
        if parts:
            self.tool_calls = [
                ToolCall(p.id or new_call_id(), p.name, _arguments(p.arguments))
                for _, p in sorted(parts.items())
                if p.name
            ]
        if envelope is not None:
            env, rest = envelope.finish(self._envelope_tools)
            if rest:
                yield rest
            if env.call is not None:
                self.tool_calls, self.tool_note = [env.call], env.note
        elif text_calls is not None:
            rest, found = text_calls.finish(names)
            if not self.tool_calls and found:
                self.tool_calls = list(found)
            elif rest:
                yield rest
        if stats.completion_tokens == 0:
            stats.completion_tokens = chunks  # no usage block: one token per chunk
        stats.finish("length" if finish == "length" else "stop")


def _apply_usage(stats: GenerationStats, usage: Any) -> None:
    stats.prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
    stats.completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    details = getattr(usage, "prompt_tokens_details", None)
    cached = int(getattr(details, "cached_tokens", 0) or 0) if details is not None else 0
    stats.cached_tokens = cached
    stats.evaluated_tokens = max(0, stats.prompt_tokens - cached)


def usable_model_ids(listed: Sequence[object]) -> list[str]:
    """The first MAX_MODELS_PER_ENDPOINT distinct, printable, not too long names."""
    ids: dict[str, None] = {}
    for name in listed:
        if len(ids) >= MAX_MODELS_PER_ENDPOINT:
            break
        if (
            isinstance(name, str)
            and 0 < len(name) <= MAX_MODEL_NAME_CHARS
            and name.isprintable()
            and name.strip() == name
        ):
            ids[name] = None
    return list(ids)
