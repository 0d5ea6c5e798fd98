"""How much of this process's cores other processes use, read from Linux's /proc.

The thread tuner probes one-thread decoding only when someone else competes for
the cores: on a calm box every probe is pure loss (a one-thread window costs
~1.7x per token on two cores), and the box's own counters say whether it is
calm, so there is no need to find out the slow way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

# /proc/stat per-CPU columns: user nice system idle iowait irq softirq steal guest guest_nice.
# Busy = everything but idle and iowait (guest time is already inside user); steal counts:
# a hypervisor that takes the core competes for it as much as a process does.
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


class CoreUse:
    """CPU time other processes spent on ``cpus`` between two calls of :meth:`others`."""

    def __init__(self, cpus: Iterable[int] | None = None, proc: Path = Path("/proc")) -> None:
        self._cpus = {f"cpu{c}" for c in (cpus if cpus is not None else _usable_cpus())}
        self._proc = proc
        self._hz = _clock_ticks()
        self._last = self._read()

    def others(self) -> float | None:
        """Cores' worth of CPU other processes used since the last call; None if unknown."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None:
            return None
        wall = now[0] - last[0]
        if wall <= 0:
            return None
        busy = now[1] - last[1]
        own = now[2] - last[2]
        return max(0.0, (busy - own) / self._hz / wall)

    def _read(self) -> tuple[float, int, int] | None:
        """(monotonic seconds, busy ticks on our cpus, this process's ticks)."""
        try:
            stat = (self._proc / "stat").read_text()
            mine = (self._proc / "self" / "stat").read_text()
            busy = 0
            for line in stat.splitlines():
                name, _, rest = line.partition(" ")
                if name in self._cpus:
                    cols = rest.split()
                    busy += sum(int(cols[i]) for i in _BUSY_COLUMNS if i < len(cols))
            # Fields after the ")" that closes comm: utime and stime are the 12th and 13th.
            fields = mine[mine.rindex(")") + 2 :].split()
            own = int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            return None
        return time.monotonic(), busy, own


def _usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def _clock_ticks() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK")) or 100
    except (AttributeError, ValueError, OSError):
        return 100
