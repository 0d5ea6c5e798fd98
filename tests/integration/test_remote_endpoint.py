"""Remote endpoints and the router against a real ``llama_cpp.server`` (no mocked HTTP).

One server (started with an API key) serves the module; the test that kills a
server mid-session starts its own. Skipped only when llama-cpp-python[server] or
the bundled model is missing, and never when CI=true.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator, Sequence

import pytest

from hivebridge.inference.endpoints import RetryPolicy, RouterConfig
from hivebridge.inference.remote import (
    EndpointAuthError,
    EndpointTimeouts,
    EndpointUnavailable,
    RemoteEndpoint,
    StreamInterrupted,
)
from hivebridge.inference.router import InferenceRouter
from hivebridge.inference.types import (
    ChatMessage,
    GenerationStats,
    InferenceError,
    SamplingParams,
    collect,
)
from tests.support.llama_server import (
    LlamaServer,
    free_port,
    llama_server_missing,
    start_llama_server,
)

pytestmark = pytest.mark.model

KEY = "sk-hivebridge-TOPSECRET-7f3a9c"
WRONG_KEY = "sk-hivebridge-WRONGKEY-0000"
ALIAS = "smollm2"
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, seed=1)
HELLO = [ChatMessage("system", "You are terse."), ChatMessage("user", "Say hello.")]
STORY = [ChatMessage("user", "Write a long story about a dragon and a knight.")]
FAST = EndpointTimeouts(connect_s=2.0, read_s=20.0, discovery_s=5.0)
CONFIG = RouterConfig(retry=RetryPolicy(max_attempts=3, backoff_s=0.05), timeouts=FAST)

_missing = llama_server_missing()
if _missing and os.environ.get("CI") == "true":
    pytest.fail(f"CI=true but the real server cannot run: {_missing}", pytrace=False)
if _missing:
    pytest.skip(_missing, allow_module_level=True)


@pytest.fixture(scope="module")
def server() -> Iterator[LlamaServer]:
    srv = start_llama_server(ALIAS, extra_args=["--api_key", KEY])
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def endpoint(server: LlamaServer) -> AsyncIterator[RemoteEndpoint]:
    ep = RemoteEndpoint("gpu1", server.base_url, KEY, timeouts=FAST)
    yield ep
    await ep.aclose()


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there


class FakeLocal:
    """Stands in for the local engine as the router's fallback."""

    name = "local"

    def __init__(self) -> None:
        self.calls = 0

    def generate(
        self, messages: Sequence[ChatMessage], params: SamplingParams, *, session: str | None = None
    ) -> _LocalGen:
        self.calls += 1
        return _LocalGen()


class _LocalGen:
    def __init__(self) -> None:
        self.stats = GenerationStats(model=ALIAS, backend="local")
        self._it = self._run()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._it

    async def _run(self) -> AsyncIterator[str]:
        self.stats.mark_first_token()
        yield "local answer"
        self.stats.completion_tokens = 2
        self.stats.finish("stop")

    async def aclose(self) -> None:
        pass


async def test_list_models_returns_alias(endpoint: RemoteEndpoint) -> None:
    assert await endpoint.list_models() == [ALIAS]
    assert endpoint.models == [ALIAS]


async def test_greedy_stream_arrives_with_stats(endpoint: RemoteEndpoint) -> None:
    gen = endpoint.generate(HELLO, GREEDY, model=ALIAS)
    pieces = [piece async for piece in gen]
    text = "".join(pieces)
    assert text.strip() and len(pieces) >= 2  # really streamed
    s = gen.stats
    assert s.backend == "gpu1" and s.model == ALIAS
    assert s.ttft_s is not None and 0 < s.ttft_s <= s.total_s
    assert 0 < s.completion_tokens <= GREEDY.max_tokens
    assert s.finish_reason in ("stop", "length")
    again = await collect(endpoint.generate(HELLO, GREEDY, model=ALIAS))
    assert again == text  # temperature 0: same answer


