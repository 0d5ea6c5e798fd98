"""Sending as a persona or the bot: stable transaction ids, typing, stored outbound."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar, cast

from aiohttp import ClientError
from mautrix.appservice import IntentAPI
from mautrix.errors import (
    MatrixConnectionError,
    MatrixRequestError,
    MForbidden,
    MLimitExceeded,
    MNotFound,
)
from mautrix.types import (
    EventID,
    EventType,
    MessageType,
    PaginationDirection,
    TextMessageEventContent,
)

from .. import metrics
from ..db.messages import MessageStore
from .content import ANSWERS_KEY, MAX_CONTENT_BYTES, content_bytes, stored_from_event
from .crypto import Encryption

log = logging.getLogger("hivebridge.sender")


def encrypted_bytes(content: dict[str, Any]) -> int:
    """About how big ``content`` is once Megolm-encrypted: base64 (4/3) of the plain
    event as mautrix writes it (ASCII-escaped JSON: "ü" takes six bytes), plus the
    room id, type, MAC and the envelope's keys."""
    return len(json.dumps(content)) * 4 // 3 + 1_500


#: Sends that fail on the way (connection refused, timeout, 5xx, 429) are retried
#: with exponential backoff from this first pause, up to SEND_RETRY_MAX_DELAY_S ...
SEND_RETRY_FIRST_DELAY_S = 0.5
SEND_RETRY_MAX_DELAY_S = 8.0
#: ... for at most this long in all, then the error is raised.
SEND_RETRY_FOR_S = 90.0
#: How many events of a persona a resume reads back when looking for its posted reply.
FIND_REPLY_SCAN = 200

T = TypeVar("T")


def send_error_kind(exc: BaseException) -> str | None:
    """The ``kind`` label of a failed homeserver call; None when it is not a send failure."""
    if isinstance(exc, MLimitExceeded):
        return "rate_limited"
    if isinstance(exc, MatrixRequestError):
        if exc.http_status == 429:  # a 429 without the M_LIMIT_EXCEEDED errcode
            return "rate_limited"
        if isinstance(exc, MForbidden) or exc.http_status == 403:
            return "forbidden"
        if isinstance(exc, MNotFound) or exc.http_status == 404:
            return "not_found"
        return "http"
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, MatrixConnectionError | ClientError | OSError):
        return "network"
    return None


async def counted(call: Awaitable[T]) -> T:
    """Await a homeserver call, counting its failure by kind (then re-raising it).

    mautrix raises instead of retrying a 429, so each one is also counted as the
    homeserver rate limiting us: the signal to raise the appservice's limits.
    """
    try:
        return await call
    except Exception as e:
        kind = send_error_kind(e)
        if kind is not None:
            metrics.MATRIX_SEND_ERRORS.labels(metrics.bounded(kind, metrics.SEND_ERROR_KINDS)).inc()
            if kind == "rate_limited":
                metrics.HOMESERVER_RATE_LIMITED.inc()
        raise


def retryable(exc: BaseException) -> bool:
    """A failure worth retrying: the homeserver unreachable, overloaded or restarting.

    4xx answers other than 429 (forbidden, not found, bad request) are final.
    """
    if isinstance(exc, MatrixRequestError):
        return exc.http_status == 429 or exc.http_status >= 500
    return isinstance(exc, MatrixConnectionError | ClientError | OSError | asyncio.TimeoutError)


async def with_retries(
    call: Callable[[], Awaitable[T]], *, retry_for_s: float = SEND_RETRY_FOR_S, what: str = "send"
) -> T:
    """Run ``call`` until it succeeds, retrying retryable failures with backoff (bounded).

    mautrix's IntentAPI does not retry, so a homeserver restart of a few seconds
    would otherwise cost every reply in flight. Retrying a send is safe because
    every send carries a stable transaction id (see :func:`stable_txn_id`).
    """
    deadline = time.monotonic() + retry_for_s
    delay = SEND_RETRY_FIRST_DELAY_S
    while True:
        try:
            return await call()
        except Exception as e:
            if not retryable(e) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(e).__name__, e, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, SEND_RETRY_MAX_DELAY_S)


