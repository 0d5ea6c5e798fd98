"""Where running sequences sit: one window of consecutive ids (partitioned KV).

llama.cpp splits a batch over several KV streams wherever the sequence ids
stop being consecutive (``llama_batch_allocr::split_equal(sequential=true)``),
and every extra ubatch is another pass over the weights: 8 rooms on ids
0, 2, .., 14 decode no faster than one. A pure function, so the rule is easy
to test; the scheduler carries the moves out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def compaction_moves(
    running: Sequence[int], occupied: Iterable[int], n_seq: int
) -> list[tuple[int, int]]:
    """Swaps ``(src, dst)`` that put every running id into one consecutive window.

    ``running`` are the ids of running sequences, ``occupied`` the ids that hold
    anything else worth keeping (idle rooms, pinned prefixes); the rest of
    ``range(n_seq)`` is free. The window needs the fewest moves; among equals
    it displaces the fewest occupied ids (a swap copies two states, a move into
    a free id one), then it is the lowest. Each ``src`` is a running id outside
    the window, each ``dst`` a non-running id inside it. Empty when the running
    ids are consecutive already.
    """
    ids = sorted(set(running))
    k = len(ids)
    if k < 2 or ids[-1] - ids[0] + 1 == k:
        return []
    if ids[0] < 0 or ids[-1] >= n_seq:
        raise ValueError(f"running ids {ids} outside 0..{n_seq - 1}")
    inside = set(ids)
    kept = set(occupied) - inside

    def cost(start: int) -> tuple[int, int, int]:
        window = range(start, start + k)
        moves = sum(1 for i in ids if i not in window)
        displaced = sum(1 for j in window if j in kept)
        return moves, displaced, start

    start = min(range(n_seq - k + 1), key=cost)
    window = range(start, start + k)
    movers = [i for i in ids if i not in window]
    # Free ids first: a move copies one state, a swap two.
    targets = sorted((j for j in window if j not in inside), key=lambda j: (j in kept, j))
    return list(zip(movers, targets, strict=False))
