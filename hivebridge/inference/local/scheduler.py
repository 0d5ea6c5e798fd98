"""Continuous batching over one llama context (engine thread only).

Each :meth:`Scheduler.step` builds one ``llama_batch``: one token for every
generating sequence plus a bounded chunk of pending prompt (chunked prefill),
so a cold 2 s prompt never freezes the other rooms' streams. New requests are
admitted between steps, reusing the longest cached prefix: the room's own
sequence truncated in place, a fork of a pinned persona or other idle
sequence, or a snapshot restored from RAM/disk. Only the suffix is evaluated.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp as L

from hivebridge.inference.types import BackendUnavailable, FinishReason, InferenceError

from .model import LoadedModel
from .placement import compaction_moves
from .sampler import Detokenizer, ResolvedSampling, SamplerChain, StopMatcher
from .sequences import Seq, SeqState, SequencePool
from .settings import EngineSettings
from .snapshots import Kind, SnapshotStore
from .threads import ThreadTuner

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Update:
    """What the engine thread tells one request's Generation after a step."""

    text: str = ""
    first_token: bool = False
    prompt_tokens: int = 0
    cached_tokens: int = 0
    evaluated_tokens: int = 0
    completion_tokens: int = 0
    finish: FinishReason | None = None
    error: Exception | None = None
    tokens: list[int] | None = None  # on finish: the completion's token ids
    queue_wait_s: float | None = None  # submitted -> admitted, once admitted


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


@dataclass(eq=False, slots=True)
class Request:
    rid: int
    prompt: list[int]
    sampling: ResolvedSampling
    session: str | None
    emit: Callable[[Update], None]
    pin_len: int = 0  # tokens of the persona (system) prefix to pin, 0 = none
    phase: Phase = Phase.WAITING
    seq: Seq | None = None
    n_past: int = 0  # prompt tokens in the KV
    cached: int = 0
    evaluated: int = 0
    completion: int = 0
    generated: list[int] = field(default_factory=list)
    pending: int | None = None  # sampled, not yet decoded
    first_sent: bool = False
    no_snapshot: bool = False
    sampler: SamplerChain | None = None
    detok: Detokenizer | None = None
    stop: StopMatcher | None = None
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None


# A step's unit of work: (request, tokens to decode, want logits for the last one).
_Unit = tuple[Request, list[int], bool]
DecodeHook = Callable[[list[int]], int | None]


