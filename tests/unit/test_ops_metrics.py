"""Where metrics are recorded: homeserver send failures, endpoint errors and failovers,
finished generations and the local engine's gauges (no network but a refused connect)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from mautrix.errors import MatrixUnknownRequestError, MForbidden, MLimitExceeded, MNotFound

from hivebridge import metrics
from hivebridge.devserver.process import free_port
from hivebridge.inference.hooks import InferenceHooks
from hivebridge.inference.remote import (
    EndpointAuthError,
    EndpointUnavailable,
    RemoteEndpoint,
    RemoteError,
    RequestRejected,
)
from hivebridge.inference.types import GenerationStats, InferenceError, collect
from hivebridge.matrix.sender import counted, send_error_kind
from tests.unit.test_router import MSGS, PARAMS, FakeDeployment, FakeLocal, M, down, make_router

#: What the app connects: inference reports, metrics count.
HOOKS = InferenceHooks(metrics.count_endpoint_error, metrics.count_failover)


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def fail(exc: BaseException) -> None:
    raise exc


# --- homeserver sends ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (MLimitExceeded(429, "slow down"), "rate_limited"),
        (MatrixUnknownRequestError(429, text="Too Many Requests"), "rate_limited"),
        (MForbidden(403, "not in room"), "forbidden"),
        (MNotFound(404, "no room"), "not_found"),
        (MatrixUnknownRequestError(502, text="Bad Gateway"), "http"),
        (TimeoutError(), "timeout"),
        (aiohttp.ClientConnectionError("refused"), "network"),
    ],
)
async def test_failed_sends_are_counted_by_kind_and_reraised(exc: BaseException, kind: str) -> None:
    assert send_error_kind(exc) == kind
    errors = value("hivebridge_matrix_send_errors_total", kind=kind)
    limited = value("hivebridge_homeserver_rate_limited_total")
    with pytest.raises(type(exc)):
        await counted(fail(exc))
    assert value("hivebridge_matrix_send_errors_total", kind=kind) == errors + 1
    assert value("hivebridge_homeserver_rate_limited_total") == limited + (
        1 if kind == "rate_limited" else 0
    )


async def test_a_bug_is_no_send_error() -> None:
    before = sum(
        value("hivebridge_matrix_send_errors_total", kind=k) for k in metrics.SEND_ERROR_KINDS
    )
    with pytest.raises(ValueError):
        await counted(fail(ValueError("bug")))
    after = sum(
        value("hivebridge_matrix_send_errors_total", kind=k) for k in metrics.SEND_ERROR_KINDS
    )
    assert after == before
    assert await counted(asyncio.sleep(0, "ok")) == "ok"


# --- endpoints ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "kind"),
    [
        (EndpointAuthError("x", endpoint="e", status=401), "auth"),
        (EndpointUnavailable("x", endpoint="e", status=429), "rate_limited"),
        (EndpointUnavailable("x", endpoint="e", status=503), "http_5xx"),
        (RequestRejected("x", endpoint="e", status=400), "http_4xx"),
        (EndpointUnavailable("x", endpoint="e"), "bad_response"),
    ],
)
def test_remote_error_kinds(err: RemoteError, kind: str) -> None:
    assert err.kind == kind


async def test_a_refused_endpoint_is_counted_under_its_name_only() -> None:
    key = "sk-never-a-label-0123456789"
    ep = RemoteEndpoint("refusing", f"http://127.0.0.1:{free_port()}/v1", key, hooks=HOOKS)
    before = value("hivebridge_endpoint_errors_total", endpoint="refusing", kind="connect")
    try:
        with pytest.raises(InferenceError):
            await ep.list_models()
        with pytest.raises(InferenceError):
            await collect(ep.generate(MSGS, PARAMS, model="m"))
    finally:
        await ep.aclose()
    after = value("hivebridge_endpoint_errors_total", endpoint="refusing", kind="connect")
    assert after == before + 2  # discovery and one request, each counted once
    text = metrics.render()[0].decode()
    assert key not in text and "127.0.0.1" not in text


async def test_failover_counts_the_endpoint_left() -> None:
    a = FakeDeployment("fo-a", script=[down("fo-a")])
    b = FakeDeployment("fo-b")
    router, _ = await make_router(a, b, hooks=HOOKS)
    before = {n: value("hivebridge_endpoint_failovers_total", endpoint=n) for n in ("fo-a", "fo-b")}
    # Both orders of the plan: the failing one is tried first for some session.
    session = next(s for s in (f"s{i}" for i in range(100)) if router.plan(M, s)[0] == "fo-a")
    gen = router.generate(MSGS, PARAMS, session=session, model=M)
    assert (await collect(gen)).startswith("fo-b:")
    assert value("hivebridge_endpoint_failovers_total", endpoint="fo-a") == before["fo-a"] + 1
    assert value("hivebridge_endpoint_failovers_total", endpoint="fo-b") == before["fo-b"]


async def test_retrying_the_same_endpoint_is_no_failover() -> None:
    only = FakeDeployment("fo-only", script=[down("fo-only")])
    router, _ = await make_router(only, hooks=HOOKS)
    before = value("hivebridge_endpoint_failovers_total", endpoint="fo-only")
    assert (await collect(router.generate(MSGS, PARAMS, model=M))).startswith("fo-only:")
    assert value("hivebridge_endpoint_failovers_total", endpoint="fo-only") == before


async def test_failover_to_the_local_fallback_counts() -> None:
    dead = FakeDeployment("fo-dead", script=[down("fo-dead")] * 5)
    router, _ = await make_router(dead, fallback=FakeLocal("local:tiny"), hooks=HOOKS)
    before = value("hivebridge_endpoint_failovers_total", endpoint="fo-dead")
    assert (await collect(router.generate(MSGS, PARAMS, model=M))).startswith("local:tiny:")
    assert value("hivebridge_endpoint_failovers_total", endpoint="fo-dead") == before + 1


# --- generations and the local engine ------------------------------------------------------


def test_observe_generation_records_one_finished_generation() -> None:
    stats = GenerationStats(model="obs-m", prompt_tokens=30, cached_tokens=20, evaluated_tokens=10)
    stats.ttft_s, stats.total_s, stats.completion_tokens = 0.2, 1.5, 12
    metrics.observe_generation(stats, "obs-m")
    assert value("hivebridge_inference_time_to_first_token_seconds_count", model="obs-m") == 1
    assert value("hivebridge_inference_generation_seconds_sum", model="obs-m") == 1.5
    assert value("hivebridge_inference_completion_tokens_total", model="obs-m") == 12
    assert value("hivebridge_inference_prompt_tokens_evaluated_total", model="obs-m") == 10
    assert value("hivebridge_inference_prompt_tokens_reused_total", model="obs-m") == 20


def test_no_cache_report_means_no_prompt_split() -> None:
    stats = GenerationStats(model="obs-n", prompt_tokens=30)
    stats.ttft_s, stats.total_s, stats.completion_tokens = 0.1, 0.5, 3
    metrics.observe_generation(stats, "obs-n")
    assert value("hivebridge_inference_completion_tokens_total", model="obs-n") == 3
    assert value("hivebridge_inference_prompt_tokens_evaluated_total", model="obs-n") == 0
    assert value("hivebridge_inference_prompt_tokens_reused_total", model="obs-n") == 0


def test_queue_wait_is_observed_when_the_backend_reports_it() -> None:
    local = GenerationStats(model="qw-local", queue_wait_s=0.3)
    local.total_s = 1.0
    metrics.observe_generation(local, "qw-local")
    assert value("hivebridge_inference_queue_wait_seconds_count", model="qw-local") == 1
    assert value("hivebridge_inference_queue_wait_seconds_sum", model="qw-local") == 0.3
    assert value("hivebridge_inference_queue_wait_seconds_bucket", model="qw-local", le="0.5") == 1
    assert value("hivebridge_inference_queue_wait_seconds_bucket", model="qw-local", le="0.25") == 0
    remote = GenerationStats(model="qw-remote")  # an endpoint has no queue of ours
    remote.total_s = 1.0
    metrics.observe_generation(remote, "qw-remote")
    assert value("hivebridge_inference_queue_wait_seconds_count", model="qw-remote") == 0


def test_engine_gauges_are_read_at_each_scrape() -> None:
    loads = {"eg-m": (3, 2)}
    unwatch = metrics.watch_engines(lambda: loads)
    try:
        assert value("hivebridge_inference_queue_depth", model="eg-m") == 3
        assert value("hivebridge_inference_active_sequences", model="eg-m") == 2
        loads["eg-m"] = (0, 1)
        assert value("hivebridge_inference_queue_depth", model="eg-m") == 0
        assert value("hivebridge_inference_active_sequences", model="eg-m") == 1
        loads["eg-m"] = (5, 4)
    finally:
        unwatch()
    # A stopped engine queues nothing: its series stays, at zero.
    assert value("hivebridge_inference_queue_depth", model="eg-m") == 0
    assert value("hivebridge_inference_active_sequences", model="eg-m") == 0


def test_a_failing_engine_source_never_breaks_the_scrape() -> None:
    def broken() -> dict[str, tuple[int, int]]:
        raise RuntimeError("engine gone")

    unwatch_broken = metrics.watch_engines(broken)
    unwatch = metrics.watch_engines(lambda: {"eg-ok": (1, 1)})
    try:
        body, _ = metrics.render()
        assert b'hivebridge_inference_queue_depth{model="eg-ok"} 1.0' in body
    finally:
        unwatch()
        unwatch_broken()
