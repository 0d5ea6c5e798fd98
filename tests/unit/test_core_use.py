"""CoreUse reads other processes' CPU use on our cores from /proc."""

from __future__ import annotations

import os
from pathlib import Path

from hivebridge.inference.local.core_use import CoreUse

HZ = os.sysconf("SC_CLK_TCK")


def write_proc(root: Path, cpu0: int, cpu1: int, cpu2: int, own: int) -> None:
    """cpuN lines with ``busy`` ticks split over user/system/irq and a large idle."""

    def line(name: str, busy: int) -> str:
        user, system, irq = busy // 2, busy - busy // 2 - 1, 1
        return f"{name} {user} 0 {system} 99999 7 {irq} 0 0 0 0"

    (root / "self").mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text(
        "\n".join(
            [line("cpu", cpu0 + cpu1 + cpu2), line("cpu0", cpu0), line("cpu1", cpu1),
             line("cpu2", cpu2), "intr 1 2 3", "ctxt 5"]
        ) + "\n"
    )  # fmt: skip
    # comm may hold spaces and parentheses; utime and stime are fields 14 and 15.
    (root / "self" / "stat").write_text(
        f"42 (hive (bridge) x) R 1 1 1 0 -1 0 0 0 0 0 {own - own // 3} {own // 3} 0 0 20 0 3\n"
    )


def test_counts_only_other_processes_on_our_cpus(tmp_path: Path, monkeypatch) -> None:
    clock = iter([100.0, 101.0])
    monkeypatch.setattr("hivebridge.inference.local.core_use.time.monotonic", lambda: next(clock))
    write_proc(tmp_path, 1000, 1000, 1000, own=500)
    use = CoreUse(cpus=[0, 1], proc=tmp_path)
    # One second later: cpu0/cpu1 got 1.5 s busier, we used 0.5 s of it; cpu2 is not ours.
    write_proc(tmp_path, 1000 + HZ, 1000 + HZ // 2, 1000 + 10 * HZ, own=500 + HZ // 2)
    others = use.others()
    assert others is not None and abs(others - 1.0) < 0.05


def test_unknown_without_proc(tmp_path: Path) -> None:
    use = CoreUse(cpus=[0], proc=tmp_path / "missing")
    assert use.others() is None


def test_reads_this_machines_proc() -> None:
    use = CoreUse()
    sum(i * i for i in range(200_000))  # let some ticks pass
    others = use.others()
    assert others is not None and 0.0 <= others <= len(os.sched_getaffinity(0)) + 0.5
