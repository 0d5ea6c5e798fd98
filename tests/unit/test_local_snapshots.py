"""Snapshot store: RAM/disk tiers, budgets, and refusing anything that does not match."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

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


def _persona_file(tmp_path: Path, tokens: tuple[int, ...] = (5, 6, 7)) -> Path:
    s = store(tmp_path)
    s.put(tokens, b"kv" * 40, "persona")
    s.close()
    [path] = tmp_path.glob("*.hbsq")
    return path


def _damaged_variants(good: bytes) -> list[bytes]:
    """Every truncation, plus garbage and well-formed-but-wrong headers."""
    magic = b"HBSNAP1\n"
    variants = [good[:n] for n in range(len(good))]
    variants += [b"\xff" * 300, magic + b"\xff\xff\xff\xff" + b"x" * 40]
    for header in (
        b"[1, 2]",
        b"{}",
        b'{"fingerprint": "fingerprint-a", "kind": "persona"}',
        b'{"fingerprint": "fingerprint-a", "kind": "persona", "n_tokens": "3",'
        b' "nbytes": 80, "sha256": "x"}',
        b'{"fingerprint": null, "kind": 1, "n_tokens": 3, "nbytes": 80, "sha256": "x"}',
        b'{"fingerprint": "fingerprint-a", "kind": "persona", "n_tokens": -1,'
        b' "nbytes": 80, "sha256": "x"}',
        b"\xc3\x28 not utf-8",
        b"[" * 5000,
    ):
        variants.append(magic + len(header).to_bytes(4, "little") + header + b"\x00" * 92)
    return variants


def test_damaged_files_are_moved_aside_at_start(tmp_path: Path, caplog: Any) -> None:
    good = _persona_file(tmp_path).read_bytes()
    for i, blob in enumerate(_damaged_variants(good)):
        d = tmp_path / f"v{i}"
        d.mkdir()
        (d / "0123.hbsq").write_bytes(blob)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            s = store(d)  # raised struct.error / KeyError / TypeError before
        assert s.personas() == [] and s.match([5, 6, 7]) == (None, 0)
        assert not (d / "0123.hbsq").exists(), i
        assert (d / "0123.hbsq.bad").read_bytes() == blob
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        assert s.disk_used() == 0  # a file moved aside is out of the budget
        s.close()


def test_file_damaged_after_start_is_moved_aside_by_take(tmp_path: Path) -> None:
    path = _persona_file(tmp_path)
    good = path.read_bytes()
    for blob in _damaged_variants(good):
        path.write_bytes(good)
        for bad in tmp_path.glob("*.bad"):
            bad.unlink()
        s = store(tmp_path)
        [entry] = s.personas()
        path.write_bytes(blob)
        assert s.take(entry.key) is None  # the engine thread must not die here
        assert s.personas() == []
        assert not path.exists() and path.with_name(path.name + ".bad").exists()
        s.close()


def test_snapshot_files_are_private_and_fsynced(tmp_path: Path, monkeypatch: Any) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    replaced: list[bool] = []

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        replaced.append(bool(synced))  # was anything fsynced before the rename?
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    old = os.umask(0o022)
    try:
        path = _persona_file(tmp_path / "snap")
    finally:
        os.umask(old)
    assert replaced == [True]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_rooms_snapshots_are_forgotten_in_ram_and_on_disk(tmp_path: Path) -> None:
    """A redaction: nothing of the room's conversation may stay, not even as KV."""
    s = store(tmp_path, ram=150)
    s.put((1, 2, 3), b"a" * 100, "room", session="!r1:x|@p:x")
    s.put((4, 5, 6), b"b" * 100, "room", session="!r2:x|@p:x")  # spills r1 to disk
    s.put((7, 8, 9), b"c" * 100, "persona")
    s.flush()
    s.close()
    again = store(tmp_path, ram=150)  # the spilled file remembers whose it is
    assert again.match([1, 2, 3])[1] == 3
    again.put((1, 2, 3, 4), b"d" * 10, "room", session="!r1:x|summary")
    assert again.discard_sessions("!r1:x|") == 2
    assert again.match([1, 2, 3, 4]) == (None, 0)
    assert len(again.personas()) == 1
    again.flush()
    assert len(list(tmp_path.glob("*.hbsq"))) == 1  # the persona prefix only
