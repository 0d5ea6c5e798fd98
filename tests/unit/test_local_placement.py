"""The placement rule for running sequences under partitioned KV (a pure function)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivebridge.inference.local.placement import compaction_moves


def apply(moves: list[tuple[int, int]], running: set[int]) -> set[int]:
    for src, dst in moves:
        running = (running - {src}) | {dst}
    return running


def test_consecutive_ids_need_no_move() -> None:
    assert compaction_moves([3, 4, 5], occupied=[0, 9], n_seq=16) == []
    assert compaction_moves([7], occupied=[], n_seq=8) == []
    assert compaction_moves([], occupied=[1], n_seq=8) == []


def test_one_outsider_moves_next_to_the_others() -> None:
    assert compaction_moves([0, 1, 2, 5], occupied=[], n_seq=8) == [(5, 3)]


def test_free_ids_are_preferred_over_occupied_ones() -> None:
    # Windows 0-1 and 1-2 both need one move; 1 is an idle room, 2 is free.
    assert compaction_moves([0, 3], occupied=[1], n_seq=4) == [(0, 2)]
    # Windows 0-3 and 4-7 both need two moves; only 0-3 would displace an idle room.
    assert compaction_moves([0, 1, 5, 6], occupied=[2], n_seq=8) == [(0, 3), (1, 4)]
    # When only a window with an idle room will do, the runner swaps with it.
    assert compaction_moves([0, 1, 5], occupied=[2], n_seq=6) == [(5, 2)]


def test_rooms_parked_apart_meet_in_the_lowest_window() -> None:
    assert compaction_moves([0, 2], occupied=[1, 3], n_seq=8) == [(2, 1)]


def test_ids_outside_the_pool_are_refused() -> None:
    with pytest.raises(ValueError):
        compaction_moves([0, 9], occupied=[], n_seq=8)


@given(st.data())
def test_moves_always_make_the_running_ids_consecutive(data: st.DataObject) -> None:
    n_seq = data.draw(st.integers(1, 64))
    ids = st.integers(0, n_seq - 1)
    running = set(data.draw(st.lists(ids, max_size=n_seq)))
    occupied = set(data.draw(st.lists(ids, max_size=n_seq))) - running
    moves = compaction_moves(sorted(running), occupied, n_seq)
    after = apply(moves, running)
    assert len(after) == len(running)
    if after:
        assert max(after) - min(after) + 1 == len(after)
    srcs = [s for s, _ in moves]
    dsts = [d for _, d in moves]
    assert set(srcs) <= running and not set(dsts) & running  # never onto a running id
    assert len(set(dsts)) == len(dsts)
    # Minimal: no window of the same size keeps more running ids in place.
    if running:
        k = len(running)
        best = max(len(running & set(range(s, s + k))) for s in range(n_seq - k + 1))
        assert len(moves) == k - best
