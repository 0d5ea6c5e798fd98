"""Sequence snapshots in RAM and on disk: evicted rooms and persona prefixes.

A snapshot is ``llama_state_seq_get_data`` of one sequence (pure KV, ~23 KB
per token for SmolLM2) plus the exact tokens it holds. llama.cpp only checks
the architecture when restoring, so every snapshot carries the engine's
fingerprint (model file identity, KV-relevant context params, chat template
hash, llama-cpp-python version) and its token list; anything that does not
match exactly is ignored and the prompt is evaluated instead.

Disk writes run on a small writer thread so the decode loop never waits on I/O.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .prefix_trie import RadixTrie

log = logging.getLogger(__name__)

Kind = Literal["persona", "room"]
_MAGIC = b"HBSNAP1\n"
_SUFFIX = ".hbsq"


@dataclass(slots=True)
class SnapshotEntry:
    key: str
    kind: Kind
    tokens: tuple[int, ...]
    nbytes: int
    data: bytes | None  # resident copy (RAM tier, or waiting for its disk write)
    path: Path | None  # written file
    last_used: float


def _tokens_bytes(tokens: tuple[int, ...]) -> bytes:
    arr = array("i", tokens)
    if arr.itemsize != 4:  # pragma: no cover - exotic platforms
        raise RuntimeError("int is not 32-bit")
    return arr.tobytes()


class SnapshotStore:
    """Bounded RAM tier (rooms) + bounded disk tier (personas, spilled rooms), LRU each."""

    def __init__(
        self,
        fingerprint: str,
        *,
        ram_bytes: int,
        disk_dir: Path | None,
        disk_bytes: int,
    ) -> None:
        self.fingerprint = fingerprint
        self.ram_bytes = ram_bytes
        self.disk_dir = disk_dir
        self.disk_bytes = disk_bytes
        self._entries: dict[str, SnapshotEntry] = {}
        self._trie: RadixTrie[str] = RadixTrie()
        self._disk: dict[Path, tuple[int, float]] = {}  # every snapshot file: size, last use
        self._lock = threading.Lock()
        self._writer = (
            ThreadPoolExecutor(1, thread_name_prefix="hivebridge-snapshots") if disk_dir else None
        )
        if disk_dir is not None:
            disk_dir.mkdir(parents=True, exist_ok=True)
            self._load_index()

    # --- keys and index -------------------------------------------------------------

    def key_for(self, tokens: tuple[int, ...]) -> str:
        h = hashlib.sha256(self.fingerprint.encode())
        h.update(_tokens_bytes(tokens))
        return h.hexdigest()[:40]

    def _load_index(self) -> None:
        assert self.disk_dir is not None
        for path in self.disk_dir.glob(f"*{_SUFFIX}"):
            try:
                st = path.stat()
                self._disk[path] = (st.st_size, st.st_mtime)
                header, tokens = self._read_header(path)
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable snapshot %s: %s", path, exc)
                continue
            if header.get("fingerprint") != self.fingerprint:
                continue  # another model/config: kept for its owner, counted in the budget
            key = self.key_for(tokens)
            if path.stem != key:
                continue
            kind: Kind = "persona" if header.get("kind") == "persona" else "room"
            entry = SnapshotEntry(key, kind, tokens, int(header["nbytes"]), None, path, st.st_mtime)
            self._entries[key] = entry
            self._trie.insert(key, tokens)

    @staticmethod
    def _read_header(path: Path) -> tuple[dict[str, Any], tuple[int, ...]]:
        with path.open("rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise ValueError("bad magic")
            (hlen,) = struct.unpack("<I", f.read(4))
            header = json.loads(f.read(hlen))
            n = int(header["n_tokens"])
            arr = array("i")
            arr.frombytes(f.read(4 * n))
            if len(arr) != n:
                raise ValueError("truncated token list")
            return header, tuple(arr)

    # --- public API (engine thread) --------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, tokens: list[int]) -> tuple[str | None, int]:
        with self._lock:
            return self._trie.longest_prefix(tokens)

    def personas(self) -> list[SnapshotEntry]:
        with self._lock:
            found = [e for e in self._entries.values() if e.kind == "persona"]
        return sorted(found, key=lambda e: e.last_used, reverse=True)

    def has(self, tokens: tuple[int, ...], kind: Kind | None = None) -> bool:
        entry = self._entries.get(self.key_for(tokens))
        return entry is not None and (kind is None or entry.kind == kind)

    def put(self, tokens: tuple[int, ...], data: bytes, kind: Kind) -> None:
        """Keep a snapshot: personas go to disk (if configured), rooms to RAM first."""
        if kind == "persona" and self._writer is None:
            kind = "room"  # no disk: a persona snapshot is just a bounded RAM copy
        key = self.key_for(tokens)
        with self._lock:
            old = self._entries.get(key)
            if old is not None and old.kind == "persona":
                kind = "persona"
            entry = SnapshotEntry(key, kind, tokens, len(data), data, None, time.monotonic())
            if old is not None:
                entry.path = old.path
            self._entries[key] = entry
            self._trie.insert(key, tokens)
        if kind == "persona" and self._writer is not None:
            if entry.path is None:
                self._writer.submit(self._write, entry, True)
            else:
                entry.data = None
        self._enforce_ram()

    def take(self, key: str) -> tuple[tuple[int, ...], bytes] | None:
        """The snapshot's tokens and state, verified; None (and forgotten) if unusable."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.last_used = time.monotonic()
            data, path = entry.data, entry.path
        if data is None and path is not None:
            try:
                data = self._read_verified(path, entry.tokens)
                os.utime(path)
                self._disk[path] = (self._disk.get(path, (0, 0.0))[0], time.time())
            except (OSError, ValueError) as exc:
                log.warning("snapshot %s unusable, evaluating instead: %s", path, exc)
                self.discard(key, delete_file=True)
                return None
        if data is None:
            self.discard(key)
            return None
        if entry.kind == "room" and entry.data is not None:
            # A restored room lives in the KV again; it is re-snapshotted on the next eviction.
            self.discard(key, delete_file=False)
        return entry.tokens, data

    def discard(self, key: str, *, delete_file: bool = False) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            self._trie.remove(key)
        if entry is not None and delete_file and entry.path is not None:
            self._unlink(entry.path)

    def ram_used(self) -> int:
        with self._lock:
            return sum(
                e.nbytes for e in self._entries.values() if e.data is not None and e.kind == "room"
            )

    def disk_used(self) -> int:
        with self._lock:
            return sum(size for size, _ in self._disk.values())

    def flush(self) -> None:
        """Wait for pending disk writes (tests, shutdown)."""
        if self._writer is not None:
            self._writer.submit(lambda: None).result()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    # --- internals -------------------------------------------------------------------

    def _enforce_ram(self) -> None:
        with self._lock:
            rooms = sorted(
                (e for e in self._entries.values() if e.kind == "room" and e.data is not None),
                key=lambda e: e.last_used,
            )
            used = sum(e.nbytes for e in rooms)
            spill: list[SnapshotEntry] = []
            for entry in rooms:
                if used <= self.ram_bytes:
                    break
                used -= entry.nbytes
                if self._writer is not None and entry.path is None:
                    spill.append(entry)
                elif entry.path is not None:
                    entry.data = None
                else:
                    self._entries.pop(entry.key, None)
                    self._trie.remove(entry.key)
        for entry in spill:
            if self._writer is not None:
                self._writer.submit(self._write, entry, True)

    def _write(self, entry: SnapshotEntry, drop_ram: bool) -> None:
        """Writer thread: atomically write one snapshot file, then enforce the disk budget."""
        assert self.disk_dir is not None
        data = entry.data
        if data is None or entry.nbytes > self.disk_bytes:
            if data is not None and entry.kind == "room":
                self.discard(entry.key)
            return
        path = self.disk_dir / f"{entry.key}{_SUFFIX}"
        header = json.dumps(
            {
                "fingerprint": self.fingerprint,
                "kind": entry.kind,
                "n_tokens": len(entry.tokens),
                "nbytes": entry.nbytes,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        ).encode()
        tmp = path.with_suffix(".tmp")
        try:
            with tmp.open("wb") as f:
                f.write(_MAGIC)
                f.write(struct.pack("<I", len(header)))
                f.write(header)
                f.write(_tokens_bytes(entry.tokens))
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not write snapshot %s: %s", path, exc)
            self._unlink(tmp)
            return
        size = path.stat().st_size
        with self._lock:
            self._disk[path] = (size, time.time())
            entry.path = path
            if drop_ram:
                entry.data = None
        self._enforce_disk()

    def _enforce_disk(self) -> None:
        with self._lock:
            total = sum(size for size, _ in self._disk.values())
            victims: list[Path] = []
            for path, (size, _) in sorted(self._disk.items(), key=lambda kv: kv[1][1]):
                if total <= self.disk_bytes:
                    break
                total -= size
                victims.append(path)
            for path in victims:
                key = path.stem
                entry = self._entries.get(key)
                if entry is not None and entry.path == path:
                    if entry.data is None:
                        self._entries.pop(key, None)
                        self._trie.remove(key)
                    else:
                        entry.path = None
        for path in victims:
            self._unlink(path)

    def _unlink(self, path: Path) -> None:
        self._disk.pop(path, None)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not delete snapshot %s: %s", path, exc)

    def _read_verified(self, path: Path, tokens: tuple[int, ...]) -> bytes:
        with path.open("rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise ValueError("bad magic")
            (hlen,) = struct.unpack("<I", f.read(4))
            header = json.loads(f.read(hlen))
            if header.get("fingerprint") != self.fingerprint:
                raise ValueError("fingerprint mismatch")
            n = int(header["n_tokens"])
            arr = array("i")
            arr.frombytes(f.read(4 * n))
            if tuple(arr) != tokens:
                raise ValueError("token list mismatch")
            data = f.read(int(header["nbytes"]))
        if len(data) != int(header["nbytes"]) or hashlib.sha256(data).hexdigest() != header.get(
            "sha256"
        ):
            raise ValueError("state data corrupt")
        return data
