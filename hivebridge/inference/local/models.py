"""The local models manager: every GGUF file found, the engines loaded, the memory budget.

* **Files.** :meth:`LocalModels.rescan` reads the models directory, the
  explicit model entries and the default model: name, size, quantisation,
  trained context length, read from the GGUF header without loading.
* **Workers.** A loaded model is a *worker*: one :class:`LocalEngine` (its own
  context, KV pool and scheduler) for a model and an engine profile (a worker
  profile that changes the engine, e.g. a longer context, gets its own). All
  engines share the cores through one :class:`CoreTurns`: one decode step at a
  time in the whole process.
* **Budget.** A worker's memory is estimated as the file's size plus its KV
  pool (``n_ctx`` x the per-token K/V size read from the header). Loading past
  ``memory_budget`` unloads the least recently used idle workers first; a
  model that cannot fit even alone is refused with the numbers.
* **On demand.** :meth:`backend` is a :class:`Backend` that loads its model on
  first use (the request waits; :meth:`state` says "loading" meanwhile).
* **Unload.** Running requests get ``unload_grace_s`` to finish, then they are
  cancelled with an error; the worker's sequences are freed.
* **Replaced files.** A rescan that finds a loaded model's file changed
  (size or modification time) unloads it, so the next use loads the new file;
  its KV snapshots carry the old fingerprint and are never reused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from hivebridge.inference.generation import StreamingGeneration
from hivebridge.inference.types import (
    BackendUnavailable,
    ChatMessage,
    Generation,
    GenerationStats,
    InferenceError,
    SamplingParams,
    ToolCall,
    tool_calls_of,
)

from .engine import LocalEngine
from .gguf_meta import GGUFError, model_shape
from .settings import EngineSettings, WorkerProfile
from .turns import CoreTurns

log = logging.getLogger(__name__)


BUSY_POLL_S = 0.02  # how often a load waiting for room looks for an idle model


class MemoryBudgetExceeded(InferenceError):
    """Loading this model would exceed the configured memory budget."""


class LoadState(StrEnum):
    NOT_LOADED = "not loaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model comes from before it is scanned: a path, a name, its own settings."""

    name: str
    path: Path
    settings: EngineSettings | None = None  # None: the manager's base settings
    default: bool = False  # the bridge's default (and fallback) model


@dataclass(frozen=True, slots=True)
class ModelFile:
    """A GGUF file found by a scan (header only; nothing loaded)."""

    name: str
    path: Path
    size_bytes: int
    mtime_ns: int
    quantization: str
    context_length: int
    n_layer: int
    kv_bytes_per_token: int
    settings: EngineSettings
    default: bool = False

    def changed(self, other: ModelFile) -> bool:
        return (self.path, self.size_bytes, self.mtime_ns) != (
            other.path,
            other.size_bytes,
            other.mtime_ns,
        )


@dataclass(slots=True)
class Worker:
    """One loaded (or loading) engine of a model."""

    model: str
    profile: str  # "" for the model's own engine
    file: ModelFile
    settings: EngineSettings
    estimate_bytes: int
    engine: LocalEngine | None = None
    state: LoadState = LoadState.LOADING
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.model, self.profile)


@dataclass(frozen=True, slots=True)
class ModelHooks:
    """How the manager reports loads and unloads (the app counts them in metrics)."""

    loaded: Callable[[Worker, float], None] = lambda worker, seconds: None
    unloaded: Callable[[Worker], None] = lambda worker: None


def scan_sources(sources: Sequence[ModelSource], models_dir: Path | None) -> list[ModelSource]:
    """The explicit sources first (the default model among them), then ``*.gguf`` in the dir.

    A name already taken keeps its first source; a file in the directory that an
    explicit entry already names is not listed twice.
    """
    found: dict[str, ModelSource] = {}
    paths: set[Path] = set()
    for source in sources:
        if source.name not in found:
            found[source.name] = source
            paths.add(source.path.resolve())
    if models_dir is not None and models_dir.is_dir():
        for path in sorted(models_dir.rglob("*.gguf")):
            name = path.name.removesuffix(".gguf")
            if path.resolve() in paths or name in found:
                continue
            found[name] = ModelSource(name, path)
    return list(found.values())


