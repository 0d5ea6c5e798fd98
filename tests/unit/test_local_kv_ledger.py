"""KV cell accounting when sequences share cells through forks."""

from __future__ import annotations

from hivebridge.inference.local.kv_ledger import KvLedger


def test_fork_shares_cells() -> None:
    led = KvLedger()
    led.append(0, 1500)  # persona
    for room in range(1, 9):
        led.fork(0, room, 1500)
        led.append(room, 100)
    assert led.used() == 1500 + 8 * 100


def test_source_removed_fork_keeps_cells() -> None:
    led = KvLedger()
    led.append(0, 100)
    led.fork(0, 1, 60)
    led.remove(0)
    assert led.used() == 60
    led.append(1, 10)
    assert led.used() == 70 and led.length(1) == 70


def test_truncate_then_append_does_not_overlap_shared_tail() -> None:
    led = KvLedger()
    led.append(0, 100)
    led.fork(0, 1, 100)  # both own positions 0..99 through one segment
    led.truncate(0, 50)
    led.append(0, 20)  # new cells: seq 1 still holds the old 50..99
    assert led.used() == 100 + 20
    led.remove(1)
    assert led.used() == 70


def test_in_place_growth() -> None:
    led = KvLedger()
    for _ in range(10):
        led.append(3, 1)
    assert led.used() == 10
    led.truncate(3, 4)
    assert led.used() == 4
    led.remove(3)
    assert led.used() == 0
