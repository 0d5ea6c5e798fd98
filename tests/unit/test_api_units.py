"""The API's pure parts: request checking, tokens and limits, and priority in the queue."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest

from hivebridge.inference.api.auth import ApiToken, Limiter, TokenTable
from hivebridge.inference.api.errors import ApiError
from hivebridge.inference.api.schemas import parse_chat, parse_completion
from hivebridge.inference.local.sampler import ResolvedSampling
from hivebridge.inference.local.scheduler import Request, Scheduler


def chat(**fields: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_chat_fields_become_sampling_params() -> None:
    req = parse_chat(
        chat(
            max_tokens=12, temperature=0, top_p=0.5, seed=3, stop="END",
            logit_bias={"42": -100}, stream=True, stream_options={"include_usage": True},
            user="u1",
        ),
        2048,
        256,
    )  # fmt: skip
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed) == (12, 0.0, 0.5, 3)
    assert p.stop == ("END",) and p.logit_bias == ((42, -100.0),)
    assert req.stream and req.include_usage and req.user == "u1"
    assert parse_chat(chat(), 2048, 256).params.max_tokens == 256
    assert parse_chat(chat(max_completion_tokens=7), 2048, 256).params.max_tokens == 7


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(temperature=2.5), "temperature"),
        (chat(temperature="hot"), "temperature"),
        (chat(max_tokens=5000), "max_tokens"),
        (chat(seed=1.5), "seed"),
        (chat(stop=[""]), "stop"),
        (chat(logit_bias={"-1": 1}), "logit_bias"),
        (chat(n=3), "n"),
        (chat(tools=[{"type": "function"}]), "tools"),
        (chat(presence_penalty=1), "presence_penalty"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ([1, 2], None),
    ],
)
def test_bad_fields_are_400_naming_them(body: object, param: str | None) -> None:
    with pytest.raises(ApiError) as err:
        parse_chat(body, 2048, 256)
    assert err.value.status == 400 and err.value.param == param


def test_completion_prompt() -> None:
    assert parse_completion({"model": "m", "prompt": ["once"]}, 64, 16).prompt == "once"
    with pytest.raises(ApiError):
        parse_completion({"model": "m", "prompt": ["a", "b"]}, 64, 16)
    with pytest.raises(ApiError):
        parse_completion({"model": "m", "prompt": "a", "echo": True}, 64, 16)


def test_tokens_are_found_by_secret_and_counted_by_name() -> None:
    table = TokenTable([ApiToken("a", "secret-a-0123456789"), ApiToken("b", "secret-b-012345678")])
    assert table.find("secret-b-012345678").name == "b"  # type: ignore[union-attr]
    assert table.find("secret-b") is None and table.find(None) is None
    assert "secret" not in repr(ApiToken("a", "secret-a-0123456789"))


def test_limits_per_token() -> None:
    now = [0.0]
    limiter = Limiter(clock=lambda: now[0])
    rpm = ApiToken("rpm", "x" * 16, requests_per_minute=2)
    for _ in range(2):
        limiter.admit(rpm)
        limiter.done(rpm, 10, 5, 0)
    with pytest.raises(ApiError) as err:
        limiter.admit(rpm)
    assert err.value.status == 429 and err.value.retry_after_s == 60.0
    now[0] = 61.0
    limiter.admit(rpm)  # a minute later there is room again
    one = ApiToken("one", "y" * 16, max_concurrent=1)
    limiter.admit(one)
    with pytest.raises(ApiError):
        limiter.admit(one)
    limiter.done(one, 1, 1, 0)
    limiter.admit(one)
    daily = ApiToken("daily", "z" * 16, tokens_per_day=20)
    limiter.admit(daily)
    limiter.done(daily, 15, 6, 0)
    with pytest.raises(ApiError):
        limiter.admit(daily)
    usage = limiter.usage_of("rpm").as_dict()
    assert usage["requests"] == 3 and usage["rejected"] == 1 and usage["prompt_tokens"] == 20


def _req(rid: int, priority: int) -> Request:
    sampling = ResolvedSampling(1, 0, 1, 0, 0, 1, 0, 0, ())
    return Request(rid, [1], sampling, None, lambda u: None, priority=priority)


def test_higher_priority_queues_ahead_fifo_within_a_priority() -> None:
    sched = SimpleNamespace(waiting=deque())
    for rid, prio in [(1, -1), (2, -1), (3, 0), (4, -1), (5, 0), (6, 1)]:
        Scheduler.submit(sched, _req(rid, prio))  # type: ignore[arg-type]
    assert [r.rid for r in sched.waiting] == [6, 3, 5, 1, 2, 4]