class LocalModels:
    def __init__(
        self,
        sources: Callable[[], list[ModelSource]],
        base: EngineSettings,
        *,
        memory_budget: int | None = None,
        profiles: Mapping[str, WorkerProfile] | None = None,
        unload_grace_s: float = 10.0,
        busy_wait_s: float = 30.0,
        hooks: ModelHooks | None = None,
    ) -> None:
        """``sources`` lists what to scan (config entries and the directory, read anew on
        every rescan); ``base`` is the engine settings of a model without its own.
        ``busy_wait_s`` is how long a load that needs room waits for a busy model to go
        idle (its request to finish) before it is refused: a swap under a tight budget
        should queue behind a reply, not fail beside it."""
        self._sources = sources
        self.base = base
        self.memory_budget = memory_budget or None
        self.profiles = dict(profiles or {})
        self.unload_grace_s = unload_grace_s
        self.busy_wait_s = busy_wait_s
        self.hooks = hooks or ModelHooks()
        self.turns = CoreTurns()
        self._files: dict[str, ModelFile] = {}
        self._problems: dict[str, str] = {}
        self._workers: dict[tuple[str, str], Worker] = {}
        self._backends: dict[tuple[str, str], ManagedModel] = {}
        self._lock = asyncio.Lock()  # loads and unloads one at a time (the budget holds)

    # --- files --------------------------------------------------------------------------

    async def rescan(self) -> list[ModelFile]:
        """Read every source's header again; unload loaded models whose file changed."""
        sources = await asyncio.to_thread(self._sources)
        found, problems = await asyncio.to_thread(_scan, sources, self.base)
        stale = [
            w for w in self._workers.values() if w.model in found and found[w.model].changed(w.file)
        ]
        self._files, self._problems = found, problems
        for name, problem in problems.items():
            log.warning("model %s: %s", name, problem)
        for worker in stale:
            log.info("model %s changed on disk; unloading it for a reload", worker.model)
            await self.unload(worker.model)
        return self.files()

    def files(self) -> list[ModelFile]:
        return sorted(self._files.values(), key=lambda f: (not f.default, f.name))

    def file(self, name: str) -> ModelFile | None:
        return self._files.get(name)

    def problems(self) -> dict[str, str]:
        """Sources that could not be read (not a GGUF, missing), by name."""
        return dict(self._problems)

    @property
    def default_model(self) -> str | None:
        return next((f.name for f in self._files.values() if f.default), None)

    # --- state --------------------------------------------------------------------------

    def state(self, name: str) -> LoadState:
        """The most advanced state of any worker of ``name``."""
        states = {w.state for w in self._workers.values() if w.model == name}
        for state in (LoadState.LOADED, LoadState.LOADING, LoadState.UNLOADING):
            if state in states:
                return state
        return LoadState.NOT_LOADED

    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def engines(self) -> dict[str, LocalEngine]:
        """Loaded engines by model name (profile workers as ``model@profile``)."""
        return {
            (w.model if not w.profile else f"{w.model}@{w.profile}"): w.engine
            for w in self._workers.values()
            if w.engine is not None and w.state is LoadState.LOADED
        }

    async def forget_sessions(self, prefix: str) -> int:
        """Every loaded engine forgets the KV and snapshots of sessions starting with
        ``prefix`` (sessions are ``room|persona``: a room's prefix is ``room|``)."""
        dropped = 0
        for engine in self.engines().values():
            try:
                dropped += await engine.forget_sessions(prefix)
            except InferenceError as e:  # unloading or failed: its KV goes with it anyway
                log.debug("could not forget sessions on an engine: %s", e)
        return dropped

    def used_bytes(self) -> int:
        return sum(w.estimate_bytes for w in self._workers.values())

    def settings_for(self, file: ModelFile, profile: str) -> EngineSettings:
        settings = file.settings
        worker_profile = self.profiles.get(profile) if profile else None
        if worker_profile is not None and worker_profile.changes_engine:
            settings = worker_profile.apply(settings)
        return settings

    def engine_profile(self, profile: str | None) -> str:
        """The worker key of ``profile``: its own engine only if it changes the engine."""
        p = self.profiles.get(profile or "")
        return p.name if p is not None and p.changes_engine else ""

    def estimate_bytes(self, file: ModelFile, settings: EngineSettings) -> int:
        return file.size_bytes + settings.kv_bytes(file.kv_bytes_per_token)

    # --- load and unload ----------------------------------------------------------------

    async def load(self, name: str, profile: str | None = None) -> LocalEngine:
        """Load ``name`` (for ``profile``) unless loaded; returns its engine."""
        key = (name, self.engine_profile(profile))
        worker = self._workers.get(key)
        if worker is None or worker.state is LoadState.UNLOADING:
            async with self._lock:
                worker = self._workers.get(key)
                if worker is None:
                    worker = await self._load_locked(*key)
        await worker.loaded.wait()
        if worker.error is not None or worker.engine is None:
            raise worker.error or BackendUnavailable(f"local model {name} failed to load")
        worker.last_used = time.monotonic()
        return worker.engine

    async def _load_locked(self, name: str, profile: str) -> Worker:
        file = self._files.get(name)
        if file is None:
            known = ", ".join(sorted(self._files)) or "none"
            problem = self._problems.get(name)
            raise InferenceError(
                f"local model {name}: {problem}"
                if problem
                else f"no local model {name!r} ({known})"
            )
        settings = self.settings_for(file, profile)
        need = self.estimate_bytes(file, settings)
        await self._make_room(name, need)
        worker = Worker(name, profile, file, settings, need)
        self._workers[worker.key] = worker
        started = time.monotonic()
        engine = LocalEngine(file.path, settings, model_name=name, turns=self.turns)
        try:
            await engine.start()
        except BaseException as exc:
            worker.error = exc if isinstance(exc, Exception) else InferenceError(str(exc))
            worker.state = LoadState.NOT_LOADED
            del self._workers[worker.key]
            worker.loaded.set()
            raise
        worker.engine = engine
        worker.state = LoadState.LOADED
        worker.loaded.set()
        took = time.monotonic() - started
        log.info(
            "loaded model %s%s in %.2fs (~%d MiB)",
            name,
            f" for profile {profile}" if profile else "",
            took,
            need >> 20,
        )
        self.hooks.loaded(worker, took)
        return worker

    async def _make_room(self, name: str, need: int) -> None:
        budget = self.memory_budget
        if budget is None:
            return
        if need > budget:
            raise MemoryBudgetExceeded(
                f"local model {name} needs ~{need >> 20} MiB (file + KV pool), more than the "
                f"whole memory budget of {budget >> 20} MiB"
            )
        deadline = time.monotonic() + self.busy_wait_s
        while self.used_bytes() + need > budget:
            idle = [
                w
                for w in self._workers.values()
                if w.state is LoadState.LOADED and w.in_use == 0 and _idle(w.engine)
            ]
            if not idle:
                if time.monotonic() < deadline:
                    await asyncio.sleep(BUSY_POLL_S)
                    continue
                busy = ", ".join(w.model for w in self._workers.values())
                raise MemoryBudgetExceeded(
                    f"local model {name} needs ~{need >> 20} MiB; {self.used_bytes() >> 20} of "
                    f"{budget >> 20} MiB are held by models in use ({busy})"
                )
            victim = min(idle, key=lambda w: w.last_used)
            log.info("unloading %s (least recently used) to make room for %s", victim.model, name)
            await self._unload_worker(victim, grace_s=0.0)

    async def unload(self, name: str, *, grace_s: float | None = None) -> bool:
        """Unload every worker of ``name``; False when none was loaded.

        Requests running on it get ``grace_s`` (default ``unload_grace_s``) to
        finish; whatever still runs then is cancelled and fails with an error.
        """
        grace = self.unload_grace_s if grace_s is None else grace_s
        async with self._lock:
            victims = [w for w in self._workers.values() if w.model == name]
            for worker in victims:
                await self._unload_worker(worker, grace_s=grace)
        return bool(victims)

    async def _unload_worker(self, worker: Worker, *, grace_s: float) -> None:
        worker.state = LoadState.UNLOADING
        engine = worker.engine
        if engine is not None:
            await engine.stop(drain_timeout=grace_s)
        worker.engine = None
        worker.state = LoadState.NOT_LOADED
        self._workers.pop(worker.key, None)
        self.hooks.unloaded(worker)
        log.info(
            "unloaded model %s%s", worker.model, f"@{worker.profile}" if worker.profile else ""
        )

    async def close(self) -> None:
        async with self._lock:
            for worker in list(self._workers.values()):
                await self._unload_worker(worker, grace_s=0.0)

    # --- use ------------------------------------------------------------------------------

    def use(self, name: str, profile: str | None = None) -> Hold:
        """The engine of ``name``, loaded if need be, held from eviction while in use
        (``async with models.use(name) as engine``)."""
        return Hold(self, name, profile)

    async def _hold(self, name: str, profile: str | None) -> tuple[Worker, LocalEngine]:
        engine = await self.load(name, profile)
        worker = self._workers.get((name, self.engine_profile(profile)))
        if worker is None or worker.engine is not engine:
            raise BackendUnavailable(f"local model {name} was unloaded")
        worker.in_use += 1
        return worker, engine

    def _release(self, worker: Worker) -> None:
        worker.in_use -= 1
        worker.last_used = time.monotonic()

    def backend(self, name: str, profile: str | None = None) -> ManagedModel:
        """The :class:`Backend` for ``name`` (one per model and engine profile), loading it
        on first use."""
        key = (name, self.engine_profile(profile))
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = ManagedModel(self, name, key[1] or None)
        return backend

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for prompt budgets: the default model's tokenizer if loaded."""
        default = self.default_model
        for worker in self._workers.values():
            if worker.model == default and worker.engine is not None and worker.engine.ready:
                return worker.engine.count_tokens(text)
        return len(text) // 4 + 1


