"""What a persona may be called: no invisible or direction-changing characters, and
nothing that reads as the bot's name.

A display name is shown by every client next to every message the persona sends.
Format characters (Unicode category Cf: U+202E RIGHT-TO-LEFT OVERRIDE, U+200B
ZERO WIDTH SPACE, ...) make it render reversed or hide what it really says, and a
name that looks like the bot's lets a persona pass for the bot. Both are refused
with one line that says why; pure rules, no I/O.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

__all__ = ["display_name_problem", "skeleton"]

#: Longest display name accepted (Synapse's limit is 256).
MAX_DISPLAY_CHARS = 100

# Letters from other scripts (and digits) that render like Latin ones, after
# NFKC and case folding: enough to catch the usual impersonation tricks.
_CONFUSABLES = str.maketrans(
    {
        "а": "a", "в": "b", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j",
        "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y",
        "х": "x", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ɡ": "g", "ı": "i", "ℓ": "l",
        "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
        "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ϳ": "j",
        "0": "o", "1": "l", "3": "e", "5": "s", "7": "t", "|": "l", "!": "i",
    }
)  # fmt: skip


def skeleton(text: str) -> str:
    """``text`` as it reads: compatibility-normalised, case-folded, lookalikes mapped to
    Latin, marks and everything but letters dropped (so "H i v e", "Hіve" and "HIVE"
    all read "hive"); "i" and "l" count as one letter (they look alike in many fonts)."""
    folded = unicodedata.normalize("NFKC", text).casefold().translate(_CONFUSABLES)
    decomposed = unicodedata.normalize("NFKD", folded)
    letters = "".join(ch for ch in decomposed if ch.isalpha() and ch.isascii())
    return letters.replace("i", "l")


def display_name_problem(name: str, reserved: Iterable[str]) -> str | None:
    """Why ``name`` cannot be a persona's display name, or None when it can.

    ``reserved``: names only the bot may look like (its display name, its localpart).
    """
    for ch in name:
        category = unicodedata.category(ch)
        if category in ("Cf", "Cc", "Zl", "Zp"):
            what = unicodedata.name(ch, "a control character")
            return (
                "Display names may not hold invisible, control or text-direction "
                f"characters (found U+{ord(ch):04X} {what})."
            )
    if not name.strip():
        return "A display name needs at least one visible character."
    if len(name) > MAX_DISPLAY_CHARS:
        return f"Display names are at most {MAX_DISPLAY_CHARS} characters."
    shape = skeleton(name)
    for other in reserved:
        if other and shape and shape == skeleton(other):
            return f"{name!r} looks like the bot's name ({other}); choose another display name."
    return None
