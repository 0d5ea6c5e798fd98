"""A minimal local backend: one high-level ``Llama`` behind one worker thread.

Requests run one at a time on a dedicated thread, so the event loop never
blocks and the ``Llama`` object (not thread-safe) is only touched by that
thread. It is the fallback when the batching engine is not available.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from .types import (
    BackendUnavailable,
    ChatMessage,
    GenerationStats,
    InferenceError,
    SamplingParams,
)

_DONE = object()


def default_threads() -> int:
    """One thread per usable core, never more: oversubscribing collapses decode speed."""
    return max(1, len(os.sched_getaffinity(0)))


class SerialGeneration:
    """One queued request of :class:`SerialLlamaBackend`."""

    def __init__(
        self, backend: SerialLlamaBackend, messages: Sequence[ChatMessage], params: SamplingParams
    ) -> None:
        self.stats = GenerationStats(model=backend.model_name, backend=backend.name)
        self._backend = backend
        self._messages = list(messages)
        self._params = params
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._cancel = threading.Event()
        self._started = False

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        if not self._started:
            self._started = True
            self._backend._submit(self)
        while True:
            item = await self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            self.stats.mark_first_token()
            yield item

    async def aclose(self) -> None:
        self._cancel.set()

    # Runs on the worker thread.
    def _run(self, llm: Any, loop: asyncio.AbstractEventLoop) -> None:
        put = loop.call_soon_threadsafe
        try:
            stream = llm.create_chat_completion(
                messages=[{"role": m.role, "content": m.content} for m in self._messages],
                max_tokens=self._params.max_tokens,
                temperature=self._params.temperature,
                top_p=self._params.top_p,
                top_k=self._params.top_k,
                min_p=self._params.min_p,
                repeat_penalty=self._params.repeat_penalty,
                seed=self._params.seed,
                stop=list(self._params.stop) or None,
                stream=True,
            )
            reason = "stop"
            for chunk in stream:
                if self._cancel.is_set():
                    reason = "cancelled"
                    break
                choice = chunk["choices"][0]
                piece = choice["delta"].get("content")
                if piece:
                    self.stats.completion_tokens += 1
                    put(self._queue.put_nowait, piece)
                if choice.get("finish_reason") == "length":
                    reason = "length"
            self.stats.finish(reason)  # type: ignore[arg-type]
        except Exception as e:  # reported to the awaiting coroutine, not lost on the thread
            self.stats.finish("error")
            put(self._queue.put_nowait, InferenceError(f"local model failed: {e}"))
        put(self._queue.put_nowait, _DONE)


class SerialLlamaBackend:
    """Implements :class:`~hivebridge.inference.types.Backend` for one GGUF file."""

    def __init__(self, model_path: Path, *, n_ctx: int = 4096, threads: int = 0) -> None:
        self.model_path = model_path
        self.model_name = model_path.name.removesuffix(".gguf")
        self.name = f"local:{self.model_name}"
        self._n_ctx = n_ctx
        self._threads = threads or default_threads()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llama")
        self._llm: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._llm = await self._loop.run_in_executor(self._executor, self._load)

    def _load(self) -> Any:
        from llama_cpp import Llama

        return Llama(
            model_path=str(self.model_path),
            n_ctx=self._n_ctx,
            n_threads=self._threads,
            n_threads_batch=self._threads,
            verbose=False,
        )

    def generate(
        self, messages: Sequence[ChatMessage], params: SamplingParams, *, session: str | None = None
    ) -> SerialGeneration:
        if self._llm is None:
            raise BackendUnavailable(f"model {self.model_name} is not loaded")
        return SerialGeneration(self, messages, params)

    def _submit(self, gen: SerialGeneration) -> None:
        assert self._loop is not None
        self._executor.submit(gen._run, self._llm, self._loop)

    def count_tokens(self, text: str) -> int:
        if self._llm is None:
            return len(text) // 4 + 1
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    async def stop(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._llm = None
