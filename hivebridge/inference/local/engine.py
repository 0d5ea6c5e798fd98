"""LocalEngine: the asyncio-facing Backend over one model, one context, one engine thread.

The engine thread owns the llama context; the event loop only puts commands on
a queue and receives per-request updates through ``loop.call_soon_threadsafe``.
Nothing here holds a lock around llama.cpp.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivebridge.inference.envelope import EnvelopeGeneration, generate_with_envelope
from hivebridge.inference.generation import StreamingGeneration
from hivebridge.inference.types import (
    BackendUnavailable,
    ChatMessage,
    GenerationStats,
    InferenceError,
    SamplingParams,
)

from .grammar import check_grammar, grammar_for_schema
from .model import LoadedModel, load_model
from .prompt import PromptRenderer, fit_messages
from .sampler import ResolvedSampling, random_seed
from .scheduler import Request, Scheduler, Update
from .settings import EngineSettings
from .snapshots import SnapshotStore
from .turns import CoreTurns

log = logging.getLogger(__name__)

_END = object()
_LIVENESS_S = 2.0  # how often a waiting consumer checks that the engine thread is alive


@dataclass(slots=True)
class _Submit:
    req: Request


@dataclass(slots=True)
class _Cancel:
    rid: int


@dataclass(slots=True)
class _Call:
    fn: Callable[[Scheduler], Any]
    done: Callable[[Any, BaseException | None], None]


@dataclass(slots=True)
class _Stop:
    drain_until: float  # monotonic deadline for in-flight requests; 0 = fail them now


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """A cheap, lock-free view of the queue for metrics: replaced whole after each step."""

    waiting: int
    active: int


@dataclass(slots=True)
class PreparedPrompt:
    """The prompt as the engine will run it (after template rendering and trimming)."""

    messages: list[ChatMessage]
    text: str
    tokens: list[int]
    system_len: int
    trimmed: bool


class LocalGeneration(StreamingGeneration):
    """A running request; iterate for text pieces. Implements the Generation protocol.

    If you stop iterating early, call :meth:`aclose` so the sequence is freed.
    """

    def __init__(self, engine: LocalEngine, rid: int, stats: GenerationStats) -> None:
        super().__init__(stats)
        self._engine = engine
        self._rid = rid
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._finished = False
        self.tokens: list[int] = []  # completion token ids, set when the stream ends

    # Called on the event loop (via call_soon_threadsafe).
    def _on_update(self, u: Update) -> None:
        if self._finished:
            return
        st = self.stats
        st.prompt_tokens = u.prompt_tokens
        st.cached_tokens = u.cached_tokens
        st.evaluated_tokens = u.evaluated_tokens
        st.completion_tokens = u.completion_tokens
        if u.queue_wait_s is not None:
            st.queue_wait_s = u.queue_wait_s
        if u.first_token:
            st.mark_first_token()
        if u.text:
            self._queue.put_nowait(u.text)
        if u.finish is not None:
            self.tokens = list(u.tokens or ())
            self._finished = True
            st.finish(u.finish)
            self._queue.put_nowait(u.error if u.error is not None else _END)

    async def _stream(self) -> AsyncGenerator[str, None]:
        while True:
            try:
                if not self._queue.empty():
                    item = self._queue.get_nowait()
                else:
                    item = await asyncio.wait_for(self._queue.get(), _LIVENESS_S)
            except TimeoutError:
                if not self._finished and not self._engine.alive:
                    self._fail_local(self._engine.unavailable_error())
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, str)
            yield item

    def _fail_local(self, exc: Exception) -> None:
        if not self._finished:
            self._finished = True
            self.stats.finish("error")
            self._queue.put_nowait(exc)

    async def _release(self) -> None:
        """Cancelled before its end: the engine frees the request's sequence."""
        if not self._finished:
            self._finished = True
            self.stats.finish("cancelled")
            self._engine._send(_Cancel(self._rid))