def _idle(engine: LocalEngine | None) -> bool:
    if engine is None:
        return True
    load = engine.load
    return load.waiting == 0 and load.active == 0


def _scan(
    sources: Sequence[ModelSource], base: EngineSettings
) -> tuple[dict[str, ModelFile], dict[str, str]]:
    found: dict[str, ModelFile] = {}
    problems: dict[str, str] = {}
    for source in sources:
        try:
            st = source.path.stat()
            shape = model_shape(source.path)
        except FileNotFoundError:
            problems[source.name] = f"no such file: {source.path}"
            continue
        except (GGUFError, OSError) as exc:
            problems[source.name] = f"{source.path.name} is not a usable GGUF file ({exc})"
            continue
        found[source.name] = ModelFile(
            name=source.name,
            path=source.path,
            size_bytes=st.st_size,
            mtime_ns=st.st_mtime_ns,
            quantization=shape.quantization,
            context_length=shape.n_ctx_train,
            n_layer=shape.n_layer,
            kv_bytes_per_token=shape.kv_bytes_per_token(),
            settings=source.settings or base,
            default=source.default,
        )
    return found, problems


class ManagedModel:
    """A local model as a :class:`Backend`: the request loads it first if it is not loaded."""

    def __init__(self, models: LocalModels, name: str, profile: str | None = None) -> None:
        self.models = models
        self.model = name
        self.profile = profile
        self.name = f"local:{name}"

    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        *,
        session: str | None = None,
    ) -> ManagedGeneration:
        if self.models.file(self.model) is None:
            raise BackendUnavailable(f"no local model {self.model!r}")
        return ManagedGeneration(self, messages, params, session)


