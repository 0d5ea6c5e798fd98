"""One decode at a time across every loaded model: engines take turns on the cores.

Each loaded model has its own engine thread, context and scheduler; they share
the machine's cores through :class:`CoreTurns`, which an engine holds for one
scheduler step (one batched ``llama_decode`` and its sampling). Two steps
never run at once, so two models never oversubscribe the cores (on 2 cores two
concurrent 2-thread decodes collapsed from ~97 to ~26 tok/s), and the lock is
handed over in arrival order, so a busy model cannot starve another: with two
busy models the steps alternate.
"""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType


class CoreTurns:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[int] = deque()
        self._next = 0
        self._held = False

    def __enter__(self) -> CoreTurns:
        with self._cond:
            ticket = self._next
            self._next += 1
            self._queue.append(ticket)
            while self._held or self._queue[0] != ticket:
                self._cond.wait()
            self._queue.popleft()
            self._held = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """Engines waiting for their turn right now (for tests and the admin API)."""
        with self._cond:
            return len(self._queue)
