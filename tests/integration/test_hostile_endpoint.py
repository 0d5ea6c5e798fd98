"""Remote endpoints that stall, trickle or answer errors with text of their own,
over real HTTP (tests/support/fake_endpoint.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from hivebridge.inference.remote import DeadlineExceeded, EndpointTimeouts, RemoteEndpoint
from hivebridge.inference.router import InferenceRouter
from hivebridge.inference.types import ChatMessage, InferenceError, SamplingParams
from tests.support.fake_endpoint import fake_endpoint
from tests.support.waiting import until

MSGS = [ChatMessage("user", "hi")]
PARAMS = SamplingParams(max_tokens=8)


async def test_a_trickling_stream_ends_at_the_total_deadline() -> None:
    """One chunk a second, each in time for the read timeout: before, the reply went
    on for as long as the endpoint liked (here 30 s); now it ends at the deadline."""
    async with fake_endpoint(["m"], pieces=["x"] * 30, interval_s=1.0) as fake:
        ep = RemoteEndpoint("slow", fake.url, timeouts=EndpointTimeouts(total_s=3.0))
        gen = ep.generate(MSGS, PARAMS, model="m")
        got: list[str] = []
        with pytest.raises(DeadlineExceeded) as failed:
            async for piece in gen:
                got.append(piece)
        await gen.aclose()
        await ep.aclose()
        assert str(failed.value) == "endpoint slow: no complete answer within 3s"
        assert 0 < len(got) < 30 and gen.stats.finish_reason == "error"


async def test_a_stalled_model_list_ends_at_the_discovery_deadline() -> None:
    """Headers, then a space a second: no read timeout fires, the deadline does."""
    async with fake_endpoint(["m"], stall_models=True) as fake:
        ep = RemoteEndpoint("stall", fake.url, timeouts=EndpointTimeouts(discovery_s=2.0))
        with pytest.raises(DeadlineExceeded, match="listing its models took over 2s"):
            await ep.list_models()
        await ep.aclose()


async def test_start_adds_endpoints_without_waiting_for_their_models() -> None:
    """Discovery runs in the background: adding a stalled endpoint returns at once."""
    async with fake_endpoint(["m"], stall_models=True) as fake:
        router = InferenceRouter()
        discovered = asyncio.Event()

        async def on_refreshed() -> None:
            discovered.set()

        info = await router.add_endpoint("stall", fake.url, discover=False)
        assert info.models == () and fake.in_flight == 0
        router.start(discover_now=True, on_refreshed=on_refreshed)
        await until(lambda: fake.in_flight > 0, "discovery asked for the models")
        assert not discovered.is_set()  # still stalled; nobody waits for it
        await router.aclose()


async def test_an_error_body_never_reaches_the_message(caplog: pytest.LogCaptureFixture) -> None:
    """The endpoint's own words (here a canary, and the key echoed back) were put into
    the error a room sees; now only the status is, and the log gets a scrubbed excerpt."""
    key = "sk-hostile-0123456789"
    canary = "CANARY-BODY-<b>click me</b>"
    caplog.set_level(logging.INFO, "hivebridge.inference.remote")
    async with fake_endpoint(
        ["m", "broken"], broken_model="broken", error_body=f"{canary} {key} " + "y" * 5000
    ) as fake:
        ep = RemoteEndpoint("evil", fake.url, key)
        with pytest.raises(InferenceError) as failed:
            async for _ in ep.generate(MSGS, PARAMS, model="broken"):
                pass
        await ep.aclose()
    assert str(failed.value) == "endpoint evil: HTTP 500"
    assert "CANARY-BODY" in caplog.text and key not in caplog.text
    assert max(len(r.getMessage()) for r in caplog.records) < 400
