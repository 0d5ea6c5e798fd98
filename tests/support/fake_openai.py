"""A fake OpenAI-compatible endpoint that records what it receives.

Small aiohttp server on 127.0.0.1: ``/v1/models`` lists one model,
``/v1/chat/completions`` streams a fixed answer, ``/props`` says how many
slots it has (as llama-server does). Every chat request's headers and JSON
body are kept in :attr:`FakeOpenAI.requests`, so a test can check exactly what
the bridge sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeOpenAI:
    model: str = "m"
    answer: str = "hello"
    slots: int = 4
    requests: list[Received] = field(default_factory=list)
    #: What ``/v1/models`` lists, when not just ``model``.
    models: list[str] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/props", self._props)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        # Port 0 the first time; a restart after stop() binds the same port again.
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _models(self, request: web.Request) -> web.Response:
        ids = self.models or [self.model]
        return web.json_response({"object": "list", "data": [{"id": m} for m in ids]})

    async def _props(self, request: web.Request) -> web.Response:
        return web.json_response({"total_slots": self.slots})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(Received(dict(request.headers), body))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "c1", "object": "chat.completion.chunk", "model": self.model, "created": 0}
        chunks = [
            {**base, "choices": [{"index": 0, "delta": {"content": self.answer}}]},
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]
        for chunk in chunks:
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
