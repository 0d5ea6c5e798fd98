"""User ID patterns from config: ``@user:server``, ``*:server`` or ``*``."""

from __future__ import annotations

from collections.abc import Iterable


def matches(mxid: str, patterns: Iterable[str]) -> bool:
    """Whether ``mxid`` is covered by any pattern (exact user, whole server, or everyone)."""
    server = mxid.split(":", 1)[1] if ":" in mxid else ""
    for pattern in patterns:
        if pattern == "*" or pattern == mxid:
            return True
        if pattern.startswith("*:") and pattern[2:] == server:
            return True
    return False
