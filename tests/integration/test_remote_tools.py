"""Tool calls through remote endpoints: a real llama_cpp.server, and a server that refuses tools.

The real server (bundled model) streams OpenAI ``tool_calls`` when the choice
names a tool, takes the result back as a ``tool`` message, and, asked in a
shape the model copies, writes a call as text that the fallback finds. The
refusing server is a fake on 127.0.0.1 (it records what it was sent): it
stands for vLLM without a tool parser, whose 400 turns the request into the
reply envelope under ``response_format`` in the nested ``json_schema`` form.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web

from hivebridge.inference.remote import RemoteEndpoint
from hivebridge.inference.types import ChatMessage, SamplingParams, ToolCall, collect
from hivebridge.personas.tools.builtin import weather_tool
from tests.support.llama_server import LlamaServer, llama_server_missing, start_llama_server

pytestmark = pytest.mark.model

WEATHER = weather_tool("http://127.0.0.1:9", "%t", 1.0).spec()
ASK = [ChatMessage("user", "What is the weather in London?")]


@pytest.fixture(scope="module")
def server() -> Iterator[LlamaServer]:
    missing = llama_server_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the real server cannot run: {missing}")
        pytest.skip(missing)
    srv = start_llama_server("smollm2")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def endpoint(server: LlamaServer) -> AsyncIterator[RemoteEndpoint]:
    ep = RemoteEndpoint("srv", server.base_url, default_model="smollm2")
    yield ep
    await ep.aclose()


async def test_a_named_choice_streams_native_tool_calls(endpoint: RemoteEndpoint) -> None:
    params = SamplingParams(
        max_tokens=48, temperature=0.0, seed=1, tools=(WEATHER,), tool_choice="get_weather"
    )
    gen = endpoint.generate(ASK, params)
    assert await collect(gen) == ""
    assert [c.name for c in gen.tool_calls] == ["get_weather"]
    assert str(gen.tool_calls[0].arguments.get("location", "")).lower().startswith("london")
    assert gen.tool_calls[0].id  # the server's id, to pair the result with


async def test_the_result_goes_back_as_a_tool_message(endpoint: RemoteEndpoint) -> None:
    call = ToolCall("call_1", "get_weather", {"location": "London"})
    messages = [
        *ASK,
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", "London: Partly cloudy, +17°C", tool_call_id="call_1"),
    ]
    params = SamplingParams(
        max_tokens=32, temperature=0.0, seed=1, tools=(WEATHER,), tool_choice="none"
    )
    gen = endpoint.generate(messages, params)
    text = await collect(gen)
    assert text.strip() and gen.tool_calls == []
    assert "17" in text, text


async def test_a_call_written_as_text_is_found(endpoint: RemoteEndpoint) -> None:
    """llama_cpp.server without a tool-aware template: the model copies the call shape
    it was shown, as text; the fallback parser turns it into a call, unseen in the stream."""
    system = (
        "You may call functions. For each call return <tool_call></tool_call> XML tags holding "
        '{"name": <function-name>, "arguments": <args-json-object>}.\n'
        + json.dumps({"name": WEATHER.name, "parameters": dict(WEATHER.parameters)})
    )
    shot = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>'
    messages = [
        ChatMessage("system", system),
        ChatMessage("user", "What is the weather in Paris?"),
        ChatMessage("assistant", shot),
        *ASK,
    ]
    params = SamplingParams(max_tokens=48, temperature=0.0, seed=1, tools=(WEATHER,))
    gen = endpoint.generate(messages, params)
    shown = await collect(gen)
    assert "<tool_call>" not in shown and "{" not in shown
    assert [(c.name, dict(c.arguments)) for c in gen.tool_calls] == [
        ("get_weather", {"location": "London"})
    ]


# --- an endpoint that refuses tools ------------------------------------------------------


@pytest.fixture
async def refusing() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    bodies: list[dict[str, Any]] = []
    envelope = '{"type": "tool_call", "name": "get_weather", "arguments": {"location": "Oslo"}}'

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        if "tools" in body:
            return web.json_response(
                {"error": {"message": '"auto" tool choice requires --enable-auto-tool-choice'}},
                status=400,
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(envelope), 7):
            chunk = {
                "id": "x",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "m",
                "choices": [
                    {"index": 0, "delta": {"content": envelope[i : i + 7]}, "finish_reason": None}
                ],
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        end = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}  # fmt: skip
        await resp.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1", bodies
    finally:
        await runner.cleanup()


async def test_refused_tools_fall_back_to_the_envelope(
    refusing: tuple[str, list[dict[str, Any]]],
) -> None:
    url, bodies = refusing
    ep = RemoteEndpoint("vllm", url, default_model="m")
    try:
        params = SamplingParams(max_tokens=32, tools=(WEATHER,))
        gen = ep.generate([ChatMessage("system", "You are Ada."), *ASK], params)
        assert await collect(gen) == ""
        assert [(c.name, dict(c.arguments)) for c in gen.tool_calls] == [
            ("get_weather", {"location": "Oslo"})
        ]
        assert not ep.native_tools
        # The retry: no tools, the envelope's schema in the nested form, tools described.
        retry = bodies[-1]
        assert "tools" not in retry and "tool_choice" not in retry
        rf = retry["response_format"]
        assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "reply_envelope"
        assert rf["json_schema"]["schema"]["oneOf"][1]["properties"]["name"] == {
            "const": "get_weather"
        }
        assert "You can use tools" in retry["messages"][0]["content"]
        # From now on the endpoint is asked in envelopes straight away.
        before = len(bodies)
        await collect(ep.generate(ASK, params))
        assert len(bodies) == before + 1 and "response_format" in bodies[-1]
    finally:
        await ep.aclose()