class Scheduler:
    def __init__(
        self, model: LoadedModel, settings: EngineSettings, store: SnapshotStore | None
    ) -> None:
        self.model = model
        self.settings = settings
        self.store = store
        self.pool = SequencePool(model)
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.max_seq_tokens = max(
            16, min(settings.max_seq_tokens, model.n_ctx_seq, model.n_ctx_train or model.n_ctx)
        )
        self._eog = frozenset(model.eog_tokens)
        self._batch = L.llama_batch_init(model.n_batch, 0, 1)
        self.decode_hook: DecodeHook | None = None  # tests: simulate llama_decode failures
        threads, threads_batch = settings.resolved_threads()
        self.tuner = ThreadTuner(
            lambda t, tb: L.llama_set_n_threads(model.ctx, t, tb), threads, threads_batch
        ) if settings.adaptive_threads else None  # fmt: skip
        self.counters = {
            "steps": 0, "decode_failures": 0, "evictions": 0, "restores": 0, "swaps": 0,
        }  # fmt: skip

    def close(self) -> None:
        if self._batch is not None:
            L.llama_batch_free(self._batch)
            self._batch = None

    # --- requests ----------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        self.waiting.append(req)

    def cancel(self, rid: int) -> None:
        for req in [*self.waiting, *self.active]:
            if req.rid == rid:
                self._finish(req, "cancelled")
                return

    def has_work(self) -> bool:
        return bool(self.active or self.waiting)

    def fail_all(self, exc: Exception) -> None:
        for req in [*self.waiting, *self.active]:
            self._finish(req, "error", exc)

    # --- admission -----------------------------------------------------------------------

    def _admit(self) -> None:
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
            seq = self._acquire(protect, prefer=own)
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
            seq = self._acquire(protect, prefer=own)
            if seq is None:
                return None
            pool.fork(src, seq, n)
            src.last_used = time.monotonic()
        else:
            seq = self._acquire(set(), prefer=own)
            if seq is None:
                return None
        req.seq = seq
        req.admitted = time.monotonic()
        seq.state = SeqState.BUSY
        req.n_past = len(seq.tokens)
        req.cached = req.n_past
        req.phase = Phase.PREFILL
        req.sampler = SamplerChain(req.sampling, self.model.n_vocab, self.model.eog_tokens)
        req.detok = Detokenizer(self.model.vocab)
        req.stop = StopMatcher(req.sampling.stop)
        self._maybe_pin(req)
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
            self._evict(victim)
        return True

    def _acquire(self, protect: set[int], prefer: int | None = None) -> Seq | None:
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
        self._evict(victim)
        return pool.take_free()

    def _release(self, seq: Seq) -> None:
        self.pool.clear(seq)

    def _evict(self, seq: Seq) -> None:
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
                    store.put(tokens, self.pool.state_bytes(seq), kind)
                except Exception:
                    log.exception("snapshot of sequence %d failed; dropping it", seq.id)
        self.pool.clear(seq)

    def _maybe_pin(self, req: Request) -> None:
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
                self._evict(oldest)
        seq = pool.take_free(high=True)
        if seq is None:
            victim = pool.lru(SeqState.IDLE, {req.seq.id})
            if victim is None:
                return
            self._evict(victim)
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

    # --- the step ------------------------------------------------------------------------

    def step(self) -> bool:
        """One batched llama_decode; False when there was nothing to do."""
        self._admit()
        self._compact()
        units: list[_Unit] = []
        decoding = [r for r in self.active if r.phase is Phase.DECODE]
        for req in decoding:
            assert req.pending is not None
            units.append((req, [req.pending], True))
        budget = self.model.n_batch - len(units)
        if decoding:
            budget = min(budget, self.settings.prefill_chunk)
        for req in self.active:
            if budget <= 0:
                break
            if req.phase is not Phase.PREFILL:
                continue
            rest = len(req.prompt) - req.n_past
            take = min(rest, budget)
            units.append((req, req.prompt[req.n_past : req.n_past + take], take == rest))
            budget -= take
        if not units:
            return False
        # Ascending sequence ids: partitioned KV puts a run of consecutive ids in one ubatch.
        units.sort(key=lambda u: u[0].seq.id if u[0].seq is not None else -1)
        self.counters["steps"] += 1
        self._run(units)
        return True

    def _compact(self) -> None:
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
        occupied = [s.id for s in seqs if s.state is not SeqState.FREE]
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

    def _run(self, units: list[_Unit]) -> None:
        rows = self._fill(units)
        rc = self._decode(units)
        if rc == 0:
            self._after(units, rows)
            return
        self.counters["decode_failures"] += 1
        log.warning(
            "llama_decode returned %d for %d sequences; retrying one by one", rc, len(units)
        )
        self._rollback(units)
        if rc == 1:  # no KV slot: free idle sequences and retry
            protect = {u[0].seq.id for u in units if u[0].seq is not None}
            while (v := self.pool.lru(SeqState.IDLE, protect)) is not None:
                self._evict(v)
        for unit in units:
            req = unit[0]
            if req.phase is Phase.DONE:
                continue
            rows = self._fill([unit])
            rc = self._decode([unit])
            if rc == 0:
                self._after([unit], rows)
            else:
                self._rollback([unit])
                msg = "the context is full" if rc == 1 else f"llama_decode failed ({rc})"
                self._finish(req, "error", InferenceError(f"local engine: {msg}"))

    def _fill(self, units: list[_Unit]) -> list[int]:
        batch = self._batch
        token, pos, n_seq, seq_id, logits = (
            batch.token,
            batch.pos,
            batch.n_seq_id,
            batch.seq_id,
            batch.logits,
        )
        i = 0
        rows: list[int] = []
        for req, toks, want in units:
            assert req.seq is not None
            sid = req.seq.id
            p = len(req.seq.tokens)
            for t in toks:
                token[i] = t
                pos[i] = p
                n_seq[i] = 1
                seq_id[i][0] = sid
                logits[i] = 0
                i += 1
                p += 1
            if want:
                logits[i - 1] = 1
            rows.append(i - 1)
        batch.n_tokens = i
        return rows

    def _decode(self, units: list[_Unit]) -> int:
        if self.decode_hook is not None:
            forced = self.decode_hook([u[0].seq.id for u in units if u[0].seq is not None])
            if forced is not None:
                return forced
        t0 = time.perf_counter()
        rc = int(L.llama_decode(self.model.ctx, self._batch))
        if self.tuner is not None and rc == 0:
            self.tuner.record(int(self._batch.n_tokens), time.perf_counter() - t0)
        return rc

    def _rollback(self, units: list[_Unit]) -> None:
        """Forget any cells a failed decode may have left past each sequence's known end."""
        for req, _toks, _want in units:
            if req.seq is not None:
                L.llama_memory_seq_rm(self.model.mem, req.seq.id, len(req.seq.tokens), -1)

    def _after(self, units: list[_Unit], rows: list[int]) -> None:
        pool = self.pool
        for (req, toks, want), row in zip(units, rows, strict=True):
            seq = req.seq
            if seq is None or req.phase is Phase.DONE:
                continue
            seq.tokens.extend(toks)
            pool.ledger.append(seq.id, len(toks))
            if req.phase is Phase.PREFILL:
                req.n_past += len(toks)
                req.evaluated += len(toks)
                self._maybe_pin(req)
                if not want:
                    continue
                req.phase = Phase.DECODE
            req.pending = None
            assert req.sampler is not None
            try:
                token = req.sampler.sample(self.model.ctx, row)
            except Exception as exc:
                self._finish(req, "error", InferenceError(f"local engine: sampling failed: {exc}"))
                continue
            self._on_token(req, token)

    def _on_token(self, req: Request, token: int) -> None:
        assert req.detok is not None and req.stop is not None and req.seq is not None
        first = not req.first_sent
        req.first_sent = True
        if token in self._eog and not req.sampling.ignore_eos:
            self._finish(req, "stop", first=first, flush=True)
            return
        req.completion += 1
        req.generated.append(token)
        text, stopped = req.stop.feed(req.detok.feed(token))
        if stopped:
            self._finish(req, "stop", text=text, first=first)
            return
        if req.completion >= req.sampling.max_tokens or len(req.seq.tokens) >= self.max_seq_tokens:
            self._finish(req, "length", text=text, first=first, flush=True)
            return
        req.pending = token
        if text or first:
            req.emit(self._update(req, text=text, first_token=first))

    @staticmethod
    def _update(req: Request, **kw: Any) -> Update:
        return Update(
            queue_wait_s=None if req.admitted is None else req.admitted - req.submitted,
            prompt_tokens=len(req.prompt),
            cached_tokens=req.cached,
            evaluated_tokens=req.evaluated,
            completion_tokens=req.completion,
            **kw,
        )

    def _finish(
        self,
        req: Request,
        reason: FinishReason,
        error: Exception | None = None,
        *,
        text: str = "",
        first: bool = False,
        flush: bool = False,
    ) -> None:
        if req.phase is Phase.DONE:
            return
        if flush and req.detok is not None and req.stop is not None:
            # End of stream (EOG or length): release held-back text and split UTF-8 bytes.
            tail, stopped = req.stop.feed(req.detok.flush())
            text += tail if stopped else tail + req.stop.flush()
            if stopped:
                reason = "stop"
        req.phase = Phase.DONE
        if req in self.active:
            self.active.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        if req.sampler is not None:
            req.sampler.free()
            req.sampler = None
        seq, req.seq = req.seq, None
        if seq is not None:
            if reason in ("stop", "length") and self.settings.prefix_cache:
                self.pool.park(seq, req.session)
            else:
                self.pool.clear(seq)  # cancelled or failed: the sequence is freed
        try:
            req.emit(
                self._update(
                    req,
                    text=text,
                    first_token=first,
                    finish=reason,
                    error=error,
                    tokens=req.generated,
                )
            )
        except Exception:  # the loop may be gone; nothing left to tell
            log.debug("could not deliver the end of request %d", req.rid)

    def probe_logits(self, tokens: list[int]) -> list[float]:
        """Logits after evaluating ``tokens`` from scratch in a spare sequence (diagnostics).

        Runs between steps on the engine thread; the spare sequence is freed again.
        """
        seq = self._acquire(set())
        if seq is None:
            raise InferenceError("no spare sequence for a probe")
        try:
            probe = Request(-1, tokens, ResolvedSampling(1, 0, 1, 0, 0, 1, 0, 0, ()), None, _drop)
            probe.seq = seq
            logits_row = 0
            for start in range(0, len(tokens), self.model.n_batch):
                chunk = tokens[start : start + self.model.n_batch]
                unit = (probe, chunk, start + len(chunk) == len(tokens))
                logits_row = self._fill([unit])[0]
                if self._decode([unit]) != 0:
                    raise InferenceError("llama_decode failed during a probe")
                seq.tokens.extend(chunk)
                self.pool.ledger.append(seq.id, len(chunk))
            ptr = L.llama_get_logits_ith(self.model.ctx, logits_row)
            return [float(ptr[i]) for i in range(self.model.n_vocab)]
        finally:
            self.pool.clear(seq)

    # --- introspection -------------------------------------------------------------------

    def state(self) -> dict[str, object]:
        pool = self.pool
        return {
            "free": len(pool.free),
            "busy": pool.count(SeqState.BUSY),
            "idle": pool.count(SeqState.IDLE),
            "pinned": pool.count(SeqState.PINNED),
            "kv_used": pool.kv_used(),
            "n_ctx": self.model.n_ctx,
            "n_ctx_seq": self.model.n_ctx_seq,
            "kv_unified": self.model.kv_unified,
            "batch_invariant": self.model.batch_invariant,
            "n_seq_max": self.model.n_seq_max,
            "waiting": len(self.waiting),
            "active": len(self.active),
            "sessions": dict(pool.sessions),
            "personas": len(pool.personas),
            "snapshots": len(self.store) if self.store is not None else 0,
            "threads": self.tuner.chosen_threads
            if self.tuner
            else self.settings.resolved_threads()[0],
            "thread_switches": self.tuner.switches if self.tuner else 0,
            **self.counters,
        }


def _drop(_update: Update) -> None:
    pass


def unavailable(reason: str) -> BackendUnavailable:
    return BackendUnavailable(f"local engine unavailable: {reason}")
