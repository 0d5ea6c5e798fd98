"""When to edit a live reply: a pure, time-injected throttle.

A streamed reply is one Matrix message that is edited as text arrives. Each
edit is a new event in the room (and a notification-free push to every
client), so edits are rate limited and capped. The caller owns the I/O: it feeds
the accumulated visible text (after :func:`~.formatting.strip_think`) and the
current monotonic time, and sends what the throttle returns.

Per message at most ``1 + max_edits + 1`` events are sent: the initial message,
up to ``max_edits`` intermediate edits, and one final edit with the whole text
(skipped when the last sent text already was the whole text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DEFAULT_MAX_HOLDBACK", "EditThrottle", "StreamAction", "stable_prefix"]

DEFAULT_MAX_HOLDBACK = 48
# Characters after which the text so far may end: whitespace, plus punctuation
# that ends words in scripts written without spaces (CJK).
_BREAK_AFTER = frozenset("。、，！？；：」』）…")


def stable_prefix(text: str, *, max_holdback: int = DEFAULT_MAX_HOLDBACK) -> str:
    """The part of streaming ``text`` that ends on a word boundary.

    While a reply streams its last word is usually incomplete; showing
    ``"Hel"`` and then ``"Hello"`` flickers. The cut falls after the last
    whitespace (or CJK punctuation). If that would hold back more than
    ``max_holdback`` characters (a long URL, a code line, text without spaces),
    the text is shown as is rather than stalling; a first word shorter than
    that is held back whole (``""``).
    """
    if not text or text[-1].isspace() or text[-1] in _BREAK_AFTER:
        return text
    lower = max(0, len(text) - max_holdback - 1)
    for i in range(len(text) - 1, lower - 1, -1):
        ch = text[i]
        if ch.isspace() or ch in _BREAK_AFTER:
            return text[: i + 1]
    # No boundary in reach: the first word is still arriving (wait for it), or
    # one long run is (show it).
    return "" if lower == 0 else text


@dataclass(frozen=True, slots=True)
class StreamAction:
    """What to do now: ``send`` the first message, ``edit`` it, or nothing."""

    kind: Literal["none", "send", "edit"]
    text: str = ""

    @property
    def needed(self) -> bool:
        return self.kind != "none"


_NOTHING = StreamAction("none")


class EditThrottle:
    """Decides when a streamed reply is sent and edited; assumes it does as told.

    * The first text with non-whitespace content is sent at once (``send``).
    * Then at most one ``edit`` per ``interval_s`` since the last send or edit,
      at most ``max_edits`` of them, and never one that would not change the
      message.
    * :meth:`finish` always returns the whole final text (``send`` if nothing
      was sent yet, ``edit`` if it differs from what was sent), regardless of
      interval or cap.

    With ``whole_words`` intermediate text is cut to :func:`stable_prefix`, so
    the first message may wait a token or two for its first word to complete.
    """

    def __init__(
        self,
        interval_s: float = 1.5,
        max_edits: int = 20,
        *,
        whole_words: bool = True,
        max_holdback: int = DEFAULT_MAX_HOLDBACK,
    ) -> None:
        if interval_s < 0 or max_edits < 0:
            raise ValueError("interval_s and max_edits must not be negative")
        self.interval_s = interval_s
        self.max_edits = max_edits
        self.whole_words = whole_words
        self.max_holdback = max_holdback
        self.sent_text: str | None = None  # what the message shows now
        self.last_sent_at: float | None = None
        self.edits = 0  # intermediate edits so far (the final one not counted)
        self.finished = False

    @property
    def started(self) -> bool:
        return self.sent_text is not None

    def update(self, text: str, now: float) -> StreamAction:
        """Given all visible text so far, what to send at time ``now``."""
        if self.finished:
            return _NOTHING
        shown = stable_prefix(text, max_holdback=self.max_holdback) if self.whole_words else text
        if not shown.strip():
            return _NOTHING
        if self.sent_text is None:
            return self._record("send", shown, now)
        if self.edits >= self.max_edits or shown == self.sent_text:
            return _NOTHING
        assert self.last_sent_at is not None
        if now - self.last_sent_at < self.interval_s:
            return _NOTHING
        self.edits += 1
        return self._record("edit", shown, now)

    def finish(self, text: str, now: float | None = None) -> StreamAction:
        """The final action, carrying the whole text; later calls do nothing.

        Returns nothing when the reply is blank and nothing was sent, or when
        the message already shows exactly ``text``.
        """
        if self.finished:
            return _NOTHING
        self.finished = True
        if self.sent_text is None:
            if not text.strip():
                return _NOTHING
            return self._record("send", text, now)
        if text == self.sent_text:
            return _NOTHING
        return self._record("edit", text, now)

    def _record(self, kind: Literal["send", "edit"], text: str, now: float | None) -> StreamAction:
        self.sent_text = text
        if now is not None:
            self.last_sent_at = now
        return StreamAction(kind, text)
