"""The OpenAI-compatible HTTP server on the local engine (aiohttp).

* ``GET /v1/models``: local models and ``persona:<name>`` models.
* ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed (SSE)
  or not; the final chunk of a stream carries ``finish_reason`` and ``usage``.
* ``GET /v1/usage``: what the caller's token used; ``GET /health``.

Requests go to the model's :class:`LocalEngine` through the models manager,
into the same continuous batch as the bridge's replies, at
``ApiSettings.priority`` (below rooms by default): the scheduler admits and
prefills higher priorities first, so API load delays rooms by at most the
requests already running. A model that is not loaded answers 503 (and starts
loading); a client that goes away mid-request cancels it (the handler is
cancelled and the generation closed, which frees its sequence).

A client may keep a KV sequence warm across requests by sending a session id
(the ``x-session-id`` header, as the bridge itself sends upstream, or the
``user`` field); it is scoped to the caller's token name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from hivebridge.inference.local.models import LoadState
from hivebridge.inference.types import (
    BackendUnavailable,
    Generation,
    InferenceError,
)

from .auth import ApiToken, Limiter, TokenTable
from .catalog import ApiModels, Target
from .errors import ApiError, bad_request, loading, model_not_found, unauthorized, unavailable
from .schemas import ApiRequest, parse_chat, parse_completion

log = logging.getLogger(__name__)

_MAX_BODY = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ApiSettings:
    hostname: str = "127.0.0.1"
    port: int = 29336  # 0: any free port (tests)
    #: Scheduler priority of API requests; the bridge's own replies run at 0.
    priority: int = -1
    #: Header a client (or an upstream router) names its conversation with.
    session_header: str = "x-session-id"
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256
    #: A request for a model that is not loaded starts loading it (and gets a 503).
    load_on_demand: bool = True


def _ignore(*_args: object) -> None:
    pass


@dataclass(frozen=True, slots=True)
class ApiHooks:
    """What the app counts: ``request(token, status)``, ``tokens(token, prompt, completion)``."""

    request: Callable[[str, int], None] = _ignore
    tokens: Callable[[str, int, int], None] = _ignore


class ApiServer:
    def __init__(
        self,
        models: ApiModels,
        tokens: Sequence[ApiToken],
        settings: ApiSettings | None = None,
        *,
        hooks: ApiHooks | None = None,
    ) -> None:
        self.models = models
        self.tokens = TokenTable(tokens)
        self.settings = settings or ApiSettings()
        self.hooks = hooks or ApiHooks()
        self.limiter = Limiter()
        self.port = self.settings.port
        self._runner: web.AppRunner | None = None
        self._loads: set[asyncio.Task[Any]] = set()
        self.app = web.Application(client_max_size=_MAX_BODY)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/v1/models", self._list_models)
        self.app.router.add_get("/v1/models/{model:.+}", self._get_model)
        self.app.router.add_get("/v1/usage", self._usage)
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_post("/v1/completions", self._completions)

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.hostname}:{self.port}/v1"

    async def start(self) -> None:
        # Cancelling the handler when the client goes away is what frees the sequence
        # of a request whose client stopped listening (even while it waits in prefill).
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.hostname, self.settings.port)
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])
        log.info("OpenAI-compatible API listening on %s", self.base_url)

    async def stop(self) -> None:
        for task in list(self._loads):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- plain routes -----------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _auth(self, request: web.Request) -> ApiToken:
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        token = self.tokens.find(presented.strip() if scheme.lower() == "bearer" else None)
        if token is None:
            raise unauthorized()
        return token

    async def _list_models(self, request: web.Request) -> web.Response:
        try:
            self._auth(request)
        except ApiError as err:
            return err.response()
        return web.json_response({"object": "list", "data": self.models.listing()})

    async def _get_model(self, request: web.Request) -> web.Response:
        try:
            self._auth(request)
            model_id = request.match_info["model"]
            found = [m for m in self.models.listing() if m["id"] == model_id]
            if not found:
                raise model_not_found(model_id)
        except ApiError as err:
            return err.response()
        return web.json_response(found[0])

    async def _usage(self, request: web.Request) -> web.Response:
        try:
            token = self._auth(request)
        except ApiError as err:
            return err.response()
        usage = self.limiter.usage_of(token.name).as_dict()
        return web.json_response({"token": token.name, **usage})

    # --- completions ------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        name = "?"
        try:
            token = self._auth(request)
            name = token.name
            req = await self._parse(request, chat)
            target = self.models.target(req.model)
            if target is None:
                raise model_not_found(req.model)
            self.limiter.admit(token)
        except ApiError as err:
            self.hooks.request(name, err.status)
            return err.response()
        gen: Generation | None = None
        status = 200
        held = contextlib.AsyncExitStack()  # the model stays in use (not evicted) until the end
        try:
            gen = await self._start(request, token, req, target, chat, held)
            if req.stream:
                return await self._stream(request, req, gen, chat)
            return await self._whole(req, gen, chat)
        except ApiError as err:
            status = err.status
            return err.response()
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        finally:
            if gen is not None:
                await gen.aclose()  # frees the sequence of a request cut short
            await held.aclose()
            s = gen.stats if gen is not None else None
            prompt, completion = (s.prompt_tokens, s.completion_tokens) if s else (0, 0)
            self.limiter.done(token, prompt, completion, s.cached_tokens if s else 0)
            self.hooks.request(name, status)
            if prompt or completion:
                self.hooks.tokens(name, prompt, completion)

    async def _parse(self, request: web.Request, chat: bool) -> ApiRequest:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise bad_request("The request body is not valid JSON.") from None
        parse = parse_chat if chat else parse_completion
        s = self.settings
        return parse(body, s.max_tokens_limit, s.default_max_tokens)

    async def _start(
        self,
        request: web.Request,
        token: ApiToken,
        req: ApiRequest,
        target: Target,
        chat: bool,
        held: contextlib.AsyncExitStack,
    ) -> Generation:
        """The running generation, or an ApiError (503 while the model loads)."""
        state = self.models.state(target)
        if state is not LoadState.LOADED:
            if state is LoadState.NOT_LOADED and self.settings.load_on_demand:
                self._load_later(target)
            raise loading(target.model)
        hint = request.headers.get(self.settings.session_header) or req.user
        session = f"api|{token.name}|{hint}" if hint else None
        priority = self.settings.priority
        try:
            engine = await held.enter_async_context(
                self.models.local.use(target.model, target.profile)
            )
            if chat:
                messages = target.messages(req.messages)
                return engine.generate(messages, req.params, session=session, priority=priority)
            assert req.prompt is not None
            return engine.complete(req.prompt, req.params, session=session, priority=priority)
        except BackendUnavailable as exc:
            raise unavailable(str(exc)) from None
        except InferenceError as exc:
            raise bad_request(str(exc)) from None

    def _load_later(self, target: Target) -> None:
        async def load() -> None:
            try:
                await self.models.local.load(target.model, target.profile)
            except Exception as exc:
                log.warning("API: loading %s failed: %s", target.model, exc)

        if not self._loads:  # one load at a time is plenty; the manager serializes anyway
            task = asyncio.create_task(load())
            self._loads.add(task)
            task.add_done_callback(self._loads.discard)

    async def _whole(self, req: ApiRequest, gen: Generation, chat: bool) -> web.Response:
        try:
            text = "".join([piece async for piece in gen])
        except InferenceError as exc:
            raise unavailable(str(exc)) from None
        s = gen.stats
        finish = _finish(s.finish_reason)
        base = _base(req, chat)
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        body = {**base, "choices": [choice], "usage": _usage(gen)}
        return web.json_response(body)

    async def _stream(
        self, request: web.Request, req: ApiRequest, gen: Generation, chat: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        base = _base(req, chat, chunk=True)

        def chunk(piece: str | None, finish: str | None = None) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {} if piece is None else {"content": piece}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None}
                choice["finish_reason"] = finish
            return {**base, "choices": [choice]}

        if chat:
            first = chunk("")
            first["choices"][0]["delta"]["role"] = "assistant"
            await _send(resp, first)
        try:
            async for piece in _pieces(gen):
                await _send(resp, chunk(piece))
        except InferenceError as exc:
            err = ApiError(500, str(exc), type="server_error", code="generation_failed")
            await _send(resp, err.body())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        last = chunk(None, _finish(gen.stats.finish_reason))
        last["usage"] = _usage(gen)
        await _send(resp, last)
        if req.include_usage:
            await _send(resp, {**base, "choices": [], "usage": _usage(gen)})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def _pieces(gen: Generation) -> AsyncIterator[str]:
    async for piece in gen:
        if piece:
            yield piece


async def _send(resp: web.StreamResponse, data: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")


def _base(req: ApiRequest, chat: bool, *, chunk: bool = False) -> dict[str, Any]:
    if chat:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
        prefix = "chatcmpl-"
    else:
        kind, prefix = "text_completion", "cmpl-"
    return {
        "id": prefix + secrets.token_hex(12),
        "object": kind,
        "created": int(time.time()),
        "model": req.model,
        "system_fingerprint": None,
    }


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _usage(gen: Generation) -> dict[str, Any]:
    s = gen.stats
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    }