def fitted(
    build: Callable[[str, str | None], TextMessageEventContent],
    text: str,
    html: str | None,
    size: Callable[[dict[str, Any]], int] = content_bytes,
) -> TextMessageEventContent:
    """The content ``build`` makes, kept under :data:`MAX_CONTENT_BYTES` as ``size``
    measures it (:func:`encrypted_bytes` for what goes out encrypted).

    Callers split long replies beforehand; this is the last guard: HTML goes
    first, then the text is shortened, so an oversized event never reaches the
    homeserver (which would refuse it and fail the whole reply).
    """
    content = build(text, html)
    if size(content.serialize()) <= MAX_CONTENT_BYTES:
        return content
    content = build(text, None)
    shortened = False
    while size(content.serialize()) > MAX_CONTENT_BYTES and len(text) > 1:
        text, shortened = text[: len(text) * 3 // 4], True
        content = build(text + " …", None)
    log.warning(
        "a message over %d bytes was sent %s to fit one event",
        MAX_CONTENT_BYTES,
        "shortened, without HTML," if shortened else "without HTML",
    )
    return content


def stable_txn_id(*parts: str) -> str:
    """A transaction id derived from what the message answers.

    A retried or resumed send reuses it, so Synapse can answer with the event it
    already made instead of posting again. For appservice users (no device id)
    that dedupe is Synapse's in-memory HttpTransactionCache only, keyed by the
    request path (room and txn id) and the appservice: it is lost when Synapse
    restarts and forgotten after 30-60 minutes (the persistent
    event_txn_id_device_id table needs a device). So it covers retries and quick
    bridge restarts; a resumed reply also looks for one already posted
    (:meth:`Sender.find_reply`) before sending.
    """
    return "hb" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


class Sender:
    def __init__(
        self,
        messages: MessageStore,
        *,
        retry_for_s: float = SEND_RETRY_FOR_S,
        encryption: Encryption | None = None,
    ) -> None:
        """``encryption``: messages into encrypted rooms go out encrypted by the sending
        user's device (and not at all when that fails)."""
        self.messages = messages
        #: How long one send keeps retrying while the homeserver is unreachable.
        self.retry_for_s = retry_for_s
        self.encryption = encryption

    async def _encrypted(self, intent: IntentAPI, room_id: str) -> bool:
        """Whether what ``intent`` sends to ``room_id`` goes out encrypted."""
        enc = self.encryption
        if enc is None:
            return False
        mxid = str(intent.mxid)
        return await with_retries(
            lambda: enc.is_encrypted(room_id, mxid), retry_for_s=self.retry_for_s, what="room state"
        )

    async def _seal(
        self, intent: IntentAPI, room_id: str, content: TextMessageEventContent, encrypted: bool
    ) -> tuple[EventType, Any]:
        """What goes on the wire: the message itself, or, in an encrypted room with
        encryption on, its Megolm ciphertext (encrypted once: retries resend the same)."""
        enc = self.encryption
        if enc is None or not encrypted:
            return EventType.ROOM_MESSAGE, content
        mxid = str(intent.mxid)
        ciphertext = await with_retries(
            lambda: enc.encrypt(mxid, room_id, EventType.ROOM_MESSAGE, content),
            retry_for_s=self.retry_for_s,
            what="encrypt",
        )
        return EventType.ROOM_ENCRYPTED, ciphertext

    async def _deliver(
        self,
        intent: IntentAPI,
        room_id: str,
        build: Callable[[str, str | None], TextMessageEventContent],
        text: str,
        html: str | None,
        *,
        txn_id: str,
        what: str = "send",
    ) -> tuple[TextMessageEventContent, EventID]:
        """Build, fit, seal and send one message; the content sent and its event id.

        New messages and edits go out the same way, so both are kept under the size
        limit as the room will carry them and both are encrypted where the room is.
        """
        encrypted = await self._encrypted(intent, room_id)
        content = fitted(build, text, html, encrypted_bytes if encrypted else content_bytes)
        event_type, payload = await self._seal(intent, room_id, content, encrypted)
        event_id = await with_retries(
            lambda: counted(
                intent.send_message_event(
                    room_id,  # type: ignore[arg-type]
                    event_type,
                    payload,
                    txn_id=txn_id,
                )
            ),
            retry_for_s=self.retry_for_s,
            what=what,
        )
        return content, event_id

    async def typing(self, intent: IntentAPI, room_id: str, on: bool) -> None:
        try:
            await counted(intent.set_typing(room_id, timeout=30_000 if on else 0))  # type: ignore[arg-type]
        except Exception as e:  # typing is cosmetic; never fail a reply over it
            log.debug("typing failed in %s: %s", room_id, e)

    async def send_text(
        self,
        intent: IntentAPI,
        room_id: str,
        text: str,
        *,
        txn_id: str,
        notice: bool = False,
        html: str | None = None,
        persona: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        def build(text: str, html: str | None) -> TextMessageEventContent:
            content = TextMessageEventContent(
                msgtype=MessageType.NOTICE if notice else MessageType.TEXT, body=text
            )
            if html:
                content.format = "org.matrix.custom.html"  # type: ignore[assignment]
                content.formatted_body = html
            for key, value in (extra or {}).items():
                content[key] = value
            return content

        content, event_id = await self._deliver(intent, room_id, build, text, html, txn_id=txn_id)
        if persona is not None and not notice:  # a persona's answer, not a notice
            metrics.MATRIX_REPLIES_SENT.labels(metrics.persona_label(persona)).inc()
        # A message is stored unhandled: when the homeserver echoes it back, intake
        # routes it once, so other personas in the room can be addressed by it. A
        # notice triggers nobody and is no turn: it is stored handled, or every
        # restart would count it among the unfinished work and route it again.
        row = stored_from_event(
            {
                "type": "m.room.message",
                "event_id": str(event_id),
                "room_id": room_id,
                "sender": str(intent.mxid),
                "content": content.serialize(),
                "origin_server_ts": int(time.time() * 1000),
            },
            persona=persona,
        )
        if row is not None:
            await self.messages.insert(replace(row, handled=notice))
        return str(event_id)

    async def edit_text(
        self,
        intent: IntentAPI,
        room_id: str,
        event_id: str,
        text: str,
        *,
        txn_id: str,
        html: str | None = None,
        persona: str | None = None,
    ) -> str:
        """Replace the text of ``event_id`` (m.replace); clients show the new content."""

        def build(text: str, html: str | None) -> TextMessageEventContent:
            content = TextMessageEventContent(msgtype=MessageType.TEXT, body=text)
            if html:
                content.format = "org.matrix.custom.html"  # type: ignore[assignment]
                content.formatted_body = html
            # mautrix serializes an edit with m.new_content and the "* " fallback body.
            content.set_edit(event_id)  # type: ignore[arg-type]
            return content

        _, edit_id = await self._deliver(
            intent, room_id, build, text, html, txn_id=txn_id, what="edit"
        )
        metrics.MATRIX_EDITS_SENT.labels(metrics.persona_label(persona)).inc()
        return str(edit_id)

    async def find_reply(
        self, intent: IntentAPI, room_id: str, answers: str, since_ts: int
    ) -> str | None:
        """The event id of a reply by ``intent``'s user to ``answers`` already in the room.

        A resumed reply asks before sending: stored outbound first (written right
        after a send returned), then the room itself, newest first, back to
        ``since_ts``, for a message of that user carrying :data:`ANSWERS_KEY`. The
        room covers what Synapse's transaction cache may not (see
        :func:`stable_txn_id`): a send that landed just before the crash.
        """
        sender = str(intent.mxid)
        for m in await self.messages.recent(room_id, since_ts, FIND_REPLY_SCAN):
            if m.sender == sender and m.content.get(ANSWERS_KEY) == answers:
                return m.event_id
        token: str | None = None
        seen = 0
        query = {"senders": [sender], "types": ["m.room.message"]}
        while seen < FIND_REPLY_SCAN:

            async def page_from(start: str | None = token) -> tuple[str | None, list[Any]]:
                page = await intent.get_messages(
                    room_id,  # type: ignore[arg-type]
                    PaginationDirection.BACKWARD,
                    from_token=start,  # type: ignore[arg-type]
                    limit=50,
                    filter_json=query,
                )
                # PaginatedMessages(start, end, events); mypy cannot see its fields.
                _, end, events = cast("tuple[str, str | None, list[Any]]", page)
                return end, events

            end, events = await with_retries(
                page_from, retry_for_s=self.retry_for_s, what="room scan"
            )
            for event in events:
                seen += 1
                if event.timestamp < since_ts:
                    return None
                content = event.content.serialize() if event.content else {}
                if content.get(ANSWERS_KEY) == answers:
                    return str(event.event_id)
            if not events or not end:
                return None
            token = end
        return None
