"""Marks routed messages as handled in batches."""

from __future__ import annotations

import asyncio
import logging

from ..db.messages import MessageStore
from ..db.resilience import is_connection_lost

log = logging.getLogger("hivebridge.handler")

#: Pause before marking again after the database connection was lost.
RETRY_DELAY_S = 3.0


class HandledMarks:
    """One UPDATE per message would cost a database round trip each; marks are
    flushed together a moment later instead. A crash in that moment re-routes
    a few messages at start, which replies tolerate: they are sent with stable
    transaction ids and reply jobs refuse a second decision.
    """

    def __init__(self, messages: MessageStore, delay: float = 0.05) -> None:
        self.messages = messages
        self.delay = delay
        self._pending: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, event_id: str) -> None:
        self._pending.append(event_id)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._later())

    async def _later(self) -> None:
        await asyncio.sleep(self.delay)
        while True:
            try:
                await self.flush()
                return
            except Exception as e:
                if not is_connection_lost(e):
                    raise
                log.warning("could not mark messages handled (%s); again soon", type(e).__name__)
                await asyncio.sleep(max(self.delay, RETRY_DELAY_S))

    async def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self.messages.mark_handled_many(batch)
            except BaseException:
                self._pending[:0] = batch  # kept for the next flush (the UPDATE is idempotent)
                raise
