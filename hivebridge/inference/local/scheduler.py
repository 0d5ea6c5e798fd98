"""Continuous batching over one llama context (engine thread only).

Each :meth:`Scheduler.step` builds one ``llama_batch``: one token for every
generating sequence plus a bounded chunk of pending prompt (chunked prefill),
so a cold 2 s prompt never freezes the other rooms' streams. New requests are
admitted between steps (admission.py: prefix reuse, snapshots, eviction);
this module decodes, samples, streams and finishes them.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import llama_cpp as L

from hivebridge.inference.types import BackendUnavailable, FinishReason, InferenceError

from .admission import Admission
from .core_use import CoreUse
from .model import LoadedModel
from .request import Phase, Request, Update
from .sampler import ResolvedSampling
from .sequences import SeqState, SequencePool
from .settings import EngineSettings
from .snapshots import SnapshotStore
from .threads import ThreadTuner

__all__ = ["DecodeHook", "Phase", "Request", "Scheduler", "Update", "unavailable"]

log = logging.getLogger(__name__)


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
            lambda t, tb: L.llama_set_n_threads(model.ctx, t, tb), threads, threads_batch,
            contention=CoreUse().others,
        ) if settings.adaptive_threads else None  # fmt: skip
        self.counters = {
            "steps": 0, "decode_failures": 0, "evictions": 0, "restores": 0, "swaps": 0,
        }  # fmt: skip
        # Where a step's time goes (seconds, cumulative; a few perf_counter calls per step).
        # "decode_only_*" counts steps without prompt tokens: the steady streaming state.
        self.profile: dict[str, float] = dict.fromkeys(
            ("admit_s", "fill_s", "decode_s", "sample_s", "decode_only_steps",
             "decode_only_tokens", "decode_only_s", "decode_only_sample_s"), 0.0,
        )  # fmt: skip
        self.admission = Admission(
            model, settings, store, self.pool, self.waiting, self.active, self.counters,
            lambda req, reason, error: self._finish(req, reason, error),
        )  # fmt: skip

    def close(self) -> None:
        if self._batch is not None:
            L.llama_batch_free(self._batch)
            self._batch = None

    # --- requests ----------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        """Queue ``req`` behind every request of its priority or higher (FIFO within one)."""
        waiting = self.waiting
        if not waiting or waiting[-1].priority >= req.priority:
            waiting.append(req)
            return
        for i, other in enumerate(waiting):
            if other.priority < req.priority:
                waiting.insert(i, req)
                return

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

    def forget_sessions(self, prefix: str) -> int:
        """See :meth:`Admission.forget_sessions`."""
        return self.admission.forget_sessions(prefix)

    def persist(self) -> int:
        """At shutdown: snapshot idle rooms and write every room snapshot to disk.

        Only with a snapshot directory; returns how many rooms were written.
        Most recently used rooms first, so the disk budget keeps the freshest.
        """
        store = self.store
        if store is None or store.disk_dir is None or not self.settings.prefix_cache:
            return 0
        idle = sorted(
            (s for s in self.pool.seqs if s.state is SeqState.IDLE), key=lambda s: s.last_used
        )
        for seq in idle:
            if len(seq.tokens) >= self.settings.min_snapshot_tokens:
                tokens = tuple(seq.tokens)
                if not store.has(tokens):
                    try:
                        data = self.pool.state_bytes(seq)
                        store.put(tokens, data, "room", session=seq.session)
                    except Exception:
                        log.exception("snapshot of sequence %d failed at shutdown", seq.id)
        written = store.persist_rooms()
        store.flush()
        return written

    def restore_personas(self) -> int:
        """At start: put persona prefixes saved on disk back into pinned sequences."""
        return self.admission.restore_personas()

    # --- the step ------------------------------------------------------------------------

    def step(self) -> bool:
        """One batched llama_decode; False when there was nothing to do."""
        t0 = time.perf_counter()
        self.admission.admit()
        self.admission.compact()
        self.profile["admit_s"] += time.perf_counter() - t0
        units: list[_Unit] = []
        decoding = [r for r in self.active if r.phase is Phase.DECODE]
        for req in decoding:
            assert req.pending is not None
            units.append((req, [req.pending], True))
        budget = self.model.n_batch - len(units)
        if decoding:
            budget = min(budget, self.settings.prefill_chunk)
        prefilling = [r for r in self.active if r.phase is Phase.PREFILL]
        prefilling.sort(key=lambda r: -r.priority)  # stable: FIFO within a priority
        for req in prefilling:
            if budget <= 0:
                break
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

    def _run(self, units: list[_Unit]) -> None:
        prof = self.profile
        t0 = time.perf_counter()
        rows = self._fill(units)
        t1 = time.perf_counter()
        rc = self._decode(units)
        t2 = time.perf_counter()
        if rc == 0:
            self._after(units, rows)
            t3 = time.perf_counter()
            prof["fill_s"] += t1 - t0
            prof["decode_s"] += t2 - t1
            prof["sample_s"] += t3 - t2
            if len(rows) == self._batch.n_tokens:  # one token per sequence: pure decode
                prof["decode_only_steps"] += 1
                prof["decode_only_tokens"] += len(rows)
                prof["decode_only_s"] += t2 - t1
                prof["decode_only_sample_s"] += t3 - t2
            return
        self.counters["decode_failures"] += 1
        log.warning(
            "llama_decode returned %d for %d sequences; retrying one by one", rc, len(units)
        )
        self._rollback(units)
        if rc == 1:  # no KV slot: free idle sequences and retry
            protect = {u[0].seq.id for u in units if u[0].seq is not None}
            while (v := self.pool.lru(SeqState.IDLE, protect)) is not None:
                self.admission.evict(v)
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
        if self.tuner is not None:
            self.tuner.before(int(self._batch.n_tokens))
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
                self.admission.maybe_pin(req)
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
        seq = self.admission.acquire(set())
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
            "profile": {k: round(v, 4) for k, v in self.profile.items()},
            **self.counters,
        }


def _drop(_update: Update) -> None:
    pass


def unavailable(reason: str) -> BackendUnavailable:
    return BackendUnavailable(f"local engine unavailable: {reason}")
