"""Waiting for something a test cannot be told about directly (no timed asserts:
the timeout only stops a test that would otherwise hang)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Return once ``check()`` is true; TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)
