"""The inference router: a model name in, a backend that serves it out.

Remote endpoints come first (the pool's plan: sticky endpoint, then rendezvous
order), then the local backends registered for the model, then the configured
fallback; :class:`~.failover.FailoverGeneration` walks that order until a
backend produces its first piece of text. "Router" means this and nothing
else in hivebridge.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from .affinity import Affinity
from .endpoints import Deployment, EndpointInfo, EndpointPool, RouterConfig
from .failover import FailoverGeneration
from .hooks import NO_HOOKS, InferenceHooks
from .remote import EndpointTimeouts
from .types import Backend, ChatMessage, InferenceError, SamplingParams


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
        hooks: InferenceHooks = NO_HOOKS,
    ) -> None:
        self.pool = EndpointPool(config, clock=clock, sleep=sleep, hooks=hooks)
        self.fallback = fallback
        self.default_model = default_model
        self.name = "router"
        self._local: dict[str, Backend] = {}

    @property
    def config(self) -> RouterConfig:
        return self.pool.config

    # --- endpoints -----------------------------------------------------------------

    async def add_endpoint(
        self,
        name: str,
        url: str,
        api_key: str | None = None,
        *,
        timeouts: EndpointTimeouts | None = None,
        affinity: Affinity | None = None,
        pool: str | None = None,
        replace: bool = False,
        discover: bool = True,
    ) -> EndpointInfo:
        """Add an endpoint and discover its models at once (or, with ``discover=False``,
        in the background).

        ``affinity``: where its router reads session ids (a header by default);
        ``pool``: the replica pool it belongs to (its models are ``<pool>/<model>``);
        ``replace``: replace one of that name (else that is an ``EndpointConflict``).
        """
        deployment = self.pool.remote(name, url, api_key, timeouts, affinity)
        try:
            member = await self.pool.add(
                deployment, None if discover else (), pool=pool, replace=replace
            )
        except Exception:
            await deployment.aclose()
            raise
        return self.pool.info(member)

    async def add_deployment(
        self,
        deployment: Deployment,
        models: Sequence[str] | None = None,
        *,
        pool: str | None = None,
        replace: bool = False,
    ) -> EndpointInfo:
        """Add any :class:`Deployment`; ``models=None`` discovers them now."""
        return self.pool.info(await self.pool.add(deployment, models, pool=pool, replace=replace))

    async def remove_endpoint(self, name: str) -> bool:
        return await self.pool.remove(name)

    async def refresh(self, name: str | None = None) -> dict[str, str | None]:
        return await self.pool.refresh(name)

    def start(
        self,
        *,
        discover_now: bool = False,
        on_refreshed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Background discovery; see :meth:`EndpointPool.start`."""
        self.pool.start(discover_now=discover_now, on_refreshed=on_refreshed)

    async def aclose(self) -> None:
        """Stop rediscovery and close every endpoint client (not local backends)."""
        await self.pool.aclose()

    # --- local backends and aliases ---------------------------------------------------

    def set_local(self, model: str, backend: Backend) -> None:
        """Serve ``model`` locally when no endpoint can (tried before the fallback)."""
        self._local[model] = backend

    def remove_local(self, model: str) -> None:
        self._local.pop(model, None)

    def local_models(self) -> list[str]:
        return list(self._local)

    def set_alias(self, alias: str, model: str) -> None:
        self.pool.set_alias(alias, model)

    def remove_alias(self, alias: str) -> None:
        self.pool.remove_alias(alias)

    def resolve(self, model: str) -> str:
        return self.pool.resolve(model)

    # --- listings ---------------------------------------------------------------------

    def endpoints(self) -> list[EndpointInfo]:
        return [self.pool.info(m) for m in self.pool.members()]

    def endpoint_info(self, name: str) -> EndpointInfo | None:
        member = self.pool.member(name)
        return self.pool.info(member) if member is not None else None

    def models(self) -> dict[str, list[str]]:
        """Model -> names of the endpoints serving it (local-only models map to [])."""
        index: dict[str, list[str]] = {}
        for member in self.pool.members():
            for model in member.names():
                index.setdefault(model, []).append(member.name)
        for model in self._local:
            index.setdefault(model, [])
        return index

    def sticky_endpoint(self, session: str) -> str | None:
        return self.pool.sticky_endpoint(session)

    def plan(self, model: str, session: str | None = None) -> list[str]:
        return self.pool.plan(model, session)

    # --- routing ----------------------------------------------------------------------

    def local_candidates(self, model: str, local: Backend | None = None) -> list[Backend]:
        """The local backends a request for ``model`` falls back on, in order: ``local``
        (or the one registered for the model), then the fallback."""
        found: list[Backend] = []
        local = local or self._local.get(self.resolve(model))
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
        local: Backend | None = None,
    ) -> FailoverGeneration:
        """``local`` serves the model locally instead of the backend registered for it."""
        chosen = model or self.default_model
        if chosen is None:
            raise InferenceError("no model given and no default model is configured")
        resolved = self.resolve(chosen)
        return FailoverGeneration(
            self.pool,
            self.local_candidates(resolved, local),
            self.fallback,
            resolved,
            messages,
            params,
            session,
        )

    def for_model(self, model: str, local: Backend | None = None) -> ModelRoute:
        """A :class:`Backend` named ``model`` that routes through this router."""
        return ModelRoute(self, model, local)


class ModelRoute:
    """The router bound to one model name: a plain :class:`Backend` for a persona."""

    def __init__(self, router: InferenceRouter, model: str, local: Backend | None = None) -> None:
        self.router = router
        self.name = model
        self.local = local

    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        *,
        session: str | None = None,
    ) -> FailoverGeneration:
        return self.router.generate(
            messages, params, session=session, model=self.name, local=self.local
        )
