"""Router choice and failover order, with fake deployments and backends (no HTTP)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from hivebridge.inference.endpoints import RetryPolicy, RouterConfig
from hivebridge.inference.health import BreakerConfig
from hivebridge.inference.hooks import NO_HOOKS, InferenceHooks
from hivebridge.inference.remote import (
    EndpointAuthError,
    EndpointUnavailable,
    RequestRejected,
    StreamInterrupted,
)
from hivebridge.inference.router import InferenceRouter
from hivebridge.inference.types import (
    Backend,
    BackendUnavailable,
    ChatMessage,
    GenerationStats,
    InferenceError,
    SamplingParams,
    collect,
)

MSGS = [ChatMessage("user", "hi")]
#: The fake deployments share a pool, so "m" of each is one model name.
M = "p/m"
PARAMS = SamplingParams(max_tokens=8)


class FakeGen:
    def __init__(
        self,
        name: str,
        pieces: Sequence[str],
        fail_before: Exception | None = None,
        fail_after: int | None = None,
    ) -> None:
        self.stats = GenerationStats(model=M, backend=name)
        self.closed = False
        self._pieces = list(pieces)
        self._fail_before = fail_before
        self._fail_after = fail_after
        self._it = self._run()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._it

    async def _run(self) -> AsyncGenerator[str, None]:
        if self._fail_before is not None:
            raise self._fail_before
        for i, piece in enumerate(self._pieces):
            self.stats.mark_first_token()
            yield piece
            if self._fail_after is not None and i + 1 >= self._fail_after:
                raise StreamInterrupted("stream broke", endpoint=self.stats.backend)
        self.stats.completion_tokens = len(self._pieces)
        self.stats.finish("stop")

    async def aclose(self) -> None:
        self.closed = True
        await self._it.aclose()


@dataclass
class FakeDeployment:
    """Scripted endpoint: ``script`` holds one outcome per call, then plain success."""

    name: str
    served: list[str] = field(default_factory=lambda: ["m"])
    script: list[Exception | int | None] = field(default_factory=list)
    list_error: InferenceError | None = None
    base_url: str = "http://fake/v1"
    calls: list[tuple[str | None, str | None]] = field(default_factory=list)
    gens: list[FakeGen] = field(default_factory=list)
    closed: bool = False

    def masked_key(self) -> str:
        return "****"

    async def list_models(self) -> list[str]:
        if self.list_error is not None:
            raise self.list_error
        return list(self.served)

    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        *,
        session: str | None = None,
        model: str | None = None,
    ) -> FakeGen:
        self.calls.append((session, model))
        outcome = self.script.pop(0) if self.script else None
        pieces = [f"{self.name}:", "a", "b"]
        if isinstance(outcome, Exception):
            gen = FakeGen(self.name, pieces, fail_before=outcome)
        else:
            gen = FakeGen(self.name, pieces, fail_after=outcome)
        self.gens.append(gen)
        return gen

    async def aclose(self) -> None:
        self.closed = True


class FakeLocal:
    def __init__(self, name: str, error: InferenceError | None = None) -> None:
        self.name = name
        self.calls = 0
        self.error = error

    def generate(
        self, messages: Sequence[ChatMessage], params: SamplingParams, *, session: str | None = None
    ) -> FakeGen:
        self.calls += 1
        return FakeGen(self.name, [f"{self.name}:", "x"], fail_before=self.error)


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def down(name: str) -> EndpointUnavailable:
    return EndpointUnavailable(f"endpoint {name}: cannot connect", endpoint=name)


async def make_router(
    *deployments: FakeDeployment,
    fallback: Backend | None = None,
    retry: RetryPolicy | None = None,
    breaker: BreakerConfig | None = None,
    hooks: InferenceHooks = NO_HOOKS,
) -> tuple[InferenceRouter, Sleeps]:
    sleeps = Sleeps()
    config = RouterConfig(retry=retry or RetryPolicy(), breaker=breaker or BreakerConfig())
    router = InferenceRouter(fallback=fallback, config=config, sleep=sleeps, hooks=hooks)
    for d in deployments:
        await router.add_deployment(d, pool="p")
    return router, sleeps


async def test_session_sticks_to_one_endpoint_and_sessions_spread() -> None:
    a, b = FakeDeployment("a"), FakeDeployment("b")
    router, _ = await make_router(a, b)
    first = router.plan(M, "room1")[0]
    for _ in range(3):
        gen = router.generate(MSGS, PARAMS, session="room1", model=M)
        assert (await collect(gen)).startswith(first)
        assert gen.served_by == first and not gen.failed_over
    assert router.sticky_endpoint("room1") == first
    used = {router.plan(M, f"room{i}")[0] for i in range(40)}
    assert used == {"a", "b"}  # rendezvous hashing spreads new sessions


async def test_sticky_endpoint_down_fails_over_and_stickiness_moves() -> None:
    a, b = FakeDeployment("a"), FakeDeployment("b")
    router, sleeps = await make_router(a, b)
    sticky, other = router.plan(M, "room")
    (a if sticky == "a" else b).script = [down(sticky)]
    gen = router.generate(MSGS, PARAMS, session="room", model=M)
    assert await collect(gen) == f"{other}:ab"
    assert gen.served_by == other and gen.failed_over_from == [sticky]
    assert gen.stats.backend == other and gen.stats.finish_reason == "stop"
    assert any("cannot connect" in n for n in gen.notes)
    assert sleeps.calls == []  # moving to another endpoint needs no backoff
    assert router.sticky_endpoint("room") == other
    assert router.plan(M, "room")[0] == other


async def test_all_endpoints_down_uses_local_fallback_with_notes() -> None:
    a = FakeDeployment("a", script=[down("a")] * 5)
    local = FakeLocal("local")
    router, sleeps = await make_router(a, fallback=local, retry=RetryPolicy(max_attempts=3))
    gen = router.generate(MSGS, PARAMS, session="s", model=M)
    assert await collect(gen) == "local:x"
    assert gen.used_fallback and gen.served_by == "local"
    assert gen.failed_over_from == ["a"]
    assert len(a.calls) == 3 and len(sleeps.calls) == 2  # retried with backoff
    assert sleeps.calls[1] > sleeps.calls[0]
    assert all(g.closed or g.stats.finish_reason for g in a.gens)
    # Three failures in a row opened the breaker: the next request skips "a".
    gen = router.generate(MSGS, PARAMS, session="s", model=M)
    assert await collect(gen) == "local:x"
    assert len(a.calls) == 3
    assert any("cooling down" in n for n in gen.notes)
    info = router.endpoint_info("a")
    assert info is not None and not info.healthy and info.state == "open"
    assert info.last_error is not None and "cannot connect" in info.last_error


async def test_transient_error_retries_same_endpoint_with_backoff() -> None:
    a = FakeDeployment("a", script=[down("a")])
    router, sleeps = await make_router(a)
    gen = router.generate(MSGS, PARAMS, model=M)
    assert await collect(gen) == "a:ab"
    assert len(a.calls) == 2 and len(sleeps.calls) == 1
    assert gen.failed_over_from == ["a"] and gen.served_by == "a"


async def test_no_retry_after_first_token() -> None:
    a = FakeDeployment("a", script=[1])  # breaks after one piece
    b = FakeDeployment("b")
    local = FakeLocal("local")
    router, _ = await make_router(a, b, fallback=local)
    session = next(f"s{i}" for i in range(100) if router.plan(M, f"s{i}")[0] == "a")
    gen = router.generate(MSGS, PARAMS, session=session, model=M)
    pieces: list[str] = []
    with pytest.raises(InferenceError, match="stream broke"):
        async for piece in gen:
            pieces.append(piece)
    assert pieces == ["a:"]  # no duplicate or mixed text
    assert b.calls == [] and local.calls == 0
    assert gen.stats.finish_reason == "error"


async def test_bad_request_is_not_failed_over() -> None:
    a = FakeDeployment("a", script=[RequestRejected("HTTP 400: too long", endpoint="a")])
    b = FakeDeployment("b", script=[RequestRejected("HTTP 400: too long", endpoint="b")])
    local = FakeLocal("local")
    router, _ = await make_router(a, b, fallback=local)
    with pytest.raises(RequestRejected):
        await collect(router.generate(MSGS, PARAMS, session="s", model=M))
    assert len(a.calls) + len(b.calls) == 1 and local.calls == 0
    info = router.endpoints()
    assert all(i.healthy for i in info)


async def test_auth_error_trips_at_once_and_moves_on_without_retry() -> None:
    a = FakeDeployment("a", script=[EndpointAuthError("key refused", endpoint="a")])
    local = FakeLocal("local")
    router, sleeps = await make_router(a, fallback=local)
    gen = router.generate(MSGS, PARAMS, model=M)
    assert await collect(gen) == "local:x"
    assert len(a.calls) == 1 and sleeps.calls == []
    info = router.endpoint_info("a")
    assert info is not None and info.state == "open"


async def test_local_backend_for_model_comes_before_fallback() -> None:
    local_m, fallback = FakeLocal("local-m"), FakeLocal("fallback")
    router, _ = await make_router(fallback=fallback)
    router.set_local("m", local_m)  # a local name: no endpoint can serve it
    gen = router.generate(MSGS, PARAMS, model="m")
    assert await collect(gen) == "local-m:x"
    assert not gen.used_fallback
    local_m.error = BackendUnavailable("not loaded")
    gen = router.generate(MSGS, PARAMS, model="m")
    assert await collect(gen) == "fallback:x"
    assert gen.used_fallback and gen.failed_over_from == ["local-m"]


async def test_unknown_model() -> None:
    router, _ = await make_router(FakeDeployment("a"))
    with pytest.raises(BackendUnavailable, match="nope"):
        await collect(router.generate(MSGS, PARAMS, model="nope"))
    router.fallback = FakeLocal("fb")
    gen = router.generate(MSGS, PARAMS, model="nope")
    assert await collect(gen) == "fb:x"
    assert any("no endpoint serves model nope" in n for n in gen.notes)


async def test_add_remove_refresh_aliases_and_listing() -> None:
    a = FakeDeployment("a", served=["m", "n"])
    router, _ = await make_router(a)
    b = FakeDeployment("b", served=["n"])
    info = await router.add_deployment(b, pool="p")
    assert info.models == ("p/n",) and info.healthy and info.masked_key == "****"
    assert router.models() == {"p/m": ["a"], "p/n": ["a", "b"]}
    b.served = ["n", "o"]
    assert await router.refresh() == {"a": None, "b": None}
    assert router.models()["p/o"] == ["b"]
    router.set_alias("smart", "p/o")
    gen = router.generate(MSGS, PARAMS, model="smart")
    # The endpoint is sent its own id; the stats name the model as the bridge knows it.
    assert await collect(gen) == "b:ab" and gen.stats.model == "p/o"
    assert b.calls[-1][1] == "o"
    assert await router.remove_endpoint("b") and b.closed
    assert not await router.remove_endpoint("b")
    assert [i.name for i in router.endpoints()] == ["a"]
    await router.aclose()
    assert a.closed


async def test_cancel_mid_stream_closes_inner() -> None:
    a = FakeDeployment("a")
    router, _ = await make_router(a)
    gen = router.generate(MSGS, PARAMS, model=M)
    it = aiter(gen)
    assert await anext(it) == "a:"
    await gen.aclose()
    await gen.aclose()  # twice is fine
    assert gen.stats.finish_reason == "cancelled"
    assert a.gens[0].closed


async def test_model_route_is_a_backend_and_stats_cover_failover_time() -> None:
    a = FakeDeployment("a")
    router, _ = await make_router(a)
    route: Backend = router.for_model(M)
    assert route.name == M
    gen = route.generate(MSGS, PARAMS, session="s")
    assert await collect(gen) == "a:ab"
    assert gen.stats.ttft_s is not None and gen.stats.completion_tokens == 3
    info = router.endpoint_info("a")
    assert info is not None and info.latency_ms is not None


async def test_open_endpoint_gets_one_probe_after_cooldown() -> None:
    now = [0.0]
    a = FakeDeployment("a", script=[down("a")] * 3)
    local = FakeLocal("local")
    config = RouterConfig(retry=RetryPolicy(max_attempts=3), breaker=BreakerConfig(cooldown_s=5))
    router = InferenceRouter(fallback=local, config=config, clock=lambda: now[0], sleep=Sleeps())
    await router.add_deployment(a, models=["m"], pool="p")
    assert await collect(router.generate(MSGS, PARAMS, model=M)) == "local:x"
    assert len(a.calls) == 3
    now[0] += 4.9
    assert await collect(router.generate(MSGS, PARAMS, model=M)) == "local:x"
    assert len(a.calls) == 3  # still cooling down
    now[0] += 0.2
    gen = router.generate(MSGS, PARAMS, session="s", model=M)
    assert await collect(gen) == "a:ab"  # the probe went through and closed the breaker
    assert len(a.calls) == 4 and not gen.failed_over
    info = router.endpoint_info("a")
    assert info is not None and info.healthy


async def test_failure_moves_only_the_failed_endpoints_rooms_once() -> None:
    """Rendezvous + stickiness: rooms of a dead endpoint move once and stay; no other moves."""
    deps = {n: FakeDeployment(n) for n in ("a", "b", "c")}
    router, _ = await make_router(*deps.values(), breaker=BreakerConfig(consecutive_failures=1))
    rooms = [f"room{i}" for i in range(24)]
    home = {}
    for room in rooms:
        gen = router.generate(MSGS, PARAMS, session=room, model=M)
        await collect(gen)
        home[room] = gen.served_by
    assert set(home.values()) == {"a", "b", "c"}
    deps["b"].script = [down("b")] * 100
    for _ in range(3):
        for room in rooms:
            gen = router.generate(MSGS, PARAMS, session=room, model=M)
            await collect(gen)
            if home[room] != "b":
                assert gen.served_by == home[room]  # no other room moves
            else:
                assert gen.served_by in ("a", "c")
                assert router.sticky_endpoint(room) == gen.served_by
    moved = {r: router.sticky_endpoint(r) for r in rooms if home[r] == "b"}
    deps["b"].script = []  # back again: the moved rooms stay where they went
    for room, now in moved.items():
        gen = router.generate(MSGS, PARAMS, session=room, model=M)
        await collect(gen)
        assert gen.served_by == now


async def test_round_robin_ignores_rooms() -> None:
    a, b, c = FakeDeployment("a"), FakeDeployment("b"), FakeDeployment("c")
    config = RouterConfig(routing="round_robin")
    router = InferenceRouter(config=config)
    for d in (a, b, c):
        await router.add_deployment(d, pool="p")
    served = []
    for _ in range(6):
        gen = router.generate(MSGS, PARAMS, session="room", model=M)
        await collect(gen)
        served.append(gen.served_by)
    assert sorted(served) == ["a", "a", "b", "b", "c", "c"]
    assert router.sticky_endpoint("room") is None


async def test_pool_name_routes_over_its_members_by_inner_name() -> None:
    a, b = FakeDeployment("a", served=["llama"]), FakeDeployment("b", served=["llama"])
    other = FakeDeployment("other", served=["llama"])
    router = InferenceRouter()
    await router.add_deployment(a, pool="gpu")
    await router.add_deployment(b, pool="gpu")
    await router.add_deployment(other)
    assert sorted(router.plan("gpu/llama", "room")) == ["a", "b"]
    assert router.models()["gpu/llama"] == ["a", "b"]
    gen = router.generate(MSGS, PARAMS, session="room", model="gpu/llama")
    await collect(gen)
    assert gen.served_by in ("a", "b")
    served = a if gen.served_by == "a" else b
    assert served.calls == [("room", "llama")]  # the replica is asked for its own name
    assert router.pool.pools() == {"gpu": ["a", "b"]}


async def test_a_failed_request_marks_the_endpoint_down_at_once() -> None:
    """Passive health: one request that left an endpoint after failing marks it down
    (not three), and a probe after the cooldown brings it back."""
    now = [0.0]
    a = FakeDeployment("a", script=[down("a")])  # one failure, then the request moves on
    local = FakeLocal("local")
    config = RouterConfig(retry=RetryPolicy(max_attempts=1), breaker=BreakerConfig(cooldown_s=5))
    router = InferenceRouter(fallback=local, config=config, clock=lambda: now[0], sleep=Sleeps())
    await router.add_deployment(a, models=["m"])
    gen = router.generate(MSGS, PARAMS, model="a/m")
    assert await collect(gen) == "local:x" and gen.failed_over_from == ["a"]
    info = router.endpoint_info("a")
    assert info is not None and not info.healthy and info.status == "down"
    assert info.last_error is not None and "cannot connect" in info.last_error

    assert await router.pool.probe_down() == {}  # still cooling down: no probe yet
    now[0] += 5.1
    assert await router.pool.probe_down() == {"a": None}  # it answers /v1/models
    info = router.endpoint_info("a")
    assert info is not None and info.healthy and info.status == "up"


async def test_a_retry_that_works_is_a_blip_not_down() -> None:
    a = FakeDeployment("a", script=[down("a")])
    router, _ = await make_router(a)
    assert await collect(router.generate(MSGS, PARAMS, model=M)) == "a:ab"
    info = router.endpoint_info("a")
    assert info is not None and info.status == "up"


async def test_a_failed_probe_keeps_it_down() -> None:
    now = [0.0]
    a = FakeDeployment("a")
    config = RouterConfig(breaker=BreakerConfig(cooldown_s=5))
    router = InferenceRouter(config=config, clock=lambda: now[0], sleep=Sleeps())
    await router.add_deployment(a, models=["m"])
    router.pool.member("a").breaker.mark_down("gone")  # type: ignore[union-attr]
    now[0] += 5.1
    a.list_error = down("a")
    assert await router.pool.probe_down() == {"a": "endpoint a: cannot connect"}
    info = router.endpoint_info("a")
    assert info is not None and info.status == "down" and info.cooldown_remaining_s > 5
