"""The endpoint pool: remote OpenAI-compatible endpoints, their health, aliases and stickiness.

Which endpoints serve a model, in the order one request should try them
(:meth:`EndpointPool.plan`):

1. the endpoint this ``session`` (room + persona) used last, while it serves the
   model, so the server's prefix cache for the room stays warm;
2. the other endpoints serving the model, in rendezvous-hash order for the
   session (a failover lands on the same endpoint every time) or by latency.

So a room stays on one endpoint; when that endpoint fails the room moves to
its next rendezvous choice once and stays there (the sticky entry follows it),
and no other room moves. ``routing="round_robin"`` turns all of that off (each
request to the next endpoint in turn); it exists to measure what stickiness
is worth (bench/pool.py), not to run with.

Each endpoint has a circuit breaker (health.py); models are discovered with
``GET /v1/models`` at add time and in the background. The pool knows nothing
of Matrix or databases: callers persist endpoints and aliases themselves.

A remote model is known by its namespace and its id: ``gpu1/llama3`` is
``llama3`` as endpoint ``gpu1`` lists it. The namespace is the endpoint's name,
or the *pool* name several replicas of one server share (``llama/llama3``
served by gpu1 and gpu2, planned over that pool's members only). Local model
names never hold a ``/``, so whatever an endpoint lists can never take a local
model's traffic, nor one endpoint another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .affinity import Affinity
from .health import BreakerConfig, BreakerState, CircuitBreaker
from .hooks import NO_HOOKS, InferenceHooks
from .remote import EndpointTimeouts, RemoteEndpoint
from .types import ChatMessage, Generation, InferenceError, SamplingParams

log = logging.getLogger(__name__)

#: Model ids taken from an endpoint's list: printable, no spaces, not too long; others
#: are dropped (they are shown in rooms and stored in the catalogue).
_MODEL_ID_RE = re.compile(r"^[^\s/][^\s]{0,199}$")


def remote_name(namespace: str, model: str) -> str:
    """The name a remote model is known by: ``namespace/model``."""
    return f"{namespace}/{model}"


class EndpointConflict(ValueError):
    """An endpoint's name or pool clashes with one the pool has; the text says how."""


class Deployment(Protocol):
    """What the pool needs from an endpoint; :class:`RemoteEndpoint` is the real one."""

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
    #: How often endpoints that are down are probed (GET /v1/models) once their
    #: cooldown is over; a probe that answers brings the endpoint back. 0: never.
    probe_interval_s: float = 1.0
    #: "sticky" (rendezvous + the endpoint that served the session last) or
    #: "round_robin" (for comparison only: every request to the next endpoint).
    routing: str = "sticky"
    #: Key of the opaque session ids sent to endpoints as affinity hints.
    session_salt: bytes = b""


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """Plain data for an ``!endpoints`` listing; never holds the key itself."""

    name: str
    url: str
    masked_key: str
    healthy: bool  # status == "up"
    state: str  # the breaker's: closed, open, half-open
    latency_ms: float | None
    models: tuple[str, ...]
    last_error: str | None
    cooldown_remaining_s: float
    pool: str | None = None
    #: ``up``, ``down`` (a request failed on it, or its probe did) or ``probing``:
    #: the one word ``!endpoints``, the admin API and ``hivebridge_endpoint_up`` share.
    status: str = "up"


@dataclass(slots=True)
class Member:
    """One endpoint of the pool: the client, its breaker and the models it lists."""

    deployment: Deployment
    breaker: CircuitBreaker
    models: list[str] = field(default_factory=list)  # ids as the endpoint lists them
    #: Replicas sharing a pool name serve ``<pool>/<model>``; unpooled, ``<name>/<model>``.
    pool: str | None = None

    @property
    def name(self) -> str:
        return self.deployment.name

    @property
    def namespace(self) -> str:
        """The prefix of its models' names: its pool's name, else its own."""
        return self.pool or self.deployment.name

    def names(self) -> list[str]:
        """Its models by the names requests use (``namespace/id``)."""
        return [remote_name(self.namespace, m) for m in self.models]

    def model_id(self, name: str) -> str | None:
        """The id to send for the model named ``name``; None when it does not serve it."""
        prefix = self.namespace + "/"
        if not name.startswith(prefix):
            return None
        model = name[len(prefix) :]
        return model if model in self.models else None


