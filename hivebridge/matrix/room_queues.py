"""Per-room ordered work: one consumer per room, rooms in parallel.

Events of one room must be handled in order (a join before the message that
follows it, a reply before the next turn), but a slow reply in one room must
never hold up another. Each room gets a queue and a consumer task that exits
when the room has been idle, so idle rooms cost nothing.

A room's queue holds at most ``max_per_room`` items: a flood while the room
is busy (a slow reply) drops its oldest *droppable* items (messages, which
stay stored; membership and the like are never dropped) and says so through
``on_drop``, so memory stays bounded however fast a room is flooded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: Items one room may have waiting; beyond it the oldest droppable ones go.
MAX_QUEUED_PER_ROOM = 1000

log = logging.getLogger("hivebridge.rooms")


@dataclass(frozen=True, slots=True)
class WindDown:
    """What a wind-down found: items being handled, those of them still running when
    the grace ran out (cancelled by :meth:`RoomQueues.close`), and items never started."""

    in_flight: int
    cut: int
    queued: int

    @property
    def finished(self) -> int:
        return self.in_flight - self.cut


class RoomQueues(Generic[T]):
    def __init__(
        self,
        handler: Callable[[str, T], Awaitable[None]],
        *,
        idle_timeout: float = 60.0,
        max_per_room: int = MAX_QUEUED_PER_ROOM,
        droppable: Callable[[T], bool] = lambda _: False,
        on_drop: Callable[[str, T], None] = lambda _room, _item: None,
    ) -> None:
        self._handler = handler
        self._idle_timeout = idle_timeout
        self.max_per_room = max_per_room
        self._droppable = droppable
        self._on_drop = on_drop
        self._queues: dict[str, asyncio.Queue[T]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._busy: set[str] = set()  # rooms whose consumer is handling an item now
        self._closing = False
        self._winding_down = False

    def push(self, room_id: str, item: T) -> None:
        if self._closing:
            return
        queue = self._queues.get(room_id)
        if queue is None:
            queue = self._queues[room_id] = asyncio.Queue()
        if queue.qsize() >= self.max_per_room:
            self._drop_oldest(room_id, queue)
        queue.put_nowait(item)
        if room_id not in self._tasks:
            self._tasks[room_id] = asyncio.create_task(
                self._consume(room_id, queue), name=f"room:{room_id}"
            )

    def _drop_oldest(self, room_id: str, queue: asyncio.Queue[T]) -> None:
        """Take out the oldest droppable item, keeping the others in order."""
        items = [queue.get_nowait() for _ in range(queue.qsize())]
        for _ in items:
            queue.task_done()
        index = next((i for i, it in enumerate(items) if self._droppable(it)), None)
        if index is not None:
            self._on_drop(room_id, items.pop(index))
        for kept in items:
            queue.put_nowait(kept)

    def waiting(self, room_id: str) -> int:
        queue = self._queues.get(room_id)
        return queue.qsize() if queue is not None else 0

    @property
    def pending(self) -> int:
        return sum(q.qsize() for q in self._queues.values())

    async def _consume(self, room_id: str, queue: asyncio.Queue[T]) -> None:
        try:
            while not self._winding_down:
                try:
                    item = await asyncio.wait_for(queue.get(), self._idle_timeout)
                except TimeoutError:
                    return
                self._busy.add(room_id)
                try:
                    await self._handler(room_id, item)
                except Exception:
                    log.exception("handling an event failed", extra={"room_id": room_id})
                finally:
                    self._busy.discard(room_id)
                    queue.task_done()
        finally:
            self._tasks.pop(room_id, None)
            if queue.empty():
                self._queues.pop(room_id, None)
            elif not (self._closing or self._winding_down):  # arrived as we timed out
                self._tasks[room_id] = asyncio.create_task(self._consume(room_id, queue))

    async def drain(self) -> None:
        """Wait until every queued item has been handled."""
        while self._queues:
            await asyncio.gather(*(q.join() for q in list(self._queues.values())))
            await asyncio.sleep(0)
            if all(q.empty() for q in self._queues.values()):
                return

    async def wind_down(self, grace_s: float, hurry: asyncio.Event | None = None) -> WindDown:
        """Stop taking work: what is being handled gets up to ``grace_s`` seconds (or
        until ``hurry`` is set) to finish, then it is cancelled; nothing queued starts.

        Call :meth:`close` afterwards. What was queued or cut short stays with the
        caller's own records (the handler resumes stored work at the next start).
        """
        self._winding_down = True
        in_flight = {room: self._tasks[room] for room in self._busy if room in self._tasks}
        for room, task in list(self._tasks.items()):
            if room not in in_flight:
                task.cancel()  # waiting for work that will not come
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        pending: set[asyncio.Future[Any]] = set(in_flight.values())
        hurried = asyncio.ensure_future(hurry.wait()) if hurry is not None else None
        try:
            while pending and not (hurried is not None and hurried.done()):
                left = deadline - loop.time()
                if left <= 0:
                    break
                waiters = pending | ({hurried} if hurried is not None else set())
                done, _ = await asyncio.wait(
                    waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                pending -= done
        finally:
            if hurried is not None:
                hurried.cancel()
        cut = len(pending)
        queued = self.pending
        return WindDown(in_flight=len(in_flight), cut=cut, queued=queued)

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._queues.clear()
