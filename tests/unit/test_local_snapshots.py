"""Snapshot store: RAM/disk tiers, budgets, and refusing anything that does not match."""

from __future__ import annotations

from pathlib import Path

from hivebridge.inference.local.snapshots import SnapshotStore

FP = "fingerprint-a"


def store(tmp: Path | None, ram: int = 1 << 20, disk: int = 1 << 20, fp: str = FP) -> SnapshotStore:
    return SnapshotStore(fp, ram_bytes=ram, disk_dir=tmp, disk_bytes=disk)


def test_room_snapshot_round_trip_in_ram() -> None:
    s = store(None)
    s.put((1, 2, 3, 4), b"state-bytes", "room")
    key, n = s.match([1, 2, 3, 9])
    assert key is not None and n == 3
    assert s.take(key) == ((1, 2, 3, 4), b"state-bytes")
    assert s.match([1, 2, 3]) == (None, 0)  # a restored room leaves the store


def test_ram_budget_spills_oldest_to_disk(tmp_path: Path) -> None:
    s = store(tmp_path, ram=250)
    for i in range(3):
        s.put((i, i, i), bytes([i]) * 100, "room")
    s.flush()
    assert s.ram_used() <= 250
    assert len(list(tmp_path.glob("*.hbsq"))) >= 1
    key, n = s.match([0, 0, 0])
    assert key is not None and n == 3
    assert s.take(key) == ((0, 0, 0), b"\x00" * 100)
    s.close()


def test_personas_survive_a_restart_and_other_fingerprints_are_ignored(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.put((7, 8, 9), b"persona-kv", "persona")
    s.close()
    again = store(tmp_path)
    [entry] = again.personas()
    assert again.take(entry.key) == ((7, 8, 9), b"persona-kv")
    other = store(tmp_path, fp="another-model")
    assert other.personas() == [] and other.match([7, 8, 9]) == (None, 0)


def test_corrupt_file_falls_back_to_evaluation(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.put((5, 6), b"x" * 64, "persona")
    s.close()
    [path] = tmp_path.glob("*.hbsq")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    again = store(tmp_path)
    [entry] = again.personas()
    assert again.take(entry.key) is None  # hash mismatch: never restore wrong KV
    assert again.personas() == []


def test_disk_budget_evicts_least_recently_used(tmp_path: Path) -> None:
    s = store(tmp_path, disk=700)
    for i in range(5):
        s.put((i, 1), bytes(200), "persona")
        s.flush()
    assert s.disk_used() <= 700
    assert sum(p.stat().st_size for p in tmp_path.glob("*.hbsq")) <= 700
    keys = {e.tokens for e in s.personas()}
    assert (4, 1) in keys and (0, 1) not in keys
    s.close()
