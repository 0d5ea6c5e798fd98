"""How inference reports what operators watch, without knowing who listens.

``inference/`` knows nothing of the app's metrics: the composition root passes
hooks that count endpoint errors and failovers under its own labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _ignore(*_args: str) -> None:
    pass


@dataclass(frozen=True, slots=True)
class InferenceHooks:
    #: ``(endpoint name, kind)``: one failed call to a remote endpoint (kind: connect,
    #: timeout, auth, rate_limited, http_4xx, http_5xx, bad_response).
    endpoint_error: Callable[[str, str], None] = _ignore
    #: ``(endpoint name)``: a request moved off this endpoint to the next one in line.
    failover: Callable[[str], None] = _ignore


NO_HOOKS = InferenceHooks()
