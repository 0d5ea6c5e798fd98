"""Request bodies of ``/v1/chat/completions`` and ``/v1/completions``, checked.

Every field the API understands is validated here and turned into the
engine's :class:`SamplingParams`; a bad value is a 400 naming the field, as
OpenAI's API does. Fields llama.cpp servers also take (``top_k``, ``min_p``,
``repeat_penalty``, ``ignore_eos``) are accepted; ``n`` other than 1,
``logprobs``, ``echo``, tools and audio are refused rather than ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hivebridge.inference.types import ChatMessage, SamplingParams

from .errors import bad_request

_ROLES = ("system", "user", "assistant", "developer")
_MAX_STOPS = 4
_PENALTIES = ("frequency_penalty", "presence_penalty")  # 0 only


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """One checked request: chat (``messages``) or plain completion (``prompt``)."""

    model: str
    params: SamplingParams
    stream: bool
    include_usage: bool
    messages: tuple[ChatMessage, ...] = ()
    prompt: str | None = None
    user: str | None = None


def parse_chat(body: Any, max_tokens_limit: int, default_max_tokens: int) -> ApiRequest:
    data = _object(body)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array.", "messages")
    parsed = tuple(_message(m, i) for i, m in enumerate(messages))
    _refuse(data, ("tools", "functions", "audio", "logprobs", "top_logprobs", *_PENALTIES))
    return _request(data, max_tokens_limit, default_max_tokens, messages=parsed)


def parse_completion(body: Any, max_tokens_limit: int, default_max_tokens: int) -> ApiRequest:
    data = _object(body)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string (or an array of one string).", "prompt")
    _refuse(data, ("logprobs", "suffix", *_PENALTIES))
    if data.get("echo"):
        raise bad_request("'echo' is not supported.", "echo")
    if data.get("best_of") not in (None, 1):
        raise bad_request("'best_of' must be 1.", "best_of")
    return _request(data, max_tokens_limit, default_max_tokens, prompt=prompt)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _refuse(data: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if data.get(name) not in (None, False, [], 0):
            raise bad_request(f"'{name}' is not supported by this server.", name)


def _message(raw: Any, i: int) -> ChatMessage:
    where = f"messages[{i}]"
    if not isinstance(raw, dict):
        raise bad_request(f"'{where}' must be an object.", where)
    role = raw.get("role")
    if role not in _ROLES:
        raise bad_request(f"'{where}.role' must be one of {', '.join(_ROLES)}.", f"{where}.role")
    content = raw.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad_request(f"'{where}.content' may only hold text parts.", where)
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise bad_request(f"'{where}.content' must be a string.", f"{where}.content")
    return ChatMessage("system" if role == "developer" else role, content)


def _number(data: dict[str, Any], name: str, lo: float, hi: float, default: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number.", name)
    if not lo <= value <= hi:
        raise bad_request(f"'{name}' must be between {lo:g} and {hi:g}, got {value}.", name)
    return float(value)


def _integer(data: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer.", name)
    if not lo <= value <= hi:
        raise bad_request(f"'{name}' must be between {lo} and {hi}, got {value}.", name)
    return value


def _request(
    data: dict[str, Any],
    max_tokens_limit: int,
    default_max_tokens: int,
    **kind: Any,
) -> ApiRequest:
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' must name a model (GET /v1/models lists them).", "model")
    if data.get("n") not in (None, 1):
        raise bad_request("Only 'n': 1 is supported.", "n")
    max_tokens = _integer(data, "max_completion_tokens", 1, max_tokens_limit)
    if max_tokens is None:
        max_tokens = _integer(data, "max_tokens", 1, max_tokens_limit)
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false.", "stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", "stream_options")
    user = data.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        raise bad_request("'user' must be a string of at most 256 characters.", "user")
    ignore_eos = data.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad_request("'ignore_eos' must be true or false.", "ignore_eos")
    params = SamplingParams(
        max_tokens=max_tokens or default_max_tokens,
        temperature=_number(data, "temperature", 0.0, 2.0, 0.7),
        top_p=_number(data, "top_p", 0.0, 1.0, 0.95),
        top_k=int(_number(data, "top_k", 0, 1000, 40)),
        min_p=_number(data, "min_p", 0.0, 1.0, 0.05),
        repeat_penalty=_number(data, "repeat_penalty", 0.0, 10.0, 1.0),
        seed=_integer(data, "seed", -(2**63), 2**63 - 1),
        stop=_stops(data.get("stop")),
        logit_bias=_logit_bias(data.get("logit_bias")),
        ignore_eos=ignore_eos,
    )
    return ApiRequest(
        model=model.strip(),
        params=params,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        user=user,
        **kind,
    )


def _stops(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(stops, list)
        or len(stops) > _MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise bad_request(
            f"'stop' must be a non-empty string or an array of at most {_MAX_STOPS}.", "stop"
        )
    return tuple(stops)


def _logit_bias(raw: Any) -> tuple[tuple[int, float], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or len(raw) > 300:
        raise bad_request("'logit_bias' must map at most 300 token ids to biases.", "logit_bias")
    found = []
    for key, value in raw.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad_request(
                f"'logit_bias' key {key!r} is not a token id.", "logit_bias"
            ) from None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not -100 <= value <= 100
        ):
            raise bad_request(
                f"'logit_bias' value for {key} must be between -100 and 100.", "logit_bias"
            )
        if token < 0:
            raise bad_request(f"'logit_bias' key {key} is not a token id.", "logit_bias")
        found.append((token, float(value)))
    return tuple(found)
