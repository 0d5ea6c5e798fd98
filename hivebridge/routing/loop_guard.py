"""Stop personas from talking to each other forever, without ever silencing humans.

Three independent brakes, all pure (time is always passed in, in seconds):

* :class:`PingPongDetector` — per room, watches the sequence of *bot* senders and trips when
  it becomes a repeating pattern (A→B→A→B…, A→B→C→A→B→C…, A→B→A→C…).
* :class:`PersonaTurnLimiter` — per room, at most ``max_per_minute`` persona turns in any
  sliding 60-second window.
* the MSC4295 bounce limit carried by the triggering message (see ``dispatch``).

Scene turns (``routing/scene_turns.py``) are conversations between personas on
purpose: they pass only the turn limiter (:meth:`LoopGuard.scene_turn`), and their
messages are never observed by the pattern detector, so a scene cannot trip it and
leaves nothing behind for the normal guards when it ends.

:class:`LoopGuard` combines them behind one call per incoming message and one per
intended persona turn.

What "the pattern repeats N times" means
-----------------------------------------
Only bot senders (personas, or any sender the caller flags ``is_bot``) are loop
participants. The detector keeps the bot senders seen since the chain last reset, oldest
first (at most ``max_history``). The chain *trips* when, for some period ``p ≥ 2``, the last
``N·p`` senders are one block ``P`` of length ``p`` written ``N`` times in a row and ``P``
contains at least two distinct senders; ``P`` is the shortest such block. With the
default ``N = 5``: ``ABABABABAB`` (10 messages) trips, ``ABCABC…`` trips after 15,
``ABAC×5`` after 20. A single sender repeating itself is not ping-pong.

Irregular interleavings (two pairs talking over each other in no fixed order) have no
period; they are bounded by the turn limiter and the bounce limit instead.

Resets
------
* a non-bot sender (a human) speaks: the history and any trip are cleared, so a
  human-driven conversation is never silenced and a human can always restart the bots;
* nothing was observed for ``cooldown_s`` seconds.

A *bot* outside the tripped pattern does not reset the chain: otherwise a third persona
could unlock a loop again and again. It is not suppressed either, and it stays in the
history, so if it joins a new loop that loop trips too (and its participants are added).
Once tripped, every participant of the pattern is suppressed until a reset, and exactly one
verdict per trip carries ``notify=True`` so the bot posts one notice.

One notice per stop
-------------------
A room hears about a stop once. The ping-pong trip and the bounce limit both end a
persona chain, so they share one announcement per chain (:meth:`LoopGuard.announce`):
whichever stops the chain first speaks, the other stays quiet until the chain resets (a
human speaks, or the cooldown passes). The turn cap speaks once when it first refuses a
turn, and again only after it has let a turn through since.

With the shipped settings (threshold 5, bounce limit 16, 20 turns a minute) two personas
answering each other are stopped by the pattern after 10 messages: the bounce limit (17
messages) and the turn cap (20) are the brakes for what has no fixed pattern.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "GuardVerdict",
    "LoopGuard",
    "LoopStatus",
    "LoopVerdict",
    "PersonaTurnLimiter",
    "PingPongDetector",
    "find_repeating_pattern",
]


class LoopStatus(StrEnum):
    OK = "ok"  # a bot message; no loop (yet)
    RESET = "reset"  # a human spoke: history and suppression cleared
    TRIPPED = "tripped"  # this message completed the Nth repetition; participants now muted
    SUPPRESSED = "suppressed"  # a message while the chain is tripped (already notified)


@dataclass(frozen=True, slots=True)
class LoopVerdict:
    """Result of observing one message.

    ``notify`` is True exactly once per tripped chain: post one m.notice then.
    ``suppressed`` is every persona currently muted in the room.
    """

    status: LoopStatus
    notify: bool = False
    pattern: tuple[str, ...] = ()
    suppressed: frozenset[str] = frozenset()


def find_repeating_pattern(
    senders: Sequence[str], threshold: int, max_period: int | None = None
) -> tuple[str, ...] | None:
    """Shortest block ``P`` (``len ≥ 2``, ``≥ 2`` distinct senders) whose ``threshold``-fold
    repetition is a suffix of ``senders``; ``None`` if there is none."""
    senders = tuple(senders)  # deques cannot be sliced
    n = len(senders)
    if threshold < 1:
        raise ValueError("threshold must be >= 1")
    limit = n // threshold if max_period is None else min(max_period, n // threshold)
    for p in range(2, limit + 1):
        start = n - threshold * p
        block = senders[n - p :]
        if len(set(block)) < 2:
            continue
        if all(senders[i] == senders[i + p] for i in range(start, n - p)):
            return tuple(block)
    return None


class PingPongDetector:
    """Repeating-pattern detector for one room (see the module docstring for the rules)."""

    def __init__(self, threshold: int = 5, cooldown_s: float = 300.0, max_history: int = 64):
        if threshold < 2:
            # threshold 1 would trip on any two bots exchanging a single message each
            raise ValueError("threshold must be >= 2")
        if cooldown_s <= 0:
            raise ValueError("cooldown_s must be > 0")
        if max_history < 2 * threshold:
            raise ValueError("max_history must be >= 2 * threshold")
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.max_history = max_history
        self._history: deque[str] = deque(maxlen=max_history)
        self._suppressed: frozenset[str] = frozenset()
        self._last_seen: float | None = None

    @property
    def history(self) -> tuple[str, ...]:
        return tuple(self._history)

    @property
    def tripped(self) -> bool:
        return bool(self._suppressed)

    @property
    def last_seen(self) -> float | None:
        return self._last_seen

    def reset(self) -> None:
        self._history.clear()
        self._suppressed = frozenset()

    def _expire(self, now: float) -> None:
        if self._last_seen is not None and now - self._last_seen >= self.cooldown_s:
            self.reset()

    def observe(self, sender: str, now: float, *, is_bot: bool = True) -> LoopVerdict:
        """Record one message (call for every message in the room, in order)."""
        self._expire(now)
        # Never let the clock run backwards inside our state.
        self._last_seen = now if self._last_seen is None else max(self._last_seen, now)
        if not is_bot:
            self.reset()
            return LoopVerdict(LoopStatus.RESET)
        self._history.append(sender)
        pattern = find_repeating_pattern(self._history, self.threshold)
        if pattern is not None:
            was_tripped = self.tripped
            self._suppressed = self._suppressed | frozenset(pattern)
            if not was_tripped:
                return LoopVerdict(LoopStatus.TRIPPED, True, pattern, self._suppressed)
        if self.tripped:
            return LoopVerdict(LoopStatus.SUPPRESSED, False, pattern or (), self._suppressed)
        return LoopVerdict(LoopStatus.OK)

    def is_suppressed(self, persona: str, now: float) -> bool:
        """Whether ``persona`` must not take a turn now."""
        self._expire(now)
        return persona in self._suppressed

    def idle(self, now: float) -> bool:
        """True when the state is indistinguishable from a fresh detector (safe to drop)."""
        return self._last_seen is None or now - self._last_seen >= self.cooldown_s


class PersonaTurnLimiter:
    """Per-room cap on persona turns in a sliding window (default: one minute)."""

    def __init__(self, max_per_minute: int, window_s: float = 60.0):
        if max_per_minute < 0:
            raise ValueError("max_per_minute must be >= 0")
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.max_per_minute = max_per_minute
        self.window_s = window_s
        self._turns: dict[str, deque[float]] = {}

    def _prune(self, room_id: str, now: float) -> deque[float]:
        turns = self._turns.setdefault(room_id, deque())
        while turns and turns[0] <= now - self.window_s:
            turns.popleft()
        return turns

    def allow(self, room_id: str, now: float) -> bool:
        """Take a turn if the window has room; a refused turn is not counted."""
        turns = self._prune(room_id, now)
        if len(turns) >= self.max_per_minute:
            return False
        turns.append(now)
        return True

    def retry_after(self, room_id: str, now: float) -> float:
        """Seconds until :meth:`allow` would succeed (0 if it would now)."""
        turns = self._prune(room_id, now)
        if len(turns) < self.max_per_minute:
            return 0.0
        if self.max_per_minute == 0:
            return float("inf")
        return max(0.0, turns[len(turns) - self.max_per_minute] + self.window_s - now)

    def forget(self, room_id: str) -> None:
        self._turns.pop(room_id, None)

    def rooms(self) -> set[str]:
        return set(self._turns)

    def prune(self, now: float) -> None:
        for room_id in list(self._turns):
            if not self._prune(room_id, now):
                del self._turns[room_id]


class GuardVerdict(StrEnum):
    """May a persona take a turn now? First failing check wins, in this order."""

    ALLOW = "allow"
    BOUNCE_LIMIT = "bounce_limit"  # the triggering message has bounce_limit <= 0
    PING_PONG = "ping_pong"  # the persona is part of a tripped repeating pattern
    TURN_CAP = "turn_cap"  # the room used up its persona turns for this minute


_LOOP, _TURN_CAP = "loop", "turn_cap"


class LoopGuard:
    """Per-room loop state behind two calls.

    1. :meth:`observe` every message in a room, humans included, in timeline order,
       before deciding any answer to it; post one notice when ``verdict.notify``.
    2. :meth:`check_turn` for each persona about to answer; ``ALLOW`` consumes a turn.
    """

    def __init__(
        self,
        threshold: int = 5,
        cooldown_s: float = 300.0,
        max_history: int = 64,
        max_turns_per_minute: int = 20,
    ):
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.max_history = max_history
        PingPongDetector(threshold, cooldown_s, max_history)  # validate eagerly
        self._detectors: dict[str, PingPongDetector] = {}
        self._turns = PersonaTurnLimiter(max_turns_per_minute)
        self._pruned_at: float | None = None
        #: Rooms told about their current stop: ``loop`` (pattern or bounce limit,
        #: until the chain resets) and ``turn_cap`` (until the cap allows a turn).
        self._announced: dict[str, set[str]] = {}

    def reconfigure(self, threshold: int, cooldown_s: float, max_turns_per_minute: int) -> None:
        """New limits from the next message on (a reloaded config).

        Patterns seen so far are dropped: they were counted against the old
        threshold. Turns taken this minute still count against the new cap.
        """
        PingPongDetector(threshold, cooldown_s, self.max_history)  # validate first
        PersonaTurnLimiter(max_turns_per_minute)
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._detectors.clear()
        self._turns.max_per_minute = max_turns_per_minute

    def detector(self, room_id: str) -> PingPongDetector:
        det = self._detectors.get(room_id)
        if det is None:
            det = PingPongDetector(self.threshold, self.cooldown_s, self.max_history)
            self._detectors[room_id] = det
        return det

    def observe(self, room_id: str, sender: str, now: float, *, is_bot: bool) -> LoopVerdict:
        """Record one message; ``notify`` only when no loop stop was announced in this
        chain. Also prunes quiet rooms, at most once a cooldown: state stays bounded by
        the rooms active within the last cooldown, not every room ever seen."""
        if self._pruned_at is None:
            self._pruned_at = now
        elif now - self._pruned_at >= self.cooldown_s:
            self._pruned_at = now
            self.prune(now)
        det = self.detector(room_id)
        if not is_bot or det.idle(now):
            self._announced.get(room_id, set()).discard(_LOOP)
        verdict = det.observe(sender, now, is_bot=is_bot)
        if verdict.notify and not self.announce(room_id, GuardVerdict.PING_PONG):
            return LoopVerdict(verdict.status, False, verdict.pattern, verdict.suppressed)
        return verdict

    def announce(self, room_id: str, verdict: GuardVerdict) -> bool:
        """Whether a stop by ``verdict`` should be announced now (and note that it was).

        The pattern and the bounce limit share one announcement per chain; the turn
        cap has its own, renewed once the cap lets a turn through again.
        """
        if verdict is GuardVerdict.ALLOW:
            return False
        key = _TURN_CAP if verdict is GuardVerdict.TURN_CAP else _LOOP
        told = self._announced.setdefault(room_id, set())
        if key in told:
            return False
        told.add(key)
        return True

    def check_turn(
        self,
        room_id: str,
        persona: str,
        now: float,
        *,
        incoming_bounce_limit: int | None = None,
    ) -> GuardVerdict:
        if incoming_bounce_limit is not None and incoming_bounce_limit <= 0:
            return GuardVerdict.BOUNCE_LIMIT
        det = self._detectors.get(room_id)
        if det is not None and det.is_suppressed(persona, now):
            return GuardVerdict.PING_PONG
        if not self._turns.allow(room_id, now):
            return GuardVerdict.TURN_CAP
        self._announced.get(room_id, set()).discard(_TURN_CAP)
        return GuardVerdict.ALLOW

    def turn_retry_after(self, room_id: str, now: float) -> float:
        """Seconds until the room's turn cap lets a persona speak again."""
        return self._turns.retry_after(room_id, now)

    def scene_turn(self, room_id: str, now: float) -> float:
        """A scene's turn: only the room's turn cap applies (a scene is a conversation
        between personas on purpose, with a budget of its own, so neither the pattern
        detector nor the bounce limit stops it). Returns 0 when the turn is taken,
        else the seconds until the cap allows one."""
        if self._turns.allow(room_id, now):
            return 0.0
        return max(self._turns.retry_after(room_id, now), 0.001)

    def forget(self, room_id: str) -> None:
        """Drop a room's state (left the room, or ``!start`` after ``!stop``)."""
        self._detectors.pop(room_id, None)
        self._turns.forget(room_id)
        self._announced.pop(room_id, None)

    def prune(self, now: float) -> None:
        """Drop state of rooms that have been quiet for the cooldown (bounds memory)."""
        for room_id in [r for r, d in self._detectors.items() if d.idle(now)]:
            del self._detectors[room_id]
            self._announced.pop(room_id, None)
        self._turns.prune(now)

    def __len__(self) -> int:
        return len(self._detectors)

    def rooms_tracked(self) -> int:
        """Rooms with any state (loop history or turns this minute)."""
        return len(self._detectors.keys() | self._turns.rooms())