class Hold:
    """A loaded engine held from eviction for the length of an ``async with``.

    A class, not an async generator: at shutdown asyncio closes every live async
    generator in no fixed order, and a generator-based hold closed before the reply
    streaming inside it made that reply's close fail ("generator didn't stop after
    athrow()")."""

    def __init__(self, models: LocalModels, name: str, profile: str | None) -> None:
        self._models, self._name, self._profile = models, name, profile
        self._worker: Worker | None = None

    async def __aenter__(self) -> LocalEngine:
        self._worker, engine = await self._models._hold(self._name, self._profile)
        return engine

    async def __aexit__(self, *exc: object) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            self._models._release(worker)


class ManagedGeneration(StreamingGeneration):
    """Loads the model (if need be), then streams the engine's generation."""

    def __init__(
        self,
        backend: ManagedModel,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        session: str | None,
    ) -> None:
        super().__init__(GenerationStats(model=backend.model, backend=backend.name))
        self.backend = backend
        self.tool_calls: list[ToolCall] = []  # what the model asked for (tools), at the end
        self.tool_note = ""
        self._messages = list(messages)
        self._params = params
        self._session = session
        self._inner: Generation | None = None

    async def _stream(self) -> AsyncGenerator[str, None]:
        b = self.backend
        async with b.models.use(b.model, b.profile) as engine:
            inner = engine.generate(self._messages, self._params, session=self._session)
            self._inner = inner
            async for piece in inner:
                self.stats.mark_first_token()
                yield piece
            s, i = self.stats, inner.stats
            s.prompt_tokens, s.cached_tokens = i.prompt_tokens, i.cached_tokens
            s.evaluated_tokens, s.completion_tokens = i.evaluated_tokens, i.completion_tokens
            s.queue_wait_s = i.queue_wait_s
            calls, self.tool_note = tool_calls_of(inner)
            self.tool_calls = list(calls)
            s.finish(i.finish_reason or "stop")

    async def _release(self) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            await inner.aclose()
