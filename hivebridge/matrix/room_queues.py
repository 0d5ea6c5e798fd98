"""Per-room ordered work: one consumer per room, rooms in parallel.

Events of one room must be handled in order (a join before the message that
follows it, a reply before the next turn), but a slow reply in one room must
never hold up another. Each room gets a queue and a consumer task that exits
when the room has been idle, so idle rooms cost nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("hivebridge.rooms")


class RoomQueues(Generic[T]):
    def __init__(
        self, handler: Callable[[str, T], Awaitable[None]], *, idle_timeout: float = 60.0
    ) -> None:
        self._handler = handler
        self._idle_timeout = idle_timeout
        self._queues: dict[str, asyncio.Queue[T]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closing = False

    def push(self, room_id: str, item: T) -> None:
        if self._closing:
            return
        queue = self._queues.get(room_id)
        if queue is None:
            queue = self._queues[room_id] = asyncio.Queue()
        queue.put_nowait(item)
        if room_id not in self._tasks:
            self._tasks[room_id] = asyncio.create_task(
                self._consume(room_id, queue), name=f"room:{room_id}"
            )

    @property
    def pending(self) -> int:
        return sum(q.qsize() for q in self._queues.values())

    async def _consume(self, room_id: str, queue: asyncio.Queue[T]) -> None:
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), self._idle_timeout)
                except TimeoutError:
                    return
                try:
                    await self._handler(room_id, item)
                except Exception:
                    log.exception("handling an event failed", extra={"room_id": room_id})
                finally:
                    queue.task_done()
        finally:
            self._tasks.pop(room_id, None)
            if queue.empty():
                self._queues.pop(room_id, None)
            elif not self._closing:  # something arrived as we timed out: keep going
                self._tasks[room_id] = asyncio.create_task(self._consume(room_id, queue))

    async def drain(self) -> None:
        """Wait until every queued item has been handled."""
        while self._queues:
            await asyncio.gather(*(q.join() for q in list(self._queues.values())))
            await asyncio.sleep(0)
            if all(q.empty() for q in self._queues.values()):
                return

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._queues.clear()
