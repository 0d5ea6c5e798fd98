"""Decide, per persona, whether it answers a message.

Pure rules over plain data: the caller turns a Matrix event into a :class:`MessageView`
(resolving the sender of a replied-to event itself), describes the persona and the room,
and asks :func:`decide`. Nothing here performs I/O or imports a Matrix library, so every
rule is unit-testable and the same rules apply to human and persona senders alike.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Set
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from ..matrix.content import bounce_limit_of, strip_html_reply, strip_reply_fallback

__all__ = [
    "ADDRESSED_REASONS",
    "Decision",
    "MessageView",
    "PersonaView",
    "Reason",
    "RoomView",
    "addressed_in_thread",
    "decide",
    "name_position",
    "next_bounce_limit",
]


class Reason(StrEnum):
    """Why a persona does (or does not) answer. Checked in this order; the bounce
    limit last, so it only ever stops a persona that was addressed."""

    REDACTION = "redaction"  # redactions never trigger anything
    OWN_MESSAGE = "own_message"  # never answer yourself
    FROM_BRIDGE_BOT = "from_bridge_bot"  # the appservice bot's notices/commands
    EDIT = "edit"  # m.replace: the original already had its chance
    NOTICE = "notice"  # m.notice is the bot-to-bot "do not answer" convention
    ROOM_STOPPED = "room_stopped"  # !stop
    DIRECT_ROOM = "direct_room"  # exactly two joined members: every message is for us
    MENTIONED = "mentioned"  # mxid in m.mentions.user_ids
    PILL = "pill"  # matrix.to / matrix: link or bare mxid in the text
    REPLY = "reply"  # a (real, non-fallback) reply to one of its messages
    NAME = "name"  # display name or localpart as a word
    THREAD_FOLLOWUP = "thread_followup"  # inside a thread it was addressed in / rooted at it
    NOT_ADDRESSED = "not_addressed"  # group room and nobody called it
    BOUNCE_LIMIT_REACHED = "bounce_limit_reached"  # addressed, but the MSC4295 hop budget is spent


#: Reasons meaning "this message spoke to the persona" (as opposed to a direct room).
ADDRESSED_REASONS: frozenset[Reason] = frozenset(
    {Reason.MENTIONED, Reason.PILL, Reason.REPLY, Reason.NAME, Reason.THREAD_FOLLOWUP}
)


@dataclass(frozen=True, slots=True)
class Decision:
    answer: bool
    reason: Reason


@dataclass(frozen=True, slots=True)
class MessageView:
    """The parts of an ``m.room.message`` (or redaction) that routing looks at.

    ``mention_user_ids`` is ``None`` when the event had no ``m.mentions`` at all.
    ``reply_to_sender`` is resolved by the caller (it needs the replied-to event).
    ``reply_is_fallback`` marks the thread fallback reply (``is_falling_back``), which is
    not a real reply and must not count as addressing the previous thread speaker.
    ``thread_root_sender`` (optional) lets a thread started on a persona's message count
    as a follow-up to that persona.
    """

    event_id: str
    sender: str
    body: str = ""
    msgtype: str = "m.text"
    formatted_body: str | None = None
    mention_user_ids: tuple[str, ...] | None = None
    rel_type: str | None = None
    relates_to_event_id: str | None = None
    in_reply_to_event_id: str | None = None
    reply_to_sender: str | None = None
    reply_is_fallback: bool = False
    thread_root: str | None = None
    thread_root_sender: str | None = None
    is_redaction: bool = False
    bounce_limit: int | None = None

    @classmethod
    def from_content(
        cls,
        event_id: str,
        sender: str,
        content: Mapping[str, Any],
        *,
        reply_to_sender: str | None = None,
        thread_root_sender: str | None = None,
        is_redaction: bool = False,
    ) -> MessageView:
        """Build a view from raw event content; tolerates any malformed shape."""
        if not isinstance(content, Mapping):
            content = {}
        body = content.get("body")
        fmt = content.get("formatted_body")
        if content.get("format") not in (None, "org.matrix.custom.html"):
            fmt = None
        msgtype = content.get("msgtype")
        mentions = content.get("m.mentions")
        mention_ids: tuple[str, ...] | None = None
        if isinstance(mentions, Mapping):
            ids = mentions.get("user_ids")
            mention_ids = (
                tuple(u for u in ids if isinstance(u, str)) if isinstance(ids, list | tuple) else ()
            )
        rel = content.get("m.relates_to")
        rel = rel if isinstance(rel, Mapping) else {}
        rel_type = rel.get("rel_type") if isinstance(rel.get("rel_type"), str) else None
        rel_event = rel.get("event_id") if isinstance(rel.get("event_id"), str) else None
        reply = rel.get("m.in_reply_to")
        reply_id = None
        if isinstance(reply, Mapping) and isinstance(reply.get("event_id"), str):
            reply_id = reply["event_id"]
        bounce = bounce_limit_of(content)
        return cls(
            event_id=event_id,
            sender=sender,
            body=body if isinstance(body, str) else "",
            msgtype=msgtype if isinstance(msgtype, str) else "",
            formatted_body=fmt if isinstance(fmt, str) else None,
            mention_user_ids=mention_ids,
            rel_type=rel_type,
            relates_to_event_id=rel_event,
            in_reply_to_event_id=reply_id,
            reply_to_sender=reply_to_sender if reply_id else None,
            reply_is_fallback=rel.get("is_falling_back") is True,
            thread_root=rel_event if rel_type == "m.thread" else None,
            thread_root_sender=thread_root_sender,
            is_redaction=is_redaction,
            bounce_limit=bounce,
        )


@dataclass(frozen=True, slots=True)
class PersonaView:
    mxid: str
    localpart: str
    displayname: str | None = None


@dataclass(frozen=True, slots=True)
class RoomView:
    """Room facts; ``addressed_threads`` holds ``(thread_root, persona_mxid)`` pairs."""

    joined_member_count: int
    bot_mxid: str
    persona_mxids: frozenset[str] = frozenset()
    active: bool = True
    addressed_threads: Set[tuple[str, str]] = frozenset()


def decide(message: MessageView, persona: PersonaView, room: RoomView) -> Decision:
    """Return whether ``persona`` answers ``message`` and why.

    The decision depends only on this persona, so several addressed personas each answer.
    Persona senders follow exactly the same rules as humans; loops between personas are
    bounded by the MSC4295 bounce limit here and by the loop guard elsewhere.
    """
    if message.is_redaction:
        return Decision(False, Reason.REDACTION)
    if message.sender == persona.mxid:
        return Decision(False, Reason.OWN_MESSAGE)
    if message.sender == room.bot_mxid:
        return Decision(False, Reason.FROM_BRIDGE_BOT)
    if message.rel_type == "m.replace":
        return Decision(False, Reason.EDIT)
    if message.msgtype == "m.notice":
        return Decision(False, Reason.NOTICE)
    if not room.active:
        return Decision(False, Reason.ROOM_STOPPED)
    if room.joined_member_count == 2:
        reason: Reason | None = Reason.DIRECT_ROOM
    else:
        reason = _addressed_reason(message, persona, room)
    if reason is None:
        return Decision(False, Reason.NOT_ADDRESSED)
    # Any sender may spend the hop budget (MSC4295 is about bots replying to anything).
    # Checked last, so this reason means "would have answered": the chain was cut here.
    if message.bounce_limit is not None and message.bounce_limit <= 0:
        return Decision(False, Reason.BOUNCE_LIMIT_REACHED)
    return Decision(True, reason)


def _addressed_reason(message: MessageView, persona: PersonaView, room: RoomView) -> Reason | None:
    if message.mention_user_ids and persona.mxid in message.mention_user_ids:
        return Reason.MENTIONED
    # Reply fallbacks quote the replied-to message (often a persona's, with its pill); only
    # replies carry them, so a hand-written "> quote" in a plain message is left alone.
    is_reply = message.in_reply_to_event_id is not None
    body = strip_reply_fallback(message.body) if is_reply else message.body
    html = strip_html_reply(message.formatted_body) if message.formatted_body else ""
    if _links_to(html, persona.mxid) or _links_to(body, persona.mxid):
        return Reason.PILL
    if (
        message.reply_to_sender == persona.mxid
        and message.in_reply_to_event_id is not None
        and not message.reply_is_fallback
    ):
        return Reason.REPLY
    if _names_persona(body, persona):
        return Reason.NAME
    root = message.thread_root
    if root is not None and (
        (root, persona.mxid) in room.addressed_threads or message.thread_root_sender == persona.mxid
    ):
        return Reason.THREAD_FOLLOWUP
    return None


def addressed_in_thread(
    message: MessageView, persona: PersonaView, decision: Decision
) -> tuple[str, str] | None:
    """The ``(thread_root, persona_mxid)`` pair the caller should remember, if any.

    When a persona is addressed, the thread it is in (or the thread that may grow from this
    very event, if it is top-level) becomes "its" thread: later messages there count as
    addressed without naming it again.
    """
    if not decision.answer or decision.reason not in ADDRESSED_REASONS:
        return None
    return (message.thread_root or message.event_id, persona.mxid)


def next_bounce_limit(incoming: int | None, default: int) -> int:
    """Bounce limit for a persona's reply to a message carrying ``incoming``.

    A reply to a message without one (a human) starts at ``default``; otherwise one hop is
    spent: ``incoming - 1``, capped at ``default`` (a sender cannot buy us a longer chain
    than we would start ourselves) and never below 0.
    """
    default = max(default, 0)
    if incoming is None:
        return default
    return max(0, min(incoming - 1, default))


# --- pills ---------------------------------------------------------------------------------

# matrix.to permalinks (#/ then the id, optionally URL-encoded) and matrix: URIs (MSC2312).
_MATRIX_TO_RE = re.compile(r"https?://matrix\.to/#/([^\s\"'<>?/]+)", re.IGNORECASE)
_MATRIX_URI_RE = re.compile(r"matrix:(?://[^/\s]*/)?u/([^\s\"'<>?#]+)", re.IGNORECASE)


def _links_to(text: str, mxid: str) -> bool:
    if not text or not mxid:
        return False
    target = mxid.casefold()
    for match in _MATRIX_TO_RE.finditer(text):
        if unquote(match.group(1)).casefold() == target:
            return True
    for match in _MATRIX_URI_RE.finditer(text):
        if "@" + unquote(match.group(1)).casefold() == target:
            return True
    # A bare mxid typed into the text, bounded so @al:x.org does not match @al:x.org.uk.
    return _bare_mxid_re(target).search(_fold(text)) is not None


@lru_cache(maxsize=1024)
def _bare_mxid_re(folded_mxid: str) -> re.Pattern[str]:
    return re.compile(r"(?<![\w@])" + re.escape(folded_mxid) + r"(?![\w:-]|\.\w)")


# --- names -----------------------------------------------------------------------------------


def _fold(text: str) -> str:
    """Compatibility-normalise and case-fold, so "ＡＬＩＣＥ" and "Straße" compare sanely."""
    return unicodedata.normalize("NFKC", text).casefold()


@lru_cache(maxsize=1024)
def _name_re(folded_name: str) -> re.Pattern[str]:
    # Word boundaries apply only where the name's own edge is a word character, so a name
    # ending in punctuation ("Dr. Who?") still matches when glued to the next word, while
    # "Al" never matches inside "Alice". Whitespace inside a name matches any whitespace.
    words = r"\s+".join(re.escape(part) for part in folded_name.split())
    head = r"(?<!\w)" if re.match(r"\w", folded_name) else ""
    tail = r"(?!\w)" if re.match(r"\w", folded_name[-1]) else ""
    return re.compile(head + words + tail)


def _names_persona(body: str, persona: PersonaView) -> bool:
    if not body:
        return False
    text = _fold(body)
    for name in (persona.displayname, persona.localpart):
        if not name:
            continue
        folded = " ".join(_fold(name).split())
        if folded and _name_re(folded).search(text):
            return True
    return False


def name_position(body: str, persona: PersonaView) -> int | None:
    """Where ``body`` first names ``persona`` (a pill, its display name or its localpart),
    as an offset in the folded text; None when it does not. Orders the personas a
    message names (scenes with ``--order mention``)."""
    if not body:
        return None
    text = _fold(body)
    found: list[int] = []
    mxid = persona.mxid.casefold()
    if mxid and (match := _bare_mxid_re(mxid).search(text)) is not None:
        found.append(match.start())
    for name in (persona.displayname, persona.localpart):
        if not name:
            continue
        folded = " ".join(_fold(name).split())
        if folded and (match := _name_re(folded).search(text)) is not None:
            found.append(match.start())
    return min(found) if found else None
