"""Count the KV cells the pool really uses when sequences share cells.

In a unified KV cache ``llama_memory_seq_cp`` does not copy data: the
destination sequence is added to the same cells. Summing sequence lengths
would count a 1,500-token persona once per room that forked it. The ledger
models cells as *segments* (cells written by one sequence in one go); a
sequence references a prefix of each segment it uses, so a segment occupies
``max(referenced end) - start`` cells.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(slots=True)
class _Ref:
    segment: int
    start: int  # first position covered
    end: int  # one past the last position covered


class KvLedger:
    def __init__(self) -> None:
        self._refs: dict[int, list[_Ref]] = {}
        self._owner: dict[int, int] = {}  # segment -> seq that writes to it
        self._start: dict[int, int] = {}
        self._ids = itertools.count()

    def length(self, seq: int) -> int:
        refs = self._refs.get(seq)
        return refs[-1].end if refs else 0

    def append(self, seq: int, n: int) -> None:
        """``n`` new cells were written for ``seq`` at its current end."""
        if n <= 0:
            return
        refs = self._refs.setdefault(seq, [])
        if refs and self._owner.get(refs[-1].segment) == seq and self._tail_free(refs[-1]):
            refs[-1].end += n
            return
        pos = refs[-1].end if refs else 0
        seg = next(self._ids)
        self._owner[seg] = seq
        self._start[seg] = pos
        refs.append(_Ref(seg, pos, pos + n))

    def _tail_free(self, ref: _Ref) -> bool:
        """True when no other sequence references ``ref``'s segment beyond ``ref.end``."""
        for refs in self._refs.values():
            for other in refs:
                if other is not ref and other.segment == ref.segment and other.end > ref.end:
                    return False
        return True

    def truncate(self, seq: int, keep: int) -> None:
        """``seq`` now holds only positions ``[0, keep)``."""
        refs = self._refs.get(seq, [])
        kept = [r for r in refs if r.start < keep]
        if kept and kept[-1].end > keep:
            kept[-1].end = keep
        if kept:
            self._refs[seq] = kept
        else:
            self._refs.pop(seq, None)
        self._gc()

    def fork(self, src: int, dst: int, keep: int) -> None:
        """``dst`` (emptied first) shares ``src``'s cells for positions ``[0, keep)``."""
        self._refs.pop(dst, None)
        new = [_Ref(r.segment, r.start, min(r.end, keep)) for r in self._refs.get(src, [])]
        new = [r for r in new if r.end > r.start]
        if new:
            self._refs[dst] = new
        self._gc()

    def remove(self, seq: int) -> None:
        self._refs.pop(seq, None)
        self._gc()

    def used(self) -> int:
        """Cells in use across the pool."""
        ends: dict[int, int] = {}
        for refs in self._refs.values():
            for r in refs:
                if r.end > ends.get(r.segment, -1):
                    ends[r.segment] = r.end
        return sum(end - self._start[seg] for seg, end in ends.items())

    def _gc(self) -> None:
        live = {r.segment for refs in self._refs.values() for r in refs}
        for seg in [s for s in self._owner if s not in live]:
            del self._owner[seg]
            del self._start[seg]