class EndpointPool:
    def __init__(
        self,
        config: RouterConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        hooks: InferenceHooks = NO_HOOKS,
    ) -> None:
        self.config = config or RouterConfig()
        self.hooks = hooks
        self.clock = clock
        self.sleep = sleep
        self._members: dict[str, Member] = {}
        self._aliases: dict[str, str] = {}
        self._sticky: OrderedDict[str, str] = OrderedDict()
        self._refresh_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._turn = 0  # round robin's position

    # --- members ----------------------------------------------------------------------

    def remote(
        self,
        name: str,
        url: str,
        api_key: str | None,
        timeouts: EndpointTimeouts | None = None,
        affinity: Affinity | None = None,
    ) -> RemoteEndpoint:
        """A client for an OpenAI-compatible endpoint, reporting through the pool's hooks
        and hashing session ids with the pool's salt."""
        return RemoteEndpoint(
            name,
            url,
            api_key,
            timeouts=timeouts or self.config.timeouts,
            hooks=self.hooks,
            affinity=affinity,
            session_salt=self.config.session_salt,
        )

    async def add(
        self,
        deployment: Deployment,
        models: Sequence[str] | None = None,
        *,
        pool: str | None = None,
        replace: bool = False,
    ) -> Member:
        """Add an endpoint; ``models=None`` discovers them now. ``pool`` names the
        namespace it shares with others; ``replace`` allows replacing one of the
        same name (a reloaded config), otherwise that is an :class:`EndpointConflict`.

        A failed discovery does not refuse the endpoint: its breaker says why it
        is unhealthy, and the next :meth:`refresh` tries again.
        """
        self.check_conflict(deployment.name, pool, replace=replace)
        old = self._members.pop(deployment.name, None)
        if old is not None and old.deployment is not deployment:
            await _close_quietly(old.deployment)
        member = Member(
            deployment, CircuitBreaker(self.config.breaker, clock=self.clock), pool=pool
        )
        self._members[deployment.name] = member
        if models is None:
            await self._discover(member)
        else:
            member.models = _usable(models, deployment.name)
        return member

    def check_conflict(self, name: str, pool: str | None, *, replace: bool = False) -> None:
        """Refuse a second endpoint of one name, and a namespace that would mix an
        endpoint's models with another's without a pool both declared."""
        if name in self._members and not replace:
            raise EndpointConflict(f"an endpoint named {name} exists")
        for other in self._members.values():
            if other.name == name:
                continue
            if pool is None and other.namespace == name:
                raise EndpointConflict(f"{name} is the name of a pool of endpoints")
            if pool is not None and other.namespace == pool and other.pool is None:
                raise EndpointConflict(f"pool {pool} is the name of an endpoint")

    async def remove(self, name: str) -> bool:
        """Forget an endpoint and close its client; streams running on it will fail."""
        member = self._members.pop(name, None)
        if member is None:
            return False
        for session in [s for s, n in self._sticky.items() if n == name]:
            del self._sticky[session]
        await _close_quietly(member.deployment)
        return True

    def member(self, name: str) -> Member | None:
        return self._members.get(name)

    def members(self) -> list[Member]:
        return list(self._members.values())

    # --- discovery ----------------------------------------------------------------------

    async def refresh(self, name: str | None = None) -> dict[str, str | None]:
        """Rediscover models (of one endpoint or all); returns name -> error or None."""
        members = [self._members[name]] if name is not None else list(self._members.values())
        errors = await asyncio.gather(*(self._discover(m) for m in members))
        return {m.name: err for m, err in zip(members, errors, strict=True)}

    async def _discover(self, member: Member) -> str | None:
        try:
            models = await member.deployment.list_models()
        except InferenceError as exc:
            member.breaker.record_failure(str(exc))
            member.breaker.mark_down(str(exc))  # it did not answer: down until a probe does
            log.warning("model discovery failed: %s", exc)
            return str(exc)
        member.models = _usable(models, member.name)  # failures keep the last known list
        if member.breaker.state is not BreakerState.OPEN:
            member.breaker.record_success()
        return None

    def start(
        self,
        *,
        discover_now: bool = False,
        on_refreshed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Start background discovery: at once with ``discover_now`` (endpoints added
        at start without waiting for them), then every ``config.refresh_interval_s``;
        and the probes of endpoints that are down (``config.probe_interval_s``).
        ``on_refreshed`` runs after each round (the catalogue numbers new models)."""
        if self._refresh_task is None and (discover_now or self.config.refresh_interval_s > 0):
            self._refresh_task = asyncio.create_task(
                self._refresh_loop(discover_now, on_refreshed), name="endpoint-discovery"
            )
        if self.config.probe_interval_s > 0 and self._probe_task is None:
            self._probe_task = asyncio.create_task(self._probe_loop())

    async def probe_down(self) -> dict[str, str | None]:
        """Probe each endpoint that is down and whose cooldown is over, with the probe
        slot of its breaker (no request probes it at the same time): an answer brings
        it back, a failure keeps it down for a longer cooldown. Returns name -> error."""
        due = [
            m
            for m in self._members.values()
            if m.breaker.state is BreakerState.HALF_OPEN and m.breaker.allow()
        ]
        errors = await asyncio.gather(*(self._discover(m) for m in due))
        for member, error in zip(due, errors, strict=True):
            if error is None:
                log.info("endpoint %s is back (its probe answered)", member.name)
        return {m.name: err for m, err in zip(due, errors, strict=True)}

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.probe_interval_s)
            try:
                await self.probe_down()
            except Exception:
                log.exception("endpoint probe failed")

    async def _refresh_loop(
        self, now: bool, on_refreshed: Callable[[], Awaitable[None]] | None
    ) -> None:
        interval = self.config.refresh_interval_s
        while True:
            if not now:
                if interval <= 0:
                    return
                await asyncio.sleep(interval)
            now = False
            try:
                await self.refresh()
                if on_refreshed is not None:
                    await on_refreshed()
            except Exception:
                log.exception("endpoint refresh failed")

    async def aclose(self) -> None:
        """Stop rediscovery and close every endpoint client."""
        for task in (self._refresh_task, self._probe_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._refresh_task = self._probe_task = None
        for member in list(self._members.values()):
            await _close_quietly(member.deployment)
        self._members.clear()

    # --- aliases ------------------------------------------------------------------------

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

    # --- listings -----------------------------------------------------------------------

    def info(self, member: Member) -> EndpointInfo:
        b = member.breaker
        return EndpointInfo(
            name=member.name,
            url=member.deployment.base_url,
            masked_key=member.deployment.masked_key(),
            healthy=b.state is BreakerState.CLOSED,
            state=str(b.state),
            latency_ms=None if b.latency_s is None else round(b.latency_s * 1000, 1),
            models=tuple(member.names()),
            last_error=b.last_error,
            cooldown_remaining_s=round(b.cooldown_remaining(), 2),
            pool=member.pool,
            status=b.status,
        )

    # --- the plan -----------------------------------------------------------------------

    def plan(self, model: str, session: str | None = None) -> list[str]:
        """Endpoint names serving ``model`` in the order a request would try them.

        Includes endpoints whose breaker is open: the request skips them and notes it.
        """
        model = self.resolve(model)
        names = [n for n, m in self._members.items() if m.model_id(model) is not None]
        if self.config.routing == "round_robin":
            if names:
                self._turn += 1
                k = self._turn % len(names)
                names = names[k:] + names[:k]
            return names
        if session is not None:
            names.sort(key=lambda n: _rendezvous(session, n), reverse=True)
        else:
            names.sort(key=lambda n: (self._members[n].breaker.latency_s or 0.0, n))
        sticky = self._sticky.get(session) if session is not None else None
        if sticky in names:
            names.remove(sticky)
            names.insert(0, sticky)
        return names

    def model_on(self, member: Member, model: str) -> str | None:
        """The id ``member`` knows ``model`` by (``<namespace>/<id>`` -> ``<id>``);
        None when it does not serve it."""
        return member.model_id(self.resolve(model))

    def pools(self) -> dict[str, list[str]]:
        """Pool name -> its members' names."""
        found: dict[str, list[str]] = {}
        for member in self._members.values():
            if member.pool is not None:
                found.setdefault(member.pool, []).append(member.name)
        return found

    def remember(self, session: str | None, name: str) -> None:
        """``session`` was served by endpoint ``name``: try it first next time."""
        if session is None or self.config.routing == "round_robin":
            return
        self._sticky[session] = name
        self._sticky.move_to_end(session)
        while len(self._sticky) > self.config.max_sticky_sessions:
            self._sticky.popitem(last=False)

    def sticky_endpoint(self, session: str) -> str | None:
        return self._sticky.get(session)

    def backoff(self, retry_no: int) -> float:
        """Seconds to wait before retry number ``retry_no`` of an endpoint already tried."""
        r = self.config.retry
        base = min(r.backoff_max_s, r.backoff_s * (2 ** max(0, retry_no - 1)))
        return max(0.0, base * (1 + random.uniform(-r.jitter, r.jitter)))


def _usable(models: Sequence[str], endpoint: str) -> list[str]:
    """The ids fit to become model names; the others are dropped with a warning."""
    usable = [m for m in dict.fromkeys(models) if isinstance(m, str) and _MODEL_ID_RE.match(m)]
    if len(usable) < len(models):
        log.warning("endpoint %s: %d listed model ids ignored", endpoint, len(models) - len(usable))
    return usable


def _rendezvous(session: str, name: str) -> int:
    digest = hashlib.blake2b(f"{session}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


async def _close_quietly(deployment: Deployment) -> None:
    try:
        await deployment.aclose()
    except Exception:
        log.warning("closing endpoint %s failed", deployment.name)
