"""Failover: one request that may move between backends until its first piece of text.

Transient failures (connect errors, timeouts, 429, 5xx) are retried with
backoff across the pool's plan, then local backends and the fallback answer.
Only before the first piece of text: once text has reached the caller a
failure ends the stream with an error, because a retry would repeat text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from .endpoints import EndpointPool, Member, RetryPolicy
from .generation import StreamingGeneration
from .health import CircuitBreaker
from .remote import RemoteError
from .types import (
    Backend,
    BackendUnavailable,
    ChatMessage,
    Generation,
    GenerationStats,
    InferenceError,
    SamplingParams,
    tool_calls_of,
)

log = logging.getLogger(__name__)


class FailoverGeneration(StreamingGeneration):
    """After the stream: ``served_by`` names the backend that answered,
    ``failed_over_from`` the ones that could not (in order), ``notes`` says why in
    words fit for a room, and ``used_fallback`` whether the fallback answered.
    """

    def __init__(
        self,
        pool: EndpointPool,
        local: Sequence[Backend],
        fallback: Backend | None,
        model: str,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        session: str | None,
    ) -> None:
        """``local``: backends tried after the endpoints, in order (the fallback last)."""
        super().__init__(GenerationStats(model=model, backend=""))
        self.pool = pool
        self.model = model
        self.session = session
        self.served_by: str | None = None
        self.failed_over_from: list[str] = []
        self.notes: list[str] = []
        self.used_fallback = False
        self._local = list(local)
        self._fallback = fallback
        self._messages = list(messages)
        self._params = params
        self._inner: Generation | None = None
        self._inner_iter: AsyncIterator[str] | None = None
        self._served: Member | None = None
        self._probe: CircuitBreaker | None = None  # breaker awaiting this request's verdict
        self._leaving: list[str] = []  # endpoints failed or skipped, not yet moved off

    @property
    def failed_over(self) -> bool:
        return bool(self.failed_over_from)

    async def _release(self) -> None:
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
        """Report a failover from each endpoint left behind, now that ``name`` is tried.

        Reported here, not at the failure, so a retry of the same endpoint is no
        failover and a request with nowhere left to go reports none.
        """
        for left in self._leaving:
            if left != name:
                self.pool.hooks.failover(left)
        self._leaving.clear()

    async def _start(self, gen: Generation) -> str | None:
        """Wait for the first piece; None means the answer is empty (still a success)."""
        self._inner = gen
        self._inner_iter = aiter(gen)
        try:
            return await anext(self._inner_iter)
        except StopAsyncIteration:
            return None

    async def _stream(self) -> AsyncGenerator[str, None]:
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
            if self._served is not None:  # the request failed: the endpoint is down now
                self._served.breaker.mark_down(str(exc))
            if isinstance(exc, InferenceError):
                raise
            log.warning("backend %s failed mid-stream: %r", self.served_by, exc)
            raise InferenceError(
                f"{self.served_by}: the reply broke off ({type(exc).__name__})"
            ) from None
        self._copy_stats(inner.stats)
        calls, self.tool_note = tool_calls_of(inner)
        self.tool_calls = list(calls)

    def _copy_stats(self, inner: GenerationStats) -> None:
        s = self.stats
        # An endpoint reports the id it knows the model by; here it is ``namespace/id``.
        s.model = self.model if self._served is not None else (inner.model or s.model)
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
        pool = self.pool
        order = pool.plan(self.model, self.session)
        retry = pool.config.retry
        tried: set[str] = set()
        given_up: set[str] = set()  # non-transient failure: no second try this request
        noted_open: set[str] = set()
        # Endpoints this request left after a failure. Passive health: once the request
        # moves on (to another endpoint or a local model) they are marked down at once;
        # retries within the request still ride out a blip.
        failed_here: dict[str, str] = {}
        try:
            return await self._attempts(order, retry, tried, given_up, noted_open, failed_here)
        finally:
            for name, error in failed_here.items():
                member = pool.member(name)
                if member is not None:
                    member.breaker.mark_down(error)

    async def _attempts(
        self,
        order: list[str],
        retry: RetryPolicy,
        tried: set[str],
        given_up: set[str],
        noted_open: set[str],
        failed_here: dict[str, str],
    ) -> tuple[str | None, bool]:
        pool = self.pool
        attempts = 0
        while attempts < retry.max_attempts:
            progressed = False
            for name in order:
                if attempts >= retry.max_attempts:
                    break
                member = pool.member(name)
                if member is None or name in given_up:
                    continue
                model_id = pool.model_on(member, self.model)
                if model_id is None:  # it stopped listing the model since the plan
                    continue
                if not member.breaker.allow():
                    if name not in noted_open:
                        noted_open.add(name)
                        last = member.breaker.last_error or "recent failures"
                        self._fail(name, f"endpoint {name} is cooling down ({last})")
                        self._leaving.append(name)
                    continue
                if name in tried:
                    await pool.sleep(pool.backoff(attempts))
                tried.add(name)
                attempts += 1
                progressed = True
                self._probe = member.breaker
                self._moving_to(name)
                started = time.monotonic()
                try:
                    gen = member.deployment.generate(
                        self._messages, self._params, session=self.session, model=model_id
                    )
                    first = await self._start(gen)
                except RemoteError as exc:
                    await self._release()
                    if not exc.endpoint_fault:
                        member.breaker.record_success()
                        raise  # the request itself is bad: another endpoint would agree
                    member.breaker.record_failure(str(exc), trip=not exc.transient)
                    failed_here[name] = str(exc)
                    if not exc.transient:
                        given_up.add(name)
                    self._fail(name, str(exc))
                    self._leaving.append(name)
                    log.info("endpoint %s failed before the first token: %s", name, exc)
                    continue
                except InferenceError as exc:
                    await self._release()
                    member.breaker.record_failure(str(exc))
                    failed_here[name] = str(exc)
                    if not isinstance(exc, BackendUnavailable):
                        given_up.add(name)
                    self._fail(name, str(exc))
                    self._leaving.append(name)
                    continue
                except Exception as exc:
                    await self._release()
                    log.warning("endpoint %s failed unexpectedly: %r", name, exc)
                    member.breaker.record_failure(type(exc).__name__)
                    failed_here[name] = type(exc).__name__
                    given_up.add(name)
                    self._fail(name, f"endpoint {name} failed ({type(exc).__name__})")
                    self._leaving.append(name)
                    continue
                inner_ttft = self._inner.stats.ttft_s if self._inner is not None else None
                member.breaker.record_success(
                    inner_ttft if inner_ttft is not None else time.monotonic() - started
                )
                self._probe = None
                self._served = member
                failed_here.pop(name, None)  # a retry here worked: a blip, not down
                pool.remember(self.session, name)
                self._served_by(name, fallback=False)
                return first, True
            if not progressed:
                break
        self._probe = None
        return None, False

    async def _try_local(self) -> str | None:
        candidates = self._local
        if not candidates:
            detail = "; ".join(self.notes) or "no endpoint is available"
            raise BackendUnavailable(f"model {self.model}: {detail}")
        if not self.pool.plan(self.model) and not self.notes:
            self.notes.append(f"no endpoint serves model {self.model}")
        last: InferenceError | None = None
        for backend in candidates:
            self._moving_to(backend.name)
            try:
                first = await self._start(
                    backend.generate(self._messages, self._params, session=self.session)
                )
            except InferenceError as exc:
                await self._release()
                self._fail(backend.name, str(exc))
                last = exc
                continue
            self._served_by(backend.name, fallback=backend is self._fallback)
            return first
        assert last is not None
        detail = "; ".join(self.notes)
        raise BackendUnavailable(f"model {self.model}: every backend failed: {detail}") from None

    def _served_by(self, name: str, *, fallback: bool) -> None:
        self.served_by = name
        self.used_fallback = fallback
        self.stats.backend = name
        if self.failed_over_from:
            self.notes.append(f"answered by {name} after {', '.join(self.failed_over_from)} failed")
