"""Local model registry: find GGUF files, load/unload/hot-swap engines within a memory budget."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from hivebridge.inference.bundled import BUNDLED_MODEL_NAME, bundled_model_path
from hivebridge.inference.types import BackendUnavailable, InferenceError

from .engine import LocalEngine
from .gguf_meta import GGUFError, model_shape
from .settings import EngineSettings, WorkerProfile

log = logging.getLogger(__name__)


class MemoryBudgetExceeded(InferenceError):
    """Loading this model would exceed the configured memory budget."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    path: Path
    size_bytes: int
    bundled: bool = False
    loaded: bool = False


class LocalModelRegistry:
    """Models found in ``dirs`` (``*.gguf``) plus the bundled default.

    Estimated memory of a loaded model = file size + KV pool bytes
    (n_ctx x per-token KV size read from the GGUF header); a load that would
    push the total past ``memory_budget`` bytes is refused.
    """

    def __init__(
        self,
        dirs: Iterable[Path | str] = (),
        memory_budget: int | None = None,
        settings: EngineSettings | None = None,
        profiles: Mapping[str, WorkerProfile] | None = None,
        *,
        include_bundled: bool = True,
    ) -> None:
        self.dirs = [Path(d) for d in dirs]
        self.memory_budget = memory_budget
        self.settings = settings or EngineSettings()
        self.profiles = dict(profiles or {})
        self.include_bundled = include_bundled
        self._models: dict[str, ModelInfo] = {}
        self._engines: dict[str, LocalEngine] = {}
        self._estimates: dict[str, int] = {}
        self._lock = asyncio.Lock()

    def scan(self) -> list[ModelInfo]:
        """Re-read the model directories (loaded engines are kept)."""
        found: dict[str, ModelInfo] = {}
        if self.include_bundled:
            bundled = bundled_model_path()
            if bundled is not None:
                found[BUNDLED_MODEL_NAME] = ModelInfo(
                    BUNDLED_MODEL_NAME, bundled, bundled.stat().st_size, bundled=True
                )
        for d in self.dirs:
            if not d.is_dir():
                log.warning("model directory %s does not exist", d)
                continue
            for path in sorted(d.rglob("*.gguf")):
                name = path.stem
                if name in found:
                    log.warning(
                        "duplicate model name %s (%s); keeping %s", name, path, found[name].path
                    )
                    continue
                found[name] = ModelInfo(name, path, path.stat().st_size)
        for name in self._engines:
            if name not in found:  # loaded but deleted from disk: keep listing it
                found[name] = self._models[name]
        self._models = found
        return self.list()

    def list(self) -> list[ModelInfo]:
        return [
            ModelInfo(m.name, m.path, m.size_bytes, m.bundled, m.name in self._engines)
            for m in sorted(self._models.values(), key=lambda m: m.name)
        ]

    def settings_for(self, profile: str | WorkerProfile | None) -> EngineSettings:
        if profile is None:
            return self.settings
        if isinstance(profile, str):
            try:
                profile = self.profiles[profile]
            except KeyError:
                raise InferenceError(f"unknown worker profile {profile!r}") from None
        return profile.apply(self.settings)

    def estimate_bytes(self, name: str, settings: EngineSettings | None = None) -> int:
        info = self._info(name)
        s = settings or self.settings
        try:
            per_token = model_shape(info.path).kv_bytes_per_token()
        except (GGUFError, OSError) as exc:
            raise InferenceError(f"cannot read {info.path}: {exc}") from exc
        return info.size_bytes + s.kv_bytes(per_token)

    def used_bytes(self) -> int:
        return sum(self._estimates.values())

    def _info(self, name: str) -> ModelInfo:
        if not self._models:
            self.scan()
        try:
            return self._models[name]
        except KeyError:
            raise InferenceError(f"unknown local model {name!r}") from None

    async def load(self, name: str, profile: str | WorkerProfile | None = None) -> LocalEngine:
        """Load ``name`` (no-op if loaded); refused when over the memory budget."""
        async with self._lock:
            return await self._load(name, profile, freeing=None)

    async def _load(
        self, name: str, profile: str | WorkerProfile | None, freeing: str | None
    ) -> LocalEngine:
        if name in self._engines:
            return self._engines[name]
        info = self._info(name)
        settings = self.settings_for(profile)
        need = await asyncio.to_thread(self.estimate_bytes, name, settings)
        if self.memory_budget is not None:
            used = self.used_bytes() - (self._estimates.get(freeing, 0) if freeing else 0)
            if used + need > self.memory_budget:
                raise MemoryBudgetExceeded(
                    f"loading {name} needs ~{need / 2**20:.0f} MiB "
                    f"(model {info.size_bytes / 2**20:.0f} MiB + "
                    f"KV pool of {settings.n_ctx} tokens); "
                    f"{used / 2**20:.0f} of {self.memory_budget / 2**20:.0f} MiB already in use"
                )
        engine = LocalEngine(info.path, settings, model_name=name)
        await engine.start()
        self._engines[name] = engine
        self._estimates[name] = need
        return engine

    async def unload(self, name: str, *, drain_timeout: float = 0.0) -> None:
        """Stop the engine; in-flight requests get ``drain_timeout`` s, then BackendUnavailable."""
        async with self._lock:
            await self._unload(name, drain_timeout)

    async def _unload(self, name: str, drain_timeout: float) -> None:
        engine = self._engines.pop(name, None)
        self._estimates.pop(name, None)
        if engine is not None:
            await engine.stop(drain_timeout=drain_timeout)

    async def swap(
        self,
        old: str,
        new: str,
        profile: str | WorkerProfile | None = None,
        *,
        drain_timeout: float = 5.0,
    ) -> LocalEngine:
        """Hot-swap: load ``new`` and unload ``old`` without a restart.

        The new engine is loaded first when the budget allows both (no gap in
        service); otherwise the old one is drained and unloaded first.
        """
        async with self._lock:
            try:
                engine = await self._load(new, profile, freeing=None)
            except MemoryBudgetExceeded:
                await self._load_check_only(new, profile, freeing=old)
                await self._unload(old, drain_timeout)
                return await self._load(new, profile, freeing=None)
            if old != new:
                await self._unload(old, drain_timeout)
            return engine

    async def _load_check_only(
        self, name: str, profile: str | WorkerProfile | None, freeing: str
    ) -> None:
        settings = self.settings_for(profile)
        need = await asyncio.to_thread(self.estimate_bytes, name, settings)
        if self.memory_budget is not None:
            used = self.used_bytes() - self._estimates.get(freeing, 0)
            if used + need > self.memory_budget:
                raise MemoryBudgetExceeded(
                    f"{name} (~{need / 2**20:.0f} MiB) does not fit the memory budget "
                    f"even after unloading {freeing}"
                )

    def get(self, name: str) -> LocalEngine:
        engine = self._engines.get(name)
        if engine is None or not engine.ready:
            raise BackendUnavailable(f"local model {name!r} is not loaded")
        return engine

    def loaded(self) -> dict[str, LocalEngine]:
        return dict(self._engines)

    async def close(self) -> None:
        async with self._lock:
            for name in list(self._engines):
                await self._unload(name, 0.0)