async def test_failover_from_closed_port_to_live_endpoint(server: LlamaServer) -> None:
    router = InferenceRouter(config=CONFIG)
    try:
        # Both in one pool: one model name, served by either.
        live = await router.add_endpoint("live", server.base_url, KEY, pool="p")
        assert live.healthy and live.models == (f"p/{ALIAS}",)
        # "dead" served the model when discovered, then went away.
        dead = RemoteEndpoint("dead", closed_url(), KEY, timeouts=FAST)
        await router.add_deployment(dead, models=[ALIAS], pool="p")
        rooms = (f"room{i}" for i in range(99))
        session = next(s for s in rooms if router.plan(f"p/{ALIAS}", s)[0] == "dead")
        gen = router.generate(HELLO, GREEDY, session=session, model=f"p/{ALIAS}")
        assert (await collect(gen)).strip()
        assert gen.served_by == "live" and gen.failed_over_from == ["dead"]
        assert gen.stats.backend == "live" and gen.stats.completion_tokens > 0
        assert router.sticky_endpoint(session) == "live"
        infos = {i.name: i for i in router.endpoints()}
        assert infos["dead"].last_error is not None and "cannot connect" in infos["dead"].last_error
        assert infos["live"].latency_ms is not None and infos["live"].healthy
    finally:
        await router.aclose()


async def test_server_dying_mid_session(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    doomed = start_llama_server(ALIAS)
    local = FakeLocal()
    router = InferenceRouter(fallback=local, config=CONFIG)
    try:
        await router.add_endpoint("doomed", doomed.base_url, KEY)
        model = f"doomed/{ALIAS}"
        first = router.generate(HELLO, GREEDY, session="room", model=model)
        assert (await collect(first)).strip() and first.served_by == "doomed"

        # The server dies after the first token: the stream ends with an error and
        # nothing is retried (no duplicate text, the fallback is not asked).
        gen = router.generate(
            STORY, SamplingParams(max_tokens=200, temperature=0.0), session="room", model=model
        )
        pieces: list[str] = []
        with pytest.raises(InferenceError) as broke:
            async for piece in gen:
                if not pieces:
                    doomed.kill()
                pieces.append(piece)
        assert pieces and isinstance(broke.value, StreamInterrupted), broke.value
        assert gen.stats.finish_reason == "error" and local.calls == 0
        assert len(pieces) < 200

        # The next request in the session falls back to the local backend.
        after = router.generate(HELLO, GREEDY, session="room", model=model)
        assert await collect(after) == "local answer"
        assert after.used_fallback and after.served_by == "local"
        assert after.failed_over_from == ["doomed"] and local.calls == 1
        assert any("doomed" in note for note in after.notes)
        info = router.endpoint_info("doomed")
        assert info is not None and not info.healthy
    finally:
        await router.aclose()
        doomed.stop()
    assert not any(KEY in r.getMessage() for r in caplog.records)


async def test_api_key_never_leaks(server: LlamaServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good = RemoteEndpoint("gpu1", server.base_url, KEY, timeouts=FAST)
    wrong = RemoteEndpoint("gpu2", server.base_url, WRONG_KEY, timeouts=FAST)
    gone = RemoteEndpoint("gpu3", closed_url(), KEY, timeouts=FAST)
    router = InferenceRouter(config=CONFIG)
    errors: list[BaseException] = []
    try:
        assert good.masked_key() == "sk-…3a9c"
        assert KEY not in repr(good) and KEY not in str(good)
        with pytest.raises(EndpointAuthError) as auth:
            await wrong.list_models()
        errors.append(auth.value)
        with pytest.raises(EndpointAuthError) as auth2:
            await collect(wrong.generate(HELLO, GREEDY, model=ALIAS))
        errors.append(auth2.value)
        with pytest.raises(EndpointUnavailable) as conn:
            await collect(gone.generate(HELLO, GREEDY, model=ALIAS))
        errors.append(conn.value)
        info = await router.add_endpoint("gpu3", gone.base_url, KEY)
        assert info.last_error is not None and KEY not in repr(info)
        with pytest.raises(InferenceError) as routed:
            await collect(router.generate(HELLO, GREEDY, model=f"gpu3/{ALIAS}"))
        errors.append(routed.value)
        assert await collect(good.generate(HELLO, GREEDY, model=ALIAS))
    finally:
        for ep in (good, wrong, gone):
            await ep.aclose()
        await router.aclose()
    for err in errors:
        text = f"{err} {err!r} {err.__cause__!r} {err.__context__!r}"
        assert KEY not in text and WRONG_KEY not in text
    for record in caplog.records:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        assert KEY not in text and WRONG_KEY not in text
    assert caplog.records  # something was logged and checked
