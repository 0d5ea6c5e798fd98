"""The decode thread tuner switches to one thread when that is clearly cheaper."""

from __future__ import annotations

from hivebridge.inference.local.threads import ThreadTuner


def drive(tuner: ThreadTuner, cost: dict[int, float], steps: int) -> None:
    for _ in range(steps):  # as the scheduler steps: set the threads, decode, record
        tuner.before(4)
        tuner.record(4, 4 * cost[tuner.threads])


def test_switches_to_one_thread_under_contention_and_back() -> None:
    applied: list[tuple[int, int]] = []
    tuner = ThreadTuner(lambda t, tb: applied.append((t, tb)), 2, 2, window=4, explore_every=3)
    drive(tuner, {2: 0.040, 1: 0.015}, 200)  # contention: 2 threads spin-wait
    assert tuner.chosen_threads == 1
    drive(tuner, {2: 0.010, 1: 0.015}, 200)  # contention gone
    assert tuner.chosen_threads == 2
    assert (2, 2) in applied[applied.index((1, 1)) :]


def test_stays_put_when_probe_is_not_better() -> None:
    tuner = ThreadTuner(lambda t, tb: None, 2, 2, window=4, explore_every=3)
    drive(tuner, {2: 0.010, 1: 0.015}, 400)
    assert tuner.chosen_threads == 2


def test_single_core_never_tunes() -> None:
    tuner = ThreadTuner(lambda t, tb: None, 1, 1)
    drive(tuner, {1: 0.01}, 100)
    assert tuner.switches == 0


def test_prefill_steps_are_ignored() -> None:
    tuner = ThreadTuner(lambda t, tb: None, 2, 2, window=2, explore_every=1)
    for _ in range(50):
        tuner.record(256, 1.0)
    assert tuner.switches == 0


def test_prefill_steps_keep_the_configured_threads_while_decode_runs_on_one() -> None:
    applied: list[tuple[int, int]] = []
    tuner = ThreadTuner(lambda t, tb: applied.append((t, tb)), 2, 2, window=4, explore_every=3)
    drive(tuner, {2: 0.040, 1: 0.015}, 200)  # contention: decode settles on 1 thread
    assert tuner.chosen_threads == 1 and tuner.threads == 1
    tuner.before(4)  # a decode step on the tuned setting
    applied.clear()
    tuner.before(256)  # a prompt chunk: both cores
    tuner.before(300)  # still prefill: nothing to change
    tuner.before(4)  # back to decoding: the tuned choice
    tuner.before(4)
    assert applied == [(2, 2), (1, 1)]


def test_never_probes_on_a_calm_box() -> None:
    # A one-thread probe is pure loss when no other process wants the cores.
    tuner = ThreadTuner(lambda t, tb: None, 2, 2, window=4, explore_every=3, contention=lambda: 0.0)
    drive(tuner, {2: 0.010, 1: 0.017}, 400)
    assert tuner.switches == 0


def test_probes_once_another_process_takes_a_core_and_comes_back_when_it_leaves() -> None:
    others = [0.0]
    tuner = ThreadTuner(
        lambda t, tb: None, 2, 2, window=4, explore_every=3, contention=lambda: others[0]
    )
    drive(tuner, {2: 0.010, 1: 0.017}, 100)
    assert tuner.switches == 0
    others[0] = 1.0  # a busy loop on one core: two decode threads spin-wait
    drive(tuner, {2: 0.040, 1: 0.015}, 4 * 4)  # four windows: two to notice, one probe
    assert tuner.chosen_threads == 1
    others[0] = 0.0
    drive(tuner, {2: 0.010, 1: 0.017}, 200)
    assert tuner.chosen_threads == 2


def test_without_counters_it_probes_as_before() -> None:
    tuner = ThreadTuner(
        lambda t, tb: None, 2, 2, window=4, explore_every=3, contention=lambda: None
    )
    drive(tuner, {2: 0.010, 1: 0.017}, 400)
    assert tuner.switches > 0 and tuner.chosen_threads == 2