class LocalEngine:
    """One GGUF model served with continuous batching and prefix reuse.

    ``engine = LocalEngine(path, settings)``; ``await engine.start()``; then
    ``engine.generate(messages, params, session=...)`` from the event loop.
    """

    def __init__(
        self,
        model_path: Path | str,
        settings: EngineSettings | None = None,
        *,
        name: str | None = None,
        model_name: str | None = None,
        turns: CoreTurns | None = None,
    ) -> None:
        """``turns``: shared with every other loaded model, so only one decodes at a time."""
        self.model_path = Path(model_path)
        self.settings = settings or EngineSettings()
        self._turns = turns or CoreTurns()
        self.model_name = model_name or self.model_path.name.removesuffix(".gguf")
        self.name = name or f"local:{self.model_name}"
        self._model: LoadedModel | None = None
        self._renderer: PromptRenderer | None = None
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._accepting = False
        self._crash: BaseException | None = None
        self._stopped = threading.Event()
        self._vocab_lock = threading.RLock()
        self.restored_personas = 0
        self._load = EngineLoad(0, 0)
        # Updates of the current step (engine thread), handed over in one wake-up.
        self._outbox: list[tuple[Callable[[Update], None], Update]] = []

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def load(self) -> EngineLoad:
        """Requests waiting for admission and running, as of the last step (any thread)."""
        return self._load

    @property
    def ready(self) -> bool:
        return self._accepting and self.alive

    @property
    def offloaded_layers(self) -> int:
        """Layers on a GPU (0 on a CPU-only build, or before the model is loaded)."""
        model = self._model
        return model.offloaded_layers if model is not None else 0

    @property
    def fingerprint(self) -> str | None:
        """The loaded model's identity (file, context parameters, template); None unloaded."""
        model = self._model
        return model.fingerprint if model is not None else None

    async def start(self) -> None:
        """Load the model on the engine thread (the event loop never blocks on it)."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(started,), name=f"hivebridge-engine-{self.model_name}",
            daemon=True,
        )  # fmt: skip
        self._thread.start()
        await started
        self._accepting = True

    async def stop(self, *, drain_timeout: float = 0.0) -> None:
        """Stop the engine thread and free the model.

        In-flight requests get ``drain_timeout`` seconds, then fail with BackendUnavailable.
        """
        self._accepting = False
        if self._thread is None:
            return
        if self._thread.is_alive():
            self._send(_Stop(time.monotonic() + drain_timeout if drain_timeout > 0 else 0.0))
            await asyncio.to_thread(self._thread.join)
        self._thread = None

    def unavailable_error(self) -> BackendUnavailable:
        if self._crash is not None:
            return BackendUnavailable(f"local engine {self.model_name} crashed: {self._crash!r}")
        return BackendUnavailable(f"local model {self.model_name} is not loaded")

    # --- prompts and tokens (any thread: the vocabulary is read-only) ---------------------

    def _need_model(self) -> LoadedModel:
        model = self._model
        if model is None or not self.ready:
            raise self.unavailable_error()
        return model

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        """Tokens of ``text`` with this model's vocabulary (special tokens parsed).

        Safe from any thread: the vocabulary is read-only; ``_vocab_lock`` only
        keeps an unload from freeing it mid-call.
        """
        with self._vocab_lock:
            return self._need_model().tokenize(text, add_special=add_special)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def count_message_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Prompt tokens ``messages`` would take, chat template and generation prompt included."""
        with self._vocab_lock:
            model = self._need_model()
            assert self._renderer is not None
            return len(model.tokenize(self._renderer.render(messages)))

    @property
    def max_context_tokens(self) -> int:
        """Prompt + completion limit for one request."""
        model = self._need_model()
        return max(
            16, min(self.settings.max_seq_tokens, model.n_ctx_seq, model.n_ctx_train or model.n_ctx)
        )

    def prepare(self, messages: Sequence[ChatMessage], max_tokens: int) -> PreparedPrompt:
        """Render, tokenize and (if needed) trim the history to fit the context."""
        with self._vocab_lock:
            return self._prepare(messages, max_tokens)

    def _prepare(self, messages: Sequence[ChatMessage], max_tokens: int) -> PreparedPrompt:
        model = self._need_model()
        renderer = self._renderer
        assert renderer is not None
        budget = max(8, self.max_context_tokens - max_tokens)
        msgs = list(messages) or [ChatMessage("user", "")]

        def count(ms: Sequence[ChatMessage]) -> int:
            return len(model.tokenize(renderer.render(ms)))

        fitted = fit_messages(msgs, count, budget)
        text = renderer.render(fitted)
        tokens = model.tokenize(text)
        if len(tokens) > budget:  # pathological template/tokenizer mismatch: keep the end
            tokens = tokens[-budget:]
        system_len = 0
        block = renderer.system_prefix(fitted, text)
        if block is not None:
            sys_tokens = model.tokenize(block)
            if tokens[: len(sys_tokens)] == sys_tokens:
                system_len = len(sys_tokens)
        return PreparedPrompt(fitted, text, tokens, system_len, fitted != msgs)

    def resolve(self, params: SamplingParams, *, ignore_eos: bool = False) -> ResolvedSampling:
        """Fill ``None`` fields from the profile defaults and apply the engine's limits."""
        d = self.settings.sampling

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        cap = min(self.settings.max_completion_tokens, max(1, self.max_context_tokens // 2))
        max_tokens = max(1, min(int(pick(params.max_tokens, d.max_tokens)), cap))
        seed = params.seed if params.seed is not None else random_seed()
        return ResolvedSampling(
            max_tokens=max_tokens,
            temperature=float(pick(params.temperature, d.temperature)),
            top_p=float(pick(params.top_p, d.top_p)),
            top_k=int(pick(params.top_k, d.top_k)),
            min_p=float(pick(params.min_p, d.min_p)),
            repeat_penalty=float(pick(params.repeat_penalty, d.repeat_penalty)),
            repeat_last_n=d.repeat_last_n,
            seed=int(seed),
            stop=tuple(params.stop or ()),
            ignore_eos=ignore_eos or params.ignore_eos,
            grammar=self._grammar(params),
            logit_bias=tuple(params.logit_bias),
        )

    def _grammar(self, params: SamplingParams) -> str | None:
        """The grammar of ``params.response_format`` (checked), or None."""
        if params.response_format is None:
            return None
        grammar = grammar_for_schema(params.response_format.schema_json())
        with self._vocab_lock:
            check_grammar(self._need_model().vocab, grammar)
        return grammar

    # --- Backend -----------------------------------------------------------------------------

    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        *,
        session: str | None = None,
        ignore_eos: bool = False,
        priority: int = 0,
    ) -> LocalGeneration | EnvelopeGeneration:
        """Start a request; ``session`` (e.g. "!room:hs|@persona:hs") keeps its KV warm.

        Raises BackendUnavailable when the model is not loaded (or the engine died).
        ``ignore_eos`` is for benchmarks: generate exactly ``max_tokens`` tokens.
        ``params.response_format`` constrains the output with a grammar; a request
        with ``params.tools`` is answered in the reply envelope (inference/envelope.py).
        ``priority``: higher is admitted and prefilled first (rooms 0; the API's
        requests come in below them by default).
        """
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("generate() must run on the event loop that started the engine")
        if params.tools:  # no native tool calls here: the reply envelope, under a grammar
            return generate_with_envelope(self.generate, messages, params, session=session)
        self._need_model()
        sampling = self.resolve(params, ignore_eos=ignore_eos)
        try:
            prepared = self.prepare(messages, sampling.max_tokens)
        except BackendUnavailable:
            raise
        except Exception as exc:
            raise InferenceError(f"could not build the prompt: {exc}") from exc
        pin_len = prepared.system_len if prepared.system_len >= self.settings.min_pin_tokens else 0
        return self._submit(prepared.tokens, sampling, session, pin_len, priority)

    def complete(
        self,
        prompt: str,
        params: SamplingParams,
        *,
        session: str | None = None,
        priority: int = 0,
    ) -> LocalGeneration:
        """A plain text completion of ``prompt`` (no chat template), as ``/v1/completions``.

        The prompt is tokenized with the model's BOS; a prompt longer than the
        context keeps its end.
        """
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("complete() must run on the event loop that started the engine")
        self._need_model()
        sampling = self.resolve(params)
        with self._vocab_lock:
            tokens = self._need_model().tokenize(prompt, add_special=True)
        budget = max(8, self.max_context_tokens - sampling.max_tokens)
        if len(tokens) > budget:
            tokens = tokens[-budget:]
        return self._submit(tokens, sampling, session, 0, priority)

    def _submit(
        self,
        tokens: list[int],
        sampling: ResolvedSampling,
        session: str | None,
        pin_len: int,
        priority: int,
    ) -> LocalGeneration:
        stats = GenerationStats(model=self.model_name, backend=self.name)
        rid = next(self._ids)
        gen = LocalGeneration(self, rid, stats)
        stats.prompt_tokens = len(tokens)

        def emit(update: Update) -> None:  # engine thread only; see _flush
            self._outbox.append((gen._on_update, update))

        req = Request(
            rid=rid,
            prompt=tokens,
            sampling=sampling,
            session=session,
            emit=emit,
            pin_len=pin_len if self.settings.prefix_cache else 0,
            priority=priority,
        )
        self._send(_Submit(req))
        return gen

    async def forget_sessions(self, prefix: str) -> int:
        """Forget the cached KV and snapshots of sessions starting with ``prefix``."""
        return int(await self.call(lambda s: s.forget_sessions(prefix)))

    async def inspect(self) -> dict[str, Any]:
        """Scheduler state (sequence counts, KV use, counters), read on the engine thread."""
        return dict(await self.call(lambda s: s.state()))

    async def call(self, fn: Callable[[Scheduler], Any]) -> Any:
        """Run ``fn(scheduler)`` on the engine thread between steps (tests, admin)."""
        self._need_model()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def done(result: Any, exc: BaseException | None) -> None:
            def settle() -> None:
                if fut.done():
                    return
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle)

        self._send(_Call(fn, done))
        return await fut

    # --- engine thread ------------------------------------------------------------------------

    def _send(self, cmd: object) -> None:
        self._commands.put(cmd)

    def _thread_main(self, started: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None

        def resolve_start(exc: BaseException | None) -> None:
            def settle() -> None:
                if started.done():
                    return
                if exc is None:
                    started.set_result(None)
                else:
                    started.set_exception(exc)

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle)

        store: SnapshotStore | None = None
        sched: Scheduler | None = None
        try:
            model = load_model(self.model_path, self.settings)
            self._model = model
            self._renderer = PromptRenderer(model.chat_template, model.bos_text, model.eos_text)
            s = self.settings
            if s.prefix_cache and (s.snapshot_ram_bytes > 0 or s.snapshot_dir is not None):
                store = SnapshotStore(
                    model.fingerprint,
                    ram_bytes=s.snapshot_ram_bytes,
                    disk_dir=s.snapshot_dir,
                    disk_bytes=s.snapshot_disk_bytes,
                )
            sched = Scheduler(model, s, store)
            self.restored_personas = sched.restore_personas()
        except BaseException as exc:
            # The caller of start() hears of it and says so; the trace is for debugging.
            log.debug("could not start the local engine for %s", self.model_path, exc_info=True)
            if sched is not None:
                sched.close()
            if store is not None:
                store.close()
            if self._model is not None:
                self._model.close()
                self._model = None
            resolve_start(InferenceError(f"could not load {self.model_path.name}: {exc}"))
            return
        resolve_start(None)
        try:
            self._serve(sched)
        except BaseException as exc:
            self._crash = exc
            log.exception("local engine thread crashed")
        finally:
            self._accepting = False
            err = self.unavailable_error()
            with contextlib.suppress(BaseException):
                sched.fail_all(err)
            self._drain_commands(sched, err)
            self._flush()
            if self._crash is None:
                try:
                    sched.persist()
                except Exception:
                    log.exception("could not persist room snapshots at shutdown")
            with contextlib.suppress(BaseException):
                sched.close()
            if store is not None:
                with contextlib.suppress(BaseException):
                    store.close()
            with self._vocab_lock:  # no tokenize() call is using the vocabulary now
                model_ref, self._model = self._model, None
            if model_ref is not None:
                model_ref.close()
            self._stopped.set()

    def _flush(self) -> None:
        """Hand the step's updates to the event loop in one wake-up.

        One ``call_soon_threadsafe`` per request per token meant eight
        self-pipe writes and loop wake-ups per step with eight rooms, each
        taking the core that llama.cpp's second thread is waiting for.
        """
        if not self._outbox or self._loop is None:
            return
        items, self._outbox = self._outbox, []
        try:
            self._loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # loop closed: the consumers are gone
            pass

    def _drain_commands(self, sched: Scheduler, err: BackendUnavailable) -> None:
        """Fail whatever arrived after the loop ended so no consumer waits forever."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Submit):
                with contextlib.suppress(BaseException):
                    cmd.req.emit(Update(finish="error", error=err))
            elif isinstance(cmd, _Call):
                cmd.done(None, err)

    def _serve(self, sched: Scheduler) -> None:
        drain_until: float | None = None
        prof = sched.profile
        prof["loop_s"] = prof["turns_wait_s"] = 0.0
        while True:
            busy = sched.has_work()
            # While draining, never block: the drain ends when the work does, and no
            # command may ever come to wake the thread.
            block = not busy and drain_until is None
            try:
                cmd = self._commands.get(block=block, timeout=None if block else 0)
            except queue.Empty:
                cmd = None
            t_iter = time.perf_counter()
            while cmd is not None:
                if isinstance(cmd, _Submit):
                    if drain_until is not None:
                        cmd.req.emit(Update(finish="error", error=self.unavailable_error()))
                    else:
                        sched.submit(cmd.req)
                elif isinstance(cmd, _Cancel):
                    sched.cancel(cmd.rid)
                elif isinstance(cmd, _Call):
                    try:
                        cmd.done(cmd.fn(sched), None)
                    except Exception as exc:
                        cmd.done(None, exc)
                elif isinstance(cmd, _Stop):
                    drain_until = cmd.drain_until
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if drain_until is not None and (
                not sched.has_work() or time.monotonic() >= drain_until
            ):
                sched.fail_all(self.unavailable_error())
                self._flush()
                return
            stepped = False
            if sched.has_work():
                t_wait = time.perf_counter()
                with self._turns:
                    prof["turns_wait_s"] += time.perf_counter() - t_wait
                    stepped = sched.step()
                if not stepped:
                    time.sleep(0.005)  # waiting requests, none runnable yet
            # The load first: whoever hears that a request ended sees it gone from the load.
            load = EngineLoad(len(sched.waiting), len(sched.active))
            if load != self._load:
                self._load = load
            self._flush()
            if stepped:  # the whole iteration: commands, the step, the hand-off to the loop
                prof["loop_s"] += time.perf_counter() - t_iter


def _deliver(items: list[tuple[Callable[[Update], None], Update]]) -> None:
    """Event loop: pass one step's updates to their generations."""
    for callback, update in items:
        try:
            callback(update)
        except Exception:
            log.exception("could not deliver a local engine update")
