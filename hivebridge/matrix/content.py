"""What our Matrix events look like: pure functions over event content, no I/O.

One place for the shapes the bridge reads and writes: the stored row built
from an ``m.room.message``, reply fallbacks, edits, the reply relation of a
persona's answer, and the content keys hivebridge adds (MSC4295's bounce
limit, the event a reply answers).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..db.messages import StoredMessage

#: MSC4295: how many more persona-to-persona hops a message may cause.
BOUNCE_LIMIT_KEY = "io.github.m13253.bounce_limit"
#: The event a persona's reply answers, in every reply (DM or group, with or without
#: m.in_reply_to): how a resumed reply finds one that was already posted.
ANSWERS_KEY = "io.github.hivebridge.answers"
#: The scene (id) a persona's scene turn belongs to: such a message drives only its
#: scene; no persona answers it through routing, and the loop guard does not count it.
SCENE_KEY = "io.github.hivebridge.scene"

#: Synapse refuses an event over 65,536 bytes of JSON; the content we send stays
#: under this, leaving room for the envelope (ids, hashes, signatures).
MAX_CONTENT_BYTES = 60_000

_MX_REPLY_RE = re.compile(r"<mx-reply>.*?</mx-reply>", re.IGNORECASE | re.DOTALL)


def stored_from_event(
    raw: Mapping[str, Any], persona: str | None = None, *, received_ms: int | None = None
) -> StoredMessage | None:
    """The row we keep for an ``m.room.message``; None for anything else or malformed.

    Rows are ordered by ``ts``: a sender's ``origin_server_ts`` (any federated
    server sets it) is kept only when it is not in the future of ``received_ms``
    (now, by default), so no event can sort itself after everything that
    follows it, nor overflow the column.
    """
    if raw.get("type") != "m.room.message" or "state_key" in raw:
        return None
    content = raw.get("content")
    event_id, room_id, sender = raw.get("event_id"), raw.get("room_id"), raw.get("sender")
    if not isinstance(content, dict) or not all(
        isinstance(v, str) and v for v in (event_id, room_id, sender)
    ):
        return None
    body = content.get("body")
    msgtype = content.get("msgtype")
    relates = content.get("m.relates_to")
    relates = relates if isinstance(relates, dict) else {}
    if relates.get("rel_type") == "m.replace":
        # An edit's text goes onto the message it edits (see edit_of); its own row
        # keeps only the relation, so a redaction of the original leaves no copy.
        body, content = "", {"msgtype": msgtype, "m.relates_to": relates}
    thread_root = relates.get("event_id") if relates.get("rel_type") == "m.thread" else None
    reply = relates.get("m.in_reply_to")
    in_reply_to = reply.get("event_id") if isinstance(reply, dict) else None
    now = received_ms if received_ms is not None else int(time.time() * 1000)
    ts = raw.get("origin_server_ts")
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts <= now:
        ts = now
    return StoredMessage(
        event_id=str(event_id),
        room_id=str(room_id),
        sender=str(sender),
        msgtype=msgtype if isinstance(msgtype, str) else None,
        body=body if isinstance(body, str) else "",
        content=content,
        thread_root=thread_root if isinstance(thread_root, str) else None,
        in_reply_to=in_reply_to if isinstance(in_reply_to, str) else None,
        ts=ts,
        persona=persona,
    )


def content_bytes(content: Mapping[str, Any]) -> int:
    """The content's size as the homeserver counts it (compact UTF-8 JSON)."""
    return len(json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode())


def is_edit(content: Mapping[str, Any]) -> bool:
    """An ``m.replace`` edit of another event: the original already had its turn."""
    relates = content.get("m.relates_to") if isinstance(content, Mapping) else None
    return isinstance(relates, Mapping) and relates.get("rel_type") == "m.replace"


@dataclass(frozen=True, slots=True)
class Edit:
    """An ``m.replace`` of a message: the event it edits and its newest text."""

    event_id: str
    body: str
    new_content: dict[str, Any]


