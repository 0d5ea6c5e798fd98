"""Pick the decode thread count at run time: all usable cores, or one under contention.

On a 2-core box llama.cpp's worker threads spin-wait for each other; when
another process takes a core, a 2-thread decode collapses (measured: ~97 to
~26 tok/s) while a 1-thread decode keeps ~55+ tok/s. The tuner times
decode-only steps in short windows and now and then tries the other setting
for one window, keeping whichever costs less per token. Probes start early
and back off (2 -> 12 windows) while the current setting keeps winning.

A probe of one thread costs ~1.7x per token for its window, so on a calm box
it is pure loss: where the box's counters tell (``core_use.CoreUse``), the
tuner stays on all cores without probing while other processes use less than
``busy_cores`` of them, and starts probing two windows after they use more.

Only decode-sized steps are tuned. A step that carries a prompt chunk (more than
``max_decode_tokens`` tokens) always runs on the configured threads: its ops are
long enough that a second thread on a contended core still adds work done,
rather than spinning at every op boundary as it does for a few-token step.
"""

from __future__ import annotations

from collections.abc import Callable


class ThreadTuner:
    def __init__(
        self,
        apply: Callable[[int, int], None],
        threads: int,
        threads_batch: int,
        *,
        window: int = 8,
        explore_every: int = 12,
        first_explore: int = 2,
        max_decode_tokens: int = 64,
        contention: Callable[[], float | None] | None = None,
        busy_cores: float = 0.25,
    ) -> None:
        self._apply = apply
        self._contention = contention
        self.busy_cores = busy_cores
        self.full = (threads, threads_batch)
        self._applied = self.full
        self.options: list[tuple[int, int]] = [self.full]
        if threads > 1 or threads_batch > 1:
            self.options.append((1, 1))
        self.current = 0
        self.window = window
        self.explore_every = explore_every
        self._first = max(1, min(first_explore, explore_every))
        self._interval = self._first
        self.max_decode_tokens = max_decode_tokens
        self._time = 0.0
        self._tokens = 0
        self._steps = 0
        self._bucket = -1
        self._baseline: float | None = None
        self._since_probe = 0
        self._probing = False
        self.switches = 0

    @property
    def threads(self) -> int:
        """Threads in use right now (possibly a one-window probe)."""
        return self.options[self.current][0]

    @property
    def chosen_threads(self) -> int:
        """The setting the tuner has settled on (ignoring a running probe)."""
        index = 1 - self.current if self._probing else self.current
        return self.options[index][0]

    def before(self, n_tokens: int) -> None:
        """Set the threads for a step of ``n_tokens``: the tuned choice for a decode
        step, the configured ones for a prefill step."""
        wanted = self.full if n_tokens > self.max_decode_tokens else self.options[self.current]
        if wanted != self._applied:
            self._applied = wanted
            self._apply(*wanted)

    def record(self, n_tokens: int, seconds: float) -> None:
        """Feed one llama_decode timing (prefill-heavy steps are ignored).

        Only windows of equal batch size are compared (per-token cost falls
        steeply with batch size), and a probe is judged against the window
        right before it, so slow load changes do not mislead the choice.
        """
        if len(self.options) < 2 or n_tokens > self.max_decode_tokens:
            return
        if n_tokens != self._bucket:
            self._bucket = n_tokens
            self._time, self._tokens, self._steps = 0.0, 0, 0
            if self._probing:  # batch changed mid-probe: undo it, try again later
                self._probing = False
                self._set(1 - self.current)
        self._time += seconds
        self._tokens += n_tokens
        self._steps += 1
        if self._steps < self.window:
            return
        cost = self._time / max(1, self._tokens)
        self._time, self._tokens, self._steps = 0.0, 0, 0
        others = self._contention() if self._contention is not None else None
        if self._probing:
            self._probing = False
            self._since_probe = 0
            if self._baseline is not None and cost > self._baseline * 0.9:
                self._set(1 - self.current)  # the probe was not clearly better: go back
                self._interval = min(self.explore_every, self._interval * 2)
            else:
                self._interval = self._first  # conditions changed: check again soon
            return
        self._baseline = cost
        if self.current == 0 and others is not None and others < self.busy_cores:
            self._since_probe = 0  # all cores and nobody else wants them: nothing to try
            self._interval = self._first
            return
        self._since_probe += 1
        if self._since_probe >= self._interval:
            self._probing = True
            self._set(1 - self.current)

    def _set(self, index: int) -> None:
        if index != self.current:  # applied by the next decode step's before()
            self.current = index
            self.switches += 1
