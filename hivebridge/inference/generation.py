"""The plumbing every streamed generation shares: iterate once, close once, always finish.

A subclass writes :meth:`StreamingGeneration._stream` (an async generator of
text pieces that fills ``stats``) and, when it holds something (a connection,
an inner generation), :meth:`_release`. The base makes sure that however the
stream ends (exhausted, failed, cancelled, or closed by the caller) ``stats``
gets a finish reason and ``_release`` runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable

from .types import GenerationStats, ToolCall


class StreamingGeneration:
    def __init__(self, stats: GenerationStats) -> None:
        self.stats = stats
        #: Set by the end of a request with tools when the model called some; the
        #: streamed text is then what it said before them, and ``tool_note`` any
        #: words that came with the calls without being streamed.
        self.tool_calls: list[ToolCall] = []
        self.tool_note = ""
        self._closed = False
        self._iter = self._run()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iter

    def __anext__(self) -> Awaitable[str]:
        return self._iter.__anext__()

    async def aclose(self) -> None:
        """Cancel the request and free what it holds; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self._iter.aclose()
        await self._release()
        if self.stats.finish_reason is None:
            self.stats.finish("cancelled")

    def _stream(self) -> AsyncGenerator[str, None]:
        raise NotImplementedError

    async def _release(self) -> None:
        """Free what the request holds; called at the end and on close, maybe twice."""

    def _failed(self, exc: BaseException) -> None:
        """The stream raised ``exc`` (not a cancellation); ``stats`` says "error" already."""

    async def _run(self) -> AsyncGenerator[str, None]:
        stream = self._stream()
        try:
            async for piece in stream:
                yield piece
        except (GeneratorExit, asyncio.CancelledError):
            if self.stats.finish_reason is None:
                self.stats.finish("cancelled")
            raise
        except BaseException as exc:
            if self.stats.finish_reason is None:
                self.stats.finish("error")
            self._failed(exc)
            raise
        finally:
            await stream.aclose()
            await self._release()
