"""Admission: which sequence a request runs on, and what it reuses there.

The longest cached prefix wins: the room's own sequence truncated in place, a
fork of a pinned persona or another idle sequence, or a snapshot restored from
RAM/disk; only the suffix is evaluated. Admission also evicts (snapshotting
what is worth keeping), pins persona prefixes and, under partitioned KV, keeps
running sequences on consecutive ids (placement.py). Engine thread only.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from hivebridge.inference.types import FinishReason, InferenceError

from .model import LoadedModel
from .placement import compaction_moves
from .request import Phase, Request
from .sampler import Detokenizer, SamplerChain, StopMatcher
from .sequences import Seq, SeqState, SequencePool
from .settings import EngineSettings
from .snapshots import Kind, SnapshotStore

log = logging.getLogger(__name__)

Finish = Callable[[Request, FinishReason, Exception | None], None]


class Admission:
    """Moves requests from ``waiting`` to ``active``, shared with the Scheduler."""

    def __init__(
        self,
        model: LoadedModel,
        settings: EngineSettings,
        store: SnapshotStore | None,
        pool: SequencePool,
        waiting: deque[Request],
        active: list[Request],
        counters: dict[str, int],
        finish: Finish,
    ) -> None:
        self.model = model
        self.settings = settings
        self.store = store
        self.pool = pool
        self.waiting = waiting
        self.active = active
        self.counters = counters
        self._finish = finish

    def admit(self) -> None:
        """Admit waiting requests in order; the first that must wait holds the rest (FIFO)."""
        for req in list(self.waiting):
            if self._persona_in_flight(req):
                continue  # another request is evaluating this persona: fork from it soon
            try:
                admitted = self._try_admit(req)
            except Exception as exc:  # a bad request must not take the loop down
                log.exception("admission failed for request %d", req.rid)
                self._finish(req, "error", InferenceError(f"local engine: {exc}"))
                continue
            if admitted is None:
                return  # no sequence or KV room yet: wait (FIFO) for running requests
            self.waiting.remove(req)
            if admitted:
                self.active.append(req)

    def _persona_in_flight(self, req: Request) -> bool:
        """True when an active request will pin the same system prefix within a few steps.

        Rooms of one persona that arrive together would otherwise each evaluate
        the whole system prompt; waiting for the first one to pin it is cheaper.
        """
        n = req.pin_len
        if not n or not self.settings.prefix_cache:
            return False
        prefix = req.prompt[:n]
        return any(
            r.pin_len == n and r.phase is Phase.PREFILL and r.prompt[:n] == prefix
            for r in self.active
        )

    def _reserved(self) -> int:
        """KV cells running requests may still add."""
        return sum(
            (len(r.prompt) - r.n_past) + (r.sampling.max_tokens - r.completion) for r in self.active
        )

    def _try_admit(self, req: Request) -> bool | None:
        """True: admitted; None: wait; False: request already finished (failed)."""
        pool = self.pool
        prompt = req.prompt
        limit = len(prompt) - 1  # at least one token must be evaluated to get logits
        cache = self.settings.prefix_cache
        own = pool.sessions.get(req.session) if req.session is not None else None
        src_id, n = pool.trie.longest_prefix(prompt, [own] if own is not None else [])
        n = min(n, limit) if cache else 0
        snap_key, m = None, 0
        if cache and self.store is not None and not req.no_snapshot:
            snap_key, m = self.store.match(prompt)
            m = min(m, limit)
        use_snap = snap_key is not None and m >= n + self.settings.min_restore_gain
        keep = m if use_snap else n
        protect = {src_id} if (src_id is not None and n > 0 and not use_snap) else set()
        need = len(prompt) - keep + req.sampling.max_tokens
        if not self._make_room(need, protect):
            return None
        src = pool.seqs[src_id] if src_id is not None and n > 0 else None
        seq: Seq | None
        if use_snap:
            assert snap_key is not None and self.store is not None
            seq = self.acquire(protect, prefer=own)
            if seq is None:
                return None
            found = self.store.take(snap_key)
            if found is None or not pool.load_state(seq, *found):
                self._release(seq)
                req.no_snapshot = True
                return self._try_admit(req)
            self.counters["restores"] += 1
            pool.truncate(seq, m)
        elif src is not None and src.state is SeqState.IDLE and src.session in (None, req.session):
            seq = src  # the room's own (or an anonymous) sequence: truncate in place
            pool.detach(seq)
            seq.state = SeqState.BUSY
            if not pool.truncate(seq, n):
                pool.clear(seq)
                seq = pool.take_free()
                assert seq is not None
        elif src is not None:
            seq = self.acquire(protect, prefer=own)
            if seq is None:
                return None
            pool.fork(src, seq, n)
            src.last_used = time.monotonic()
        else:
            seq = self.acquire(set(), prefer=own)
            if seq is None:
                return None
        req.seq = seq
        req.admitted = time.monotonic()
        seq.state = SeqState.BUSY
        req.n_past = len(seq.tokens)
        req.cached = req.n_past
        req.phase = Phase.PREFILL
        req.sampler = SamplerChain(
            req.sampling, self.model.n_vocab, self.model.eog_tokens, self.model.vocab
        )
        req.detok = Detokenizer(self.model.vocab)
        req.stop = StopMatcher(req.sampling.stop)
        self.maybe_pin(req)
        return True

    def _make_room(self, need: int, protect: set[int]) -> bool:
        """Evict idle rooms, then unpin personas, until ``need`` more cells fit."""
        pool = self.pool
        if not self.model.kv_unified:
            return True  # each sequence owns n_ctx_seq >= max_seq_tokens cells
        while pool.kv_used() + self._reserved() + need > self.model.n_ctx:
            victim = pool.lru(SeqState.IDLE, protect) or pool.lru(SeqState.PINNED, protect)
            if victim is None:
                return not self.active  # alone: try anyway; a full KV fails only this request
            self.evict(victim)
        return True

    def acquire(self, protect: set[int], prefer: int | None = None) -> Seq | None:
        """A BUSY, empty sequence: the session's old one, a free one, or an evicted one."""
        pool = self.pool
        if prefer is not None and prefer not in protect:
            old = pool.seqs[prefer]
            if old.state is SeqState.IDLE:
                pool.clear(old)
        seq = pool.take_free()
        if seq is not None:
            return seq
        victim = pool.lru(SeqState.IDLE, protect) or pool.lru(SeqState.PINNED, protect)
        if victim is None:
            return None
        self.evict(victim)
        return pool.take_free()

    def _release(self, seq: Seq) -> None:
        self.pool.clear(seq)

    def evict(self, seq: Seq) -> None:
        """Snapshot an idle/pinned sequence (if worth it) and free it."""
        self.counters["evictions"] += 1
        store = self.store
        tokens = tuple(seq.tokens)
        if (
            store is not None
            and self.settings.prefix_cache
            and len(tokens) >= self.settings.min_snapshot_tokens
        ):
            kind: Kind = "persona" if seq.state is SeqState.PINNED else "room"
            if not store.has(tokens, "persona"):
                try:
                    store.put(tokens, self.pool.state_bytes(seq), kind, session=seq.session)
                except Exception:
                    log.exception("snapshot of sequence %d failed; dropping it", seq.id)
        self.pool.clear(seq)

    def forget_sessions(self, prefix: str) -> int:
        """Drop the idle sequences and room snapshots of sessions starting with ``prefix``
        (a redaction): nothing of them stays in the KV, RAM or on disk. A running
        request keeps its sequence; what it reuses next time no longer matches."""
        dropped = 0
        for seq in self.pool.seqs:
            if seq.state is SeqState.IDLE and (seq.session or "").startswith(prefix):
                self.pool.clear(seq)
                dropped += 1
        if self.store is not None:
            dropped += self.store.discard_sessions(prefix)
        return dropped

    def maybe_pin(self, req: Request) -> None:
        """Once the request's KV covers its system block, fork it into a pinned persona."""
        if not req.pin_len or req.seq is None or len(req.seq.tokens) < req.pin_len:
            return
        pool = self.pool
        key = tuple(req.prompt[: req.pin_len])
        req.pin_len = 0
        if key in pool.personas:
            return
        if len(pool.personas) >= self.settings.max_pinned:
            oldest = pool.lru(SeqState.PINNED)
            if oldest is not None:
                self.evict(oldest)
        seq = pool.take_free(high=True)
        if seq is None:
            victim = pool.lru(SeqState.IDLE, {req.seq.id})
            if victim is None:
                return
            self.evict(victim)
            seq = pool.take_free(high=True)
            if seq is None:
                return
        pool.fork(req.seq, seq, len(key))
        pool.pin(seq)
        store = self.store
        if store is not None and store.disk_dir is not None and not store.has(key, "persona"):
            try:
                store.put(key, pool.state_bytes(seq), "persona")
            except Exception:
                log.exception("could not save persona snapshot")

    def restore_personas(self) -> int:
        """At start: put persona prefixes saved on disk back into pinned sequences."""
        if self.store is None or not self.settings.prefix_cache:
            return 0
        restored = 0
        for entry in self.store.personas()[: self.settings.max_pinned]:
            seq = self.pool.take_free(high=True)
            if seq is None:
                break
            found = self.store.take(entry.key)
            if found is None or not self.pool.load_state(seq, *found):
                self.pool.clear(seq)
                continue
            self.pool.pin(seq)
            restored += 1
        return restored

    def compact(self) -> None:
        """Partitioned KV: keep the running sequences on consecutive ids (placement.py).

        Outsiders swap places with free, idle or pinned sequences inside the
        window: a state copy, milliseconds, only when the running set changes shape.
        """
        if self.model.kv_unified:
            return
        running = [r.seq.id for r in self.active if r.seq is not None]
        if len(running) < 2:
            return
        seqs = self.pool.seqs
        # A generator: only read when the running ids are not consecutive already.
        occupied = (s.id for s in seqs if s.state is not SeqState.FREE)
        for src, dst in compaction_moves(running, occupied, len(seqs)):
            self._swap(seqs[src], seqs[dst])

    def _swap(self, a: Seq, b: Seq) -> None:
        owners = [r for r in self.active if r.seq is a or r.seq is b]
        self.pool.swap(a, b)
        self.counters["swaps"] += 1
        for req in owners:
            req.seq = b if req.seq is a else a
            if req.seq.state is not SeqState.BUSY:  # its state could not be restored
                req.seq = None
                self._finish(req, "error", InferenceError("local engine: lost a sequence"))
