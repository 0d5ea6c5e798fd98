"""Sequence snapshots in RAM and on disk: evicted rooms and persona prefixes.

A snapshot is ``llama_state_seq_get_data`` of one sequence (pure KV, ~23 KB
per token for SmolLM2) plus the exact tokens it holds. llama.cpp only checks
the architecture when restoring, so every snapshot carries the engine's
fingerprint (model file identity, KV-relevant context params, chat template
hash, llama-cpp-python version) and its token list; anything that does not
match exactly is ignored and the prompt is evaluated instead.

Disk writes run on a small writer thread so the decode loop never waits on I/O;
each file is written 0600, fsynced and then renamed into place. Every read is
validated (sizes, header fields, hash): a truncated or malformed file is moved
aside as ``*.bad`` with one warning and the prompt is evaluated instead, so a
bad file can neither stop the engine from starting nor kill its thread.
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
from typing import Any, BinaryIO, Literal

from .prefix_trie import RadixTrie

log = logging.getLogger(__name__)

Kind = Literal["persona", "room"]
_MAGIC = b"HBSNAP1\n"
_SUFFIX = ".hbsq"
_BAD_SUFFIX = ".bad"
_MAX_HEADER = 64 * 1024


class SnapshotCorrupt(ValueError):
    """A snapshot file that cannot be trusted (truncated, malformed, or mismatched)."""


@dataclass(slots=True)
class SnapshotEntry:
    key: str
    kind: Kind
    tokens: tuple[int, ...]
    nbytes: int
    data: bytes | None  # resident copy (RAM tier, or waiting for its disk write)
    path: Path | None  # written file
    last_used: float
    session: str | None = None  # a room's snapshot: whose conversation it holds


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
            disk_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
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
                with path.open("rb") as f:
                    header, tokens = _read_header(f, st.st_size)
            except OSError as exc:
                log.warning("ignoring unreadable snapshot %s: %s", path, exc)
                continue
            except SnapshotCorrupt as exc:
                self._move_aside(path, exc)
                continue
            self._disk[path] = (st.st_size, st.st_mtime)
            if header["fingerprint"] != self.fingerprint:
                continue  # another model/config: kept for its owner, counted in the budget
            key = self.key_for(tokens)
            if path.stem != key:
                continue
            kind: Kind = "persona" if header["kind"] == "persona" else "room"
            session = header.get("session")
            entry = SnapshotEntry(
                key,
                kind,
                tokens,
                header["nbytes"],
                None,
                path,
                st.st_mtime,
                session if isinstance(session, str) else None,
            )
            self._entries[key] = entry
            self._trie.insert(key, tokens)

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

    def put(
        self, tokens: tuple[int, ...], data: bytes, kind: Kind, session: str | None = None
    ) -> None:
        """Keep a snapshot: personas go to disk (if configured), rooms to RAM first.

        ``session``: the conversation a room snapshot holds (see :meth:`discard_sessions`).
        """
        if kind == "persona" and self._writer is None:
            kind = "room"  # no disk: a persona snapshot is just a bounded RAM copy
        key = self.key_for(tokens)
        with self._lock:
            old = self._entries.get(key)
            if old is not None and old.kind == "persona":
                kind = "persona"
            entry = SnapshotEntry(
                key,
                kind,
                tokens,
                len(data),
                data,
                None,
                time.monotonic(),
                session if kind == "room" else None,
            )
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
            except SnapshotCorrupt as exc:
                self.discard(key)
                self._move_aside(path, exc)
                return None
            except OSError as exc:
                log.warning("snapshot %s unreadable, evaluating instead: %s", path, exc)
                self.discard(key)
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

    def discard_sessions(self, prefix: str) -> int:
        """Forget (and delete the files of) every room snapshot of sessions starting with
        ``prefix``: a message they hold was redacted. Returns how many went."""
        with self._lock:
            keys = [
                k
                for k, e in self._entries.items()
                if e.session is not None and e.session.startswith(prefix)
            ]
        for key in keys:
            self.discard(key, delete_file=True)
        return len(keys)

    def ram_used(self) -> int:
        with self._lock:
            return sum(
                e.nbytes for e in self._entries.values() if e.data is not None and e.kind == "room"
            )

    def disk_used(self) -> int:
        with self._lock:
            return sum(size for size, _ in self._disk.values())

    def persist_rooms(self) -> int:
        """Write every room kept only in RAM to disk (at shutdown); how many were queued.

        A restart then restores rooms from disk in milliseconds instead of
        re-evaluating their history. The caller waits with :meth:`flush`.
        """
        if self._writer is None:
            return 0
        with self._lock:
            pending = [
                e for e in self._entries.values()
                if e.kind == "room" and e.path is None and e.data is not None
            ]  # fmt: skip
        for entry in sorted(pending, key=lambda e: e.last_used, reverse=True):
            self._writer.submit(self._write, entry, True)
        return len(pending)

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
        fields: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "kind": entry.kind,
            "n_tokens": len(entry.tokens),
            "nbytes": entry.nbytes,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        if entry.session is not None:
            fields["session"] = entry.session
        header = json.dumps(fields).encode()
        tmp = path.with_suffix(".tmp")
        try:
            # Created 0600 (KV holds the conversation), durable before it takes the name.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(_MAGIC)
                f.write(struct.pack("<I", len(header)))
                f.write(header)
                f.write(_tokens_bytes(entry.tokens))
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
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

    def _move_aside(self, path: Path, why: Exception) -> None:
        """Rename a bad file to ``*.bad`` (kept for inspection, out of the budget), warn once."""
        self._disk.pop(path, None)
        bad = path.with_name(path.name + _BAD_SUFFIX)
        try:
            os.replace(path, bad)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning(
                "snapshot %s is corrupt (%s) and could not be moved aside: %s", path, why, exc
            )
            return
        log.warning("snapshot %s is corrupt (%s); moved to %s, evaluating instead", path, why, bad)

    def _read_verified(self, path: Path, tokens: tuple[int, ...]) -> bytes:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            header, found = _read_header(f, size)
            if header["fingerprint"] != self.fingerprint:
                raise SnapshotCorrupt("fingerprint mismatch")
            if found != tokens:
                raise SnapshotCorrupt("token list mismatch")
            data = f.read(header["nbytes"])
        if len(data) != header["nbytes"] or hashlib.sha256(data).hexdigest() != header["sha256"]:
            raise SnapshotCorrupt("state data corrupt")
        return data


def _read_header(f: BinaryIO, size: int) -> tuple[dict[str, Any], tuple[int, ...]]:
    """Parse and check magic, header and token list; the file must hold exactly what it says."""
    if f.read(len(_MAGIC)) != _MAGIC:
        raise SnapshotCorrupt("bad magic")
    raw = f.read(4)
    if len(raw) != 4:
        raise SnapshotCorrupt("truncated header length")
    (hlen,) = struct.unpack("<I", raw)
    if hlen > _MAX_HEADER:
        raise SnapshotCorrupt(f"header length {hlen} out of range")
    blob = f.read(hlen)
    if len(blob) != hlen:
        raise SnapshotCorrupt("truncated header")
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SnapshotCorrupt(f"malformed header: {exc}") from None
    if not isinstance(header, dict):
        raise SnapshotCorrupt("header is not an object")
    for field, kind in (
        ("fingerprint", str),
        ("kind", str),
        ("n_tokens", int),
        ("nbytes", int),
        ("sha256", str),
    ):
        value = header.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SnapshotCorrupt(f"header field {field!r} missing or malformed")
    n, nbytes = header["n_tokens"], header["nbytes"]
    if n < 0 or nbytes < 0 or len(_MAGIC) + 4 + hlen + 4 * n + nbytes != size:
        raise SnapshotCorrupt(f"size {size} does not match the header")
    arr = array("i")
    arr.frombytes(f.read(4 * n))
    if len(arr) != n:
        raise SnapshotCorrupt("truncated token list")
    return header, tuple(arr)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; some filesystems refuse to open directories (ignored)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
