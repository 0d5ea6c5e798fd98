"""Affinity hints: tell an upstream pool which conversation a request belongs to.

A pool of vLLM or llama.cpp servers behind a router keeps a room's KV prefix
warm only if the router sends the room's requests to the same replica. Routers
read a session id from different places, so each endpoint says where it wants
it (:class:`Affinity`): a header (vLLM production-stack's ``--session-key``,
llm-d's ``x-session-token``), the OpenAI ``user`` field, or llama-server's
``id_slot``.

The id is an HMAC of the bridge's session key (room + persona) under a secret
salt: stable across restarts (the salt is kept), the same for every request of
the conversation, and opaque — no room id, user id or persona name leaves the
bridge in it.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Literal

AffinityKind = Literal["header", "user", "id_slot", "none"]
AFFINITY_KINDS: tuple[str, ...] = ("header", "user", "id_slot", "none")
DEFAULT_SESSION_HEADER = "x-session-id"


@dataclass(frozen=True, slots=True)
class Affinity:
    """Where one endpoint's router reads the session id."""

    kind: AffinityKind = "header"
    #: The header for ``kind="header"``.
    header: str = DEFAULT_SESSION_HEADER
    #: llama-server's slots (``-np``) for ``kind="id_slot"``; 0: read ``/props`` at discovery.
    slots: int = 0


def session_id(salt: bytes, session: str) -> str:
    """The opaque id of ``session``: 32 hex digits of HMAC-SHA256 under ``salt``."""
    return hmac.new(salt, session.encode(), hashlib.sha256).hexdigest()[:32]


def slot_of(sid: str, slots: int) -> int:
    """The llama-server slot a session id pins (the same slot for every turn)."""
    return int(sid[:8], 16) % slots


def apply_affinity(affinity: Affinity, sid: str, kwargs: dict[str, Any], *, slots: int = 0) -> None:
    """Put ``sid`` where ``affinity`` says, into ``chat.completions.create`` kwargs.

    ``slots`` is the endpoint's slot count when ``affinity.slots`` is 0 (discovered);
    with no slot count known an ``id_slot`` endpoint gets no hint (any slot).
    """
    if affinity.kind == "header":
        headers = dict(kwargs.get("extra_headers") or {})
        headers[affinity.header] = sid
        kwargs["extra_headers"] = headers
    elif affinity.kind == "user":
        kwargs["user"] = sid
    elif affinity.kind == "id_slot":
        n = affinity.slots or slots
        if n > 0:
            body = dict(kwargs.get("extra_body") or {})
            body["id_slot"] = slot_of(sid, n)
            body["cache_prompt"] = True
            kwargs["extra_body"] = body
