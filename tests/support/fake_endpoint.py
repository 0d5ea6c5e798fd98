"""An OpenAI-compatible endpoint on 127.0.0.1 that records everything it receives.

It plays the hostile or broken endpoint of the security tests: it lists model
names it does not own (a local model's), streams slowly, stalls its model list,
or answers an error with a body that must never reach a room. Every request is
kept whole (path, headers, body) so a test can say what the bridge sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: str

    def holds(self, text: str) -> bool:
        return text in self.body or any(text in v for v in self.headers.values())


@dataclass
class FakeEndpoint:
    #: Model ids listed by ``GET /v1/models``.
    models: list[str]
    #: Pieces of every answer, and the seconds between two of them.
    pieces: list[str] = field(default_factory=lambda: ["Hello", " from", " the", " endpoint."])
    interval_s: float = 0.0
    #: ``GET /v1/models`` never finishes: headers, then a space now and then.
    stall_models: bool = False
    #: A model whose requests fail with HTTP 500 and this error message.
    broken_model: str | None = None
    error_body: str = ""
    url: str = ""
    received: list[Received] = field(default_factory=list)
    #: Requests being answered right now (a stream in flight, a stalled list).
    in_flight: int = 0

    def chat_requests(self) -> list[Received]:
        return [r for r in self.received if r.path.endswith("/chat/completions")]

    def anything_holds(self, text: str) -> bool:
        return any(r.holds(text) for r in self.received)


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    data = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(data)}\n\n".encode()


@asynccontextmanager
async def fake_endpoint(models: list[str], **options: Any) -> AsyncIterator[FakeEndpoint]:
    """Serve until the block ends (``url`` is the ``…/v1`` base)."""
    state = FakeEndpoint(list(models), **options)

    async def record(request: web.Request) -> None:
        body = await request.text()
        state.received.append(
            Received(request.method, request.path, dict(request.headers), body)
        )

    async def list_models(request: web.Request) -> web.StreamResponse:
        await record(request)
        if state.stall_models:
            state.in_flight += 1
            try:
                resp = web.StreamResponse(headers={"Content-Type": "application/json"})
                await resp.prepare(request)
                while True:  # a byte now and then: no read timeout ever fires
                    await resp.write(b" ")
                    await asyncio.sleep(1.0)
            except ConnectionResetError:  # the client gave up
                return web.Response(status=499)
            finally:
                state.in_flight -= 1
        data = [{"id": m, "object": "model", "owned_by": "fake"} for m in state.models]
        return web.json_response({"object": "list", "data": data})

    async def chat(request: web.Request) -> web.StreamResponse:
        await record(request)
        model = str(json.loads(state.received[-1].body or "{}").get("model", ""))
        if model == state.broken_model:
            # OpenAI's error shape, so a client that shows error messages would show it.
            return web.json_response({"error": {"message": state.error_body}}, status=500)
        state.in_flight += 1
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(_chunk(model, {"role": "assistant"}))
            for i, piece in enumerate(state.pieces):
                if i and state.interval_s:
                    await asyncio.sleep(state.interval_s)
                await resp.write(_chunk(model, {"content": piece}))
            await resp.write(_chunk(model, {}, "stop"))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            state.in_flight -= 1

    app = web.Application()
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}/v1"
    try:
        yield state
    finally:
        await runner.cleanup()
