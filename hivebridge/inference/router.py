"""Route a request for a *model name* to an endpoint that serves it, or to a local backend.

Order of candidates for one request:

1. the endpoint this ``session`` (room + persona) used last, while it is healthy,
   so the server's prefix cache for the room stays warm;
2. the other healthy endpoints serving the model, in rendezvous-hash order for the
   session (a failover lands on the same endpoint every time) or by latency;
3. local backends registered for the model, then the configured fallback backend.

Transient failures (connect errors, timeouts, 429, 5xx) are retried with backoff,
but only before the first piece of text: once text has reached the caller a
failure ends the stream with an error, because a retry would repeat text.
The router knows nothing of Matrix or databases: callers persist endpoints and
aliases themselves and read :class:`EndpointInfo` for listings.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .. import metrics
from .health import BreakerConfig, BreakerState, CircuitBreaker
from .remote import EndpointTimeouts, RemoteEndpoint, RemoteError
from .types import (
    Backend,
    BackendUnavailable,
    ChatMessage,
    Generation,
    GenerationStats,
    InferenceError,
    SamplingParams,
)

log = logging.getLogger(__name__)


class Deployment(Protocol):
    """What the router needs from an endpoint; :class:`RemoteEndpoint` is the real one."""

    name: str
    base_url: str

    def masked_key(self) -> str: ...

    async def list_models(self) -> list[str]: ...

    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        *,
        session: str | None = None,
        model: str | None = None,
    ) -> Generation: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3  # remote attempts per request before the local backends
    backoff_s: float = 0.25  # wait before retrying an endpoint already tried
    backoff_max_s: float = 2.0
    jitter: float = 0.2  # +-20 %


@dataclass(frozen=True, slots=True)
class RouterConfig:
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    timeouts: EndpointTimeouts = field(default_factory=EndpointTimeouts)
    max_sticky_sessions: int = 10_000
    refresh_interval_s: float = 300.0  # background model discovery; 0 turns it off


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """Plain data for an ``!endpoints`` listing; never holds the key itself."""

    name: str
    url: str
    masked_key: str
    healthy: bool
    state: str
    latency_ms: float | None
    models: tuple[str, ...]
    last_error: str | None
    cooldown_remaining_s: float


@dataclass(slots=True)
class _Slot:
    deployment: Deployment
    breaker: CircuitBreaker
    models: list[str] = field(default_factory=list)


class InferenceRouter:
    """Model-name routing across remote endpoints and local backends."""

    def __init__(
        self,
        *,
        fallback: Backend | None = None,
        config: RouterConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        default_model: str | None = None,
    ) -> None:
        self.config = config or RouterConfig()
        self.fallback = fallback
        self.default_model = default_model
        self.name = "router"
        self._clock = clock
        self._sleep = sleep
        self._slots: dict[str, _Slot] = {}
        self._local: dict[str, Backend] = {}
        self._aliases: dict[str, str] = {}
        self._sticky: OrderedDict[str, str] = OrderedDict()
        self._refresh_task: asyncio.Task[None] | None = None

    # --- endpoints -----------------------------------------------------------------

    async def add_endpoint(
        self,
        name: str,
        url: str,
        api_key: str | None = None,
        *,
        timeouts: EndpointTimeouts | None = None,
    ) -> EndpointInfo:
        """Add (or replace) an endpoint and discover its models at once.

        A failed discovery does not refuse the endpoint: the info says why it is
        unhealthy, and the next :meth:`refresh` tries again.
        """
        endpoint = RemoteEndpoint(name, url, api_key, timeouts=timeouts or self.config.timeouts)
        return await self.add_deployment(endpoint)

    async def add_deployment(
        self, deployment: Deployment, models: Sequence[str] | None = None
    ) -> EndpointInfo:
        """Add any :class:`Deployment`; ``models=None`` discovers them now."""
        old = self._slots.pop(deployment.name, None)
        if old is not None and old.deployment is not deployment:
            await _close_quietly(old.deployment)
        slot = _Slot(deployment, CircuitBreaker(self.config.breaker, clock=self._clock))
        self._slots[deployment.name] = slot
        if models is None:
            await self._discover(slot)
        else:
            slot.models = list(models)
        return self._info(slot)

    async def remove_endpoint(self, name: str) -> bool:
        """Forget an endpoint and close its client; streams running on it will fail."""
        slot = self._slots.pop(name, None)
        if slot is None:
            return False
        for session in [s for s, n in self._sticky.items() if n == name]:
            del self._sticky[session]
        await _close_quietly(slot.deployment)
        return True

    async def refresh(self, name: str | None = None) -> dict[str, str | None]:
        """Rediscover models (of one endpoint or all); returns name -> error or None."""
        slots = [self._slots[name]] if name is not None else list(self._slots.values())
        errors = await asyncio.gather(*(self._discover(s) for s in slots))
        return {s.deployment.name: err for s, err in zip(slots, errors, strict=True)}

    async def _discover(self, slot: _Slot) -> str | None:
        try:
            models = await slot.deployment.list_models()
        except InferenceError as exc:
            slot.breaker.record_failure(str(exc))
            log.warning("model discovery failed: %s", exc)
            return str(exc)
        slot.models = list(models)  # failures keep the last known list
        if slot.breaker.state is not BreakerState.OPEN:
            slot.breaker.record_success()
        return None

    def start(self) -> None:
        """Start background rediscovery (``config.refresh_interval_s``)."""
        if self.config.refresh_interval_s > 0 and self._refresh_task is None:
            self._refresh_task = asyncio.create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("endpoint refresh failed")

    async def aclose(self) -> None:
        """Stop rediscovery and close every endpoint client (not local backends)."""
        task, self._refresh_task = self._refresh_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for slot in list(self._slots.values()):
            await _close_quietly(slot.deployment)
        self._slots.clear()

    # --- local backends and aliases ---------------------------------------------------

    def set_local(self, model: str, backend: Backend) -> None:
        """Serve ``model`` locally when no endpoint can (tried before the fallback)."""
        self._local[model] = backend

    def remove_local(self, model: str) -> None:
        self._local.pop(model, None)

    def set_alias(self, alias: str, model: str) -> None:
        self._aliases[alias] = model

    def remove_alias(self, alias: str) -> None:
        self._aliases.pop(alias, None)

    def resolve(self, model: str) -> str:
        seen: set[str] = set()
        while model in self._aliases and model not in seen:
            seen.add(model)
            model = self._aliases[model]
        return model

    # --- listings ---------------------------------------------------------------------

    def endpoints(self) -> list[EndpointInfo]:
        return [self._info(s) for s in self._slots.values()]

    def endpoint_info(self, name: str) -> EndpointInfo | None:
        slot = self._slots.get(name)
        return self._info(slot) if slot is not None else None

    def models(self) -> dict[str, list[str]]:
        """Model -> names of the endpoints serving it (local-only models map to [])."""
        index: dict[str, list[str]] = {}
        for slot in self._slots.values():
            for model in slot.models:
                index.setdefault(model, []).append(slot.deployment.name)
        for model in self._local:
            index.setdefault(model, [])
        return index

    def sticky_endpoint(self, session: str) -> str | None:
        return self._sticky.get(session)

    def _info(self, slot: _Slot) -> EndpointInfo:
        b = slot.breaker
        return EndpointInfo(
            name=slot.deployment.name,
            url=slot.deployment.base_url,
            masked_key=slot.deployment.masked_key(),
            healthy=b.state is BreakerState.CLOSED,
            state=str(b.state),
            latency_ms=None if b.latency_s is None else round(b.latency_s * 1000, 1),
            models=tuple(slot.models),
            last_error=b.last_error,
            cooldown_remaining_s=round(b.cooldown_remaining(), 2),
        )

    # --- routing ----------------------------------------------------------------------

    def plan(self, model: str, session: str | None = None) -> list[str]:
        """Endpoint names serving ``model`` in the order a request would try them.

        Includes endpoints whose breaker is open: the request skips them and notes it.
        """
        model = self.resolve(model)
        names = [n for n, s in self._slots.items() if model in s.models]
        if session is not None:
            names.sort(key=lambda n: _rendezvous(session, n), reverse=True)
        else:
            names.sort(key=lambda n: (self._slots[n].breaker.latency_s or 0.0, n))
        sticky = self._sticky.get(session) if session is not None else None
        if sticky in names:
            names.remove(sticky)
            names.insert(0, sticky)
        return names

    def local_candidates(self, model: str) -> list[Backend]:
        found: list[Backend] = []
        local = self._local.get(self.resolve(model))
        if local is not None:
            found.append(local)
        if self.fallback is not None and all(b is not self.fallback for b in found):
            found.append(self.fallback)
        return found

    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        *,
        session: str | None = None,
        model: str | None = None,
    ) -> RoutedGeneration:
        chosen = model or self.default_model
        if chosen is None:
            raise InferenceError("no model given and no default model is configured")
        return RoutedGeneration(self, self.resolve(chosen), messages, params, session)

    def for_model(self, model: str) -> ModelRoute:
        """A :class:`Backend` named ``model`` that routes through this router."""
        return ModelRoute(self, model)

    def _remember(self, session: str | None, name: str) -> None:
        if session is None:
            return
        self._sticky[session] = name
        self._sticky.move_to_end(session)
        while len(self._sticky) > self.config.max_sticky_sessions:
            self._sticky.popitem(last=False)

    def _backoff(self, retry_no: int) -> float:
        r = self.config.retry
        base = min(r.backoff_max_s, r.backoff_s * (2 ** max(0, retry_no - 1)))
        return max(0.0, base * (1 + random.uniform(-r.jitter, r.jitter)))


class ModelRoute:
    """The router bound to one model name: a plain :class:`Backend` for a persona."""

    def __init__(self, router: InferenceRouter, model: str) -> None:
        self.router = router
        self.name = model

    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        *,
        session: str | None = None,
    ) -> RoutedGeneration:
        return self.router.generate(messages, params, session=session, model=self.name)


def _rendezvous(session: str, name: str) -> int:
    digest = hashlib.blake2b(f"{session}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


async def _close_quietly(deployment: Deployment) -> None:
    try:
        await deployment.aclose()
    except Exception:
        log.warning("closing endpoint %s failed", deployment.name)


class _Failed(Exception):
    """Internal: one attempt failed before its first piece of text."""


class RoutedGeneration:
    """A request that may move between backends until its first piece of text.

    After the stream: ``served_by`` names the backend that answered,
    ``failed_over_from`` the ones that could not (in order), ``notes`` says why in
    words fit for a room, and ``used_fallback`` whether the fallback answered.
    """

    def __init__(
        self,
        router: InferenceRouter,
        model: str,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        session: str | None,
    ) -> None:
        self.router = router
        self.model = model
        self.session = session
        self.stats = GenerationStats(model=model, backend="")
        self.served_by: str | None = None
        self.failed_over_from: list[str] = []
        self.notes: list[str] = []
        self.used_fallback = False
        self._messages = list(messages)
        self._params = params
        self._inner: Generation | None = None
        self._inner_iter: AsyncIterator[str] | None = None
        self._served_slot: _Slot | None = None
        self._probe: CircuitBreaker | None = None  # breaker awaiting this request's verdict
        self._leaving: list[str] = []  # endpoints failed or skipped, not yet moved off
        self._closed = False
        self._iter = self._run()

    @property
    def failed_over(self) -> bool:
        return bool(self.failed_over_from)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iter

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._iter.aclose()
        await self._close_inner()
        if self.stats.finish_reason is None:
            self.stats.finish("cancelled")

    async def _close_inner(self) -> None:
        inner, self._inner = self._inner, None
        self._inner_iter = None
        if inner is not None:
            try:
                await inner.aclose()
            except Exception:
                log.debug("closing a generation failed", exc_info=True)
        if self._probe is not None:
            self._probe.release()
            self._probe = None

    def _fail(self, name: str, note: str) -> None:
        if name not in self.failed_over_from:
            self.failed_over_from.append(name)
        self.notes.append(note)

    def _moving_to(self, name: str) -> None:
        """Count a failover from each endpoint left behind, now that ``name`` is tried.

        Counted here, not at the failure, so a retry of the same endpoint is no
        failover and a request with nowhere left to go counts none.
        """
        for left in self._leaving:
            if left != name:
                metrics.ENDPOINT_FAILOVERS.labels(metrics.endpoint_label(left)).inc()
        self._leaving.clear()

    async def _start(self, gen: Generation) -> str | None:
        """Wait for the first piece; None means the answer is empty (still a success)."""
        self._inner = gen
        self._inner_iter = aiter(gen)
        try:
            return await anext(self._inner_iter)
        except StopAsyncIteration:
            return None

    async def _run(self) -> AsyncGenerator[str, None]:
        try:
            first = await self._choose()
            if first is not None:
                self.stats.mark_first_token()
                yield first
            inner, pieces = self._inner, self._inner_iter
            assert inner is not None and pieces is not None
            try:
                async for piece in pieces:
                    self.stats.mark_first_token()
                    yield piece
            except Exception as exc:
                if self._served_slot is not None:
                    self._served_slot.breaker.record_failure(str(exc))
                if isinstance(exc, InferenceError):
                    raise
                log.warning("backend %s failed mid-stream: %r", self.served_by, exc)
                raise InferenceError(
                    f"{self.served_by}: the reply broke off ({type(exc).__name__})"
                ) from None
            self._copy_stats(inner.stats)
        except (GeneratorExit, asyncio.CancelledError):
            if self.stats.finish_reason is None:
                self.stats.finish("cancelled")
            raise
        except BaseException:
            if self.stats.finish_reason is None:
                self.stats.finish("error")
            raise
        finally:
            await self._close_inner()

    def _copy_stats(self, inner: GenerationStats) -> None:
        s = self.stats
        s.model = inner.model or s.model
        s.prompt_tokens = inner.prompt_tokens
        s.cached_tokens = inner.cached_tokens
        s.evaluated_tokens = inner.evaluated_tokens
        s.completion_tokens = inner.completion_tokens
        s.queue_wait_s = inner.queue_wait_s
        s.finish(inner.finish_reason or "stop")

    async def _choose(self) -> str | None:
        """Find a backend that produces a first piece; leaves it in ``self._inner``."""
        first, found = await self._try_remote()
        if found:
            return first
        return await self._try_local()

    async def _try_remote(self) -> tuple[str | None, bool]:
        router = self.router
        order = router.plan(self.model, self.session)
        retry = router.config.retry
        attempts = 0
        tried: set[str] = set()
        given_up: set[str] = set()  # non-transient failure: no second try this request
        noted_open: set[str] = set()
        while attempts < retry.max_attempts:
            progressed = False
            for name in order:
                if attempts >= retry.max_attempts:
                    break
                slot = router._slots.get(name)
                if slot is None or name in given_up:
                    continue
                if not slot.breaker.allow():
                    if name not in noted_open:
                        noted_open.add(name)
                        last = slot.breaker.last_error or "recent failures"
                        self._fail(name, f"endpoint {name} is cooling down ({last})")
                        self._leaving.append(name)
                    continue
                if name in tried:
                    await router._sleep(router._backoff(attempts))
                tried.add(name)
                attempts += 1
                progressed = True
                self._probe = slot.breaker
                self._moving_to(name)
                started = time.monotonic()
                try:
                    gen = slot.deployment.generate(
                        self._messages, self._params, session=self.session, model=self.model
                    )
                    first = await self._start(gen)
                except RemoteError as exc:
                    await self._close_inner()
                    if not exc.endpoint_fault:
                        slot.breaker.record_success()
                        raise  # the request itself is bad: another endpoint would agree
                    slot.breaker.record_failure(str(exc), trip=not exc.transient)
                    if not exc.transient:
                        given_up.add(name)
                    self._fail(name, str(exc))
                    self._leaving.append(name)
                    log.info("endpoint %s failed before the first token: %s", name, exc)
                    continue
                except InferenceError as exc:
                    await self._close_inner()
                    slot.breaker.record_failure(str(exc))
                    if not isinstance(exc, BackendUnavailable):
                        given_up.add(name)
                    self._fail(name, str(exc))
                    self._leaving.append(name)
                    continue
                except Exception as exc:
                    await self._close_inner()
                    log.warning("endpoint %s failed unexpectedly: %r", name, exc)
                    slot.breaker.record_failure(type(exc).__name__)
                    given_up.add(name)
                    self._fail(name, f"endpoint {name} failed ({type(exc).__name__})")
                    self._leaving.append(name)
                    continue
                inner_ttft = self._inner.stats.ttft_s if self._inner is not None else None
                slot.breaker.record_success(
                    inner_ttft if inner_ttft is not None else time.monotonic() - started
                )
                self._probe = None
                self._served_slot = slot
                router._remember(self.session, name)
                self._served(name, fallback=False)
                return first, True
            if not progressed:
                break
        self._probe = None
        return None, False

    async def _try_local(self) -> str | None:
        candidates = self.router.local_candidates(self.model)
        if not candidates:
            detail = "; ".join(self.notes) or "no endpoint is available"
            raise BackendUnavailable(f"model {self.model}: {detail}")
        if not self.router.plan(self.model) and not self.notes:
            self.notes.append(f"no endpoint serves model {self.model}")
        last: InferenceError | None = None
        for backend in candidates:
            self._moving_to(backend.name)
            try:
                first = await self._start(
                    backend.generate(self._messages, self._params, session=self.session)
                )
            except InferenceError as exc:
                await self._close_inner()
                self._fail(backend.name, str(exc))
                last = exc
                continue
            self._served(backend.name, fallback=backend is self.router.fallback)
            return first
        assert last is not None
        detail = "; ".join(self.notes)
        raise BackendUnavailable(f"model {self.model}: every backend failed: {detail}") from None

    def _served(self, name: str, *, fallback: bool) -> None:
        self.served_by = name
        self.used_fallback = fallback
        self.stats.backend = name
        if self.failed_over_from:
            self.notes.append(f"answered by {name} after {', '.join(self.failed_over_from)} failed")
