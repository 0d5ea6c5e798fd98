"""Sequence ids of the one context: who holds which tokens in the KV pool.

States: FREE (no cells), PINNED (a persona prefix, fork source only), IDLE (a
finished room/request; reusable in place by its session or as a fork source;
evictable LRU), BUSY (a running request). ``tokens`` is always exactly what
the KV holds for the sequence: prompt tokens as evaluated and generated tokens
as sampled and decoded, never a re-tokenization.
"""

from __future__ import annotations

import ctypes
import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import llama_cpp as L

from .kv_ledger import KvLedger
from .model import LoadedModel
from .prefix_trie import RadixTrie


class SeqState(enum.Enum):
    FREE = "free"
    PINNED = "pinned"
    IDLE = "idle"
    BUSY = "busy"


@dataclass(eq=False, slots=True)
class Seq:
    id: int
    state: SeqState = SeqState.FREE
    tokens: list[int] = field(default_factory=list)
    session: str | None = None
    last_used: float = 0.0


class SequencePool:
    """Sequence bookkeeping plus the KV operations that change it (engine thread only)."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.seqs = [Seq(i) for i in range(model.n_seq_max)]
        self.free: list[int] = list(range(model.n_seq_max - 1, -1, -1))
        self.trie: RadixTrie[int] = RadixTrie()  # IDLE and PINNED sequences
        self.sessions: dict[str, int] = {}  # session -> its IDLE sequence
        self.personas: dict[tuple[int, ...], int] = {}  # prefix tokens -> PINNED sequence
        self.ledger = KvLedger()

    # --- queries ---------------------------------------------------------------------

    def count(self, state: SeqState) -> int:
        return sum(1 for s in self.seqs if s.state is state)

    def lru(self, state: SeqState, protect: Iterable[int] = ()) -> Seq | None:
        guarded = set(protect)
        found = [s for s in self.seqs if s.state is state and s.id not in guarded]
        return min(found, key=lambda s: s.last_used) if found else None

    def kv_used(self) -> int:
        return self.ledger.used()

    # --- transitions -----------------------------------------------------------------

    def take_free(self, *, high: bool = False) -> Seq | None:
        """The lowest free id (running requests), or the highest (``high``: pinned prefixes).

        Partitioned KV batches only consecutive sequence ids into one ubatch, so
        running requests are packed low and long-lived pins kept out of their way.
        """
        if not self.free:
            return None
        sid = max(self.free) if high else min(self.free)
        self.free.remove(sid)
        seq = self.seqs[sid]
        seq.state = SeqState.BUSY
        return seq

    def detach(self, seq: Seq) -> None:
        """Remove an IDLE/PINNED sequence from the indexes (its KV stays)."""
        self.trie.remove(seq.id)
        if seq.session is not None and self.sessions.get(seq.session) == seq.id:
            del self.sessions[seq.session]
        seq.session = None
        for key, sid in list(self.personas.items()):
            if sid == seq.id:
                del self.personas[key]

    def clear(self, seq: Seq) -> None:
        """Drop every cell of ``seq`` and return it to the free list."""
        self.detach(seq)
        L.llama_memory_seq_rm(self.model.mem, seq.id, -1, -1)
        self.ledger.remove(seq.id)
        seq.tokens = []
        if seq.state is not SeqState.FREE:
            seq.state = SeqState.FREE
            self.free.append(seq.id)

    def truncate(self, seq: Seq, keep: int) -> bool:
        if keep >= len(seq.tokens):
            return True
        if not L.llama_memory_seq_rm(self.model.mem, seq.id, keep, -1):
            return False
        del seq.tokens[keep:]
        self.ledger.truncate(seq.id, keep)
        return True

    def fork(self, src: Seq, dst: Seq, keep: int) -> None:
        """``dst`` (empty) gets ``src``'s first ``keep`` positions.

        Unified KV: metadata only, the cells are shared. Partitioned KV: llama.cpp
        can only copy whole streams, lazily at the next decode, so the state is
        copied now through get/set_data (~23 KB per token, milliseconds) and cut.
        """
        if self.model.kv_unified:
            L.llama_memory_seq_cp(self.model.mem, src.id, dst.id, 0, keep)
            dst.tokens = src.tokens[:keep]
            self.ledger.fork(src.id, dst.id, keep)
            return
        if not self.load_state(dst, tuple(src.tokens), self.state_bytes(src)):
            raise RuntimeError(f"could not copy sequence {src.id} to {dst.id}")
        if not self.truncate(dst, keep):
            raise RuntimeError(f"could not truncate sequence {dst.id}")

    def swap(self, a: Seq, b: Seq) -> None:
        """Exchange the KV and bookkeeping of ``a`` and ``b`` (either may be FREE).

        Partitioned KV only: llama.cpp batches consecutive sequence ids into one
        ubatch, so running sequences are moved next to each other. The state is
        copied now through get/set_data (~23 KB per token, milliseconds), never
        with a lazy whole-stream ``seq_cp``. A sequence whose restore fails is
        left FREE (the caller fails the request that owned it).
        """
        if a is b:
            return
        blobs = [self.state_bytes(s) if s.tokens else b"" for s in (a, b)]
        metas = [(s.state, s.tokens, s.session, s.last_used) for s in (a, b)]
        for s in (a, b):
            self.detach(s)
            L.llama_memory_seq_rm(self.model.mem, s.id, -1, -1)
            self.ledger.remove(s.id)
            s.tokens = []
        for dst, blob, (state, tokens, session, last_used) in zip(
            (a, b), reversed(blobs), reversed(metas), strict=True
        ):
            if tokens and not self.load_state(dst, tuple(tokens), blob):
                state, tokens, session = SeqState.FREE, [], None
            dst.state, dst.tokens, dst.session, dst.last_used = (
                state,
                list(tokens),
                session,
                last_used,
            )
        for s in (a, b):
            self._reindex(s)

    def _reindex(self, seq: Seq) -> None:
        """Put ``seq`` back into the free list or the indexes its state calls for."""
        if seq.state is SeqState.FREE:
            if seq.id not in self.free:
                self.free.append(seq.id)
            seq.session = None
            return
        if seq.id in self.free:
            self.free.remove(seq.id)
        if seq.state is SeqState.IDLE:
            if seq.session is not None:
                self.sessions[seq.session] = seq.id
            self.trie.insert(seq.id, seq.tokens)
        elif seq.state is SeqState.PINNED:
            self.personas[tuple(seq.tokens)] = seq.id
            self.trie.insert(seq.id, seq.tokens)

    def park(self, seq: Seq, session: str | None) -> None:
        """A finished request's sequence becomes IDLE and reusable."""
        seq.state = SeqState.IDLE
        seq.last_used = time.monotonic()
        if session is not None:
            old = self.sessions.get(session)
            if old is not None and old != seq.id:
                self.seqs[old].session = None  # stays as an anonymous, evictable cache entry
            self.sessions[session] = seq.id
        seq.session = session
        self.trie.insert(seq.id, seq.tokens)

    def pin(self, seq: Seq) -> None:
        seq.state = SeqState.PINNED
        seq.last_used = time.monotonic()
        seq.session = None
        self.personas[tuple(seq.tokens)] = seq.id
        self.trie.insert(seq.id, seq.tokens)

    # --- state blobs -----------------------------------------------------------------

    def state_bytes(self, seq: Seq) -> bytes:
        ctx = self.model.ctx
        size = int(L.llama_state_seq_get_size(ctx, seq.id))
        buf = (ctypes.c_uint8 * size)()
        n = int(L.llama_state_seq_get_data(ctx, buf, size, seq.id))
        return ctypes.string_at(buf, n)

    def load_state(self, seq: Seq, tokens: tuple[int, ...], data: bytes) -> bool:
        """Restore a snapshot into empty ``seq``; False (and ``seq`` left empty) on any doubt."""
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        ok = int(L.llama_state_seq_set_data(self.model.ctx, buf, len(data), seq.id)) > 0
        if ok:
            pos_max = int(L.llama_memory_seq_pos_max(self.model.mem, seq.id))
            ok = pos_max == len(tokens) - 1
        if not ok:
            L.llama_memory_seq_rm(self.model.mem, seq.id, -1, -1)
            return False
        seq.tokens = list(tokens)
        self.ledger.remove(seq.id)
        self.ledger.append(seq.id, len(tokens))
        return True