def edit_of(raw: Mapping[str, Any]) -> Edit | None:
    """The edit an ``m.room.message`` event makes, if it is a well-formed one."""
    content = raw.get("content")
    if raw.get("type") != "m.room.message" or not isinstance(content, Mapping):
        return None
    relates = content.get("m.relates_to")
    new = content.get("m.new_content")
    if not is_edit(content) or not isinstance(new, dict) or not isinstance(relates, Mapping):
        return None
    target, body = relates.get("event_id"), new.get("body")
    if not isinstance(target, str) or not target or not isinstance(body, str):
        return None
    return Edit(target, body, new)


def edited_content(original: Mapping[str, Any], edit: Edit) -> dict[str, Any]:
    """The original's content showing the edit's text; its relations (reply, thread) stay."""
    merged = {k: v for k, v in original.items() if k not in ("body", "format", "formatted_body")}
    for key in ("msgtype", "body", "format", "formatted_body"):
        if key in edit.new_content:
            merged[key] = edit.new_content[key]
    return merged


def redacted_id(raw: Mapping[str, Any]) -> str | None:
    """The event an ``m.room.redaction`` redacts (top level, or in the content since v11)."""
    if raw.get("type") != "m.room.redaction":
        return None
    redacts = raw.get("redacts")
    content = raw.get("content")
    if not isinstance(redacts, str) and isinstance(content, Mapping):
        redacts = content.get("redacts")
    return redacts if isinstance(redacts, str) and redacts else None


def without_quote(content: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A reply's body and content without the fallback quote of the message it answers."""
    out = dict(content)
    body = out.get("body")
    body = strip_reply_fallback(body) if isinstance(body, str) else ""
    out["body"] = body
    html = out.get("formatted_body")
    if isinstance(html, str):
        out["formatted_body"] = strip_html_reply(html)
    return body, out


def strip_reply_fallback(body: str) -> str:
    """Drop the leading ``> `` quote block of a reply fallback (and the blank line after)."""
    if not body.startswith(">"):
        return body
    lines = body.split("\n")
    i = 0
    while i < len(lines) and (lines[i].startswith("> ") or lines[i] == ">"):
        i += 1
    if i == 0:
        return body
    if i < len(lines) and lines[i] == "":
        i += 1
    return "\n".join(lines[i:])


def strip_html_reply(html: str) -> str:
    """Drop the ``<mx-reply>`` fallback block of a formatted reply."""
    return _MX_REPLY_RE.sub("", html)


def bounce_limit_of(content: Mapping[str, Any]) -> int | None:
    """The MSC4295 bounce limit a message carries; None when it has none (a human)."""
    limit = content.get(BOUNCE_LIMIT_KEY) if isinstance(content, Mapping) else None
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def scene_of(content: Mapping[str, Any]) -> int | None:
    """The scene a message is a turn of; None for any other message."""
    scene = content.get(SCENE_KEY) if isinstance(content, Mapping) else None
    return scene if isinstance(scene, int) and not isinstance(scene, bool) else None


def reply_relation(msg: StoredMessage) -> dict[str, object]:
    """Content keys that make a message a reply to ``msg`` (in its thread, if any).

    In a group the answer says what it answers and mentions its sender, so the
    asker is notified and a persona that asked counts as addressed.
    """
    relates: dict[str, object] = {"m.in_reply_to": {"event_id": msg.event_id}}
    if msg.thread_root:
        relates.update(rel_type="m.thread", event_id=msg.thread_root, is_falling_back=False)
    return {"m.relates_to": relates, "m.mentions": {"user_ids": [msg.sender]}}


def answer_marks(msg: StoredMessage, bounce_limit: int, *, group: bool) -> dict[str, object]:
    """The keys every persona answer carries: its bounce limit, what it answers, and in
    a group the reply relation."""
    return {
        BOUNCE_LIMIT_KEY: bounce_limit,
        ANSWERS_KEY: msg.event_id,
        **(reply_relation(msg) if group else {}),
    }
