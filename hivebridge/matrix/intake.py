"""Appservice intake: authenticate, deduplicate, store, and queue per room.

mautrix's AppService keeps seen transaction ids in memory only and answers 200
even when handling failed. Here the transaction id and every message it brings
are written in one database transaction before we answer, so a transaction
retried by Synapse — also after a restart — is processed once, and a failure
answers 500 so that Synapse retries instead of dropping the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from mautrix.appservice import AppService
from mautrix.types import DeviceLists, Event, EventType, Membership
from mautrix.util.async_db.connection import LoggingConnection

from .. import metrics
from ..bounded import RecentSet
from ..db.messages import MessageStore, StoredMessage
from ..db.resilience import is_connection_lost
from ..db.summaries import SummaryStore
from ..db.txns import TxnStore
from ..db.unread import UnreadStore
from .content import edit_of, edited_content, redacted_id, stored_from_event, without_quote
from .crypto import Encryption, Undecryptable

log = logging.getLogger("hivebridge.intake")

#: Failed transactions remembered in case their COMMIT landed after all (see Intake).
MAX_UNSETTLED = 1024
#: Transaction ids answered from memory; older retries are found in the database.
MAX_SEEN_TRANSACTIONS = 4096

#: The largest transaction body taken by default. Synapse caps a transaction at 100
#: events but not in bytes; an event is at most 64 KiB as canonical JSON, and Synapse
#: sends it ASCII-escaped (a 2- or 4-byte character becomes a 6- or 12-byte escape, so
#: up to 3x), plus ephemeral and to-device events: 100 x 64 KiB x 3 rounded up. A body
#: refused for its size would be retried by Synapse forever, blocking every later event.
DEFAULT_MAX_BODY_BYTES = 32 * 2**20

#: Deeper events are skipped (logged), not stored: storing them would fail the whole
#: transaction, and Synapse would retry it forever. Real events nest a few levels.
MAX_EVENT_DEPTH = 64

EventSink = Callable[[Event, "StoredMessage | None"], Awaitable[None] | None]
"""Receives each event in order, with its stored row when it is a message to route."""


def transaction_key(txn_id: str, events: list[Any], extra: Any = None) -> str:
    """The transaction id plus a digest of what it carries.

    Synapse on SQLite numbers appservice transactions anew after it restarts,
    so an id alone can name a different transaction than the one we processed;
    a retry of the same transaction carries the same events and the same key.
    ``extra``: what else it carries (to-device events, device lists), which has no
    event ids: a transaction of room keys only must not pass for an old one.
    """
    ids = "\x1f".join(str(e.get("event_id", "")) if isinstance(e, dict) else "?" for e in events)
    if extra:
        ids += "\x1e" + json.dumps(extra, sort_keys=True, default=str)
    return f"{txn_id}:{hashlib.sha256(ids.encode()).hexdigest()[:16]}"


def _field(data: dict[str, Any], name: str, unstable: str) -> Any:
    """A transaction field by its stable name or its unstable (MSC) one."""
    value = data.get(name)
    return value if value is not None else data.get(f"{unstable}.{name}")


class Intake(AppService):
    """The appservice HTTP side, with persisted transaction and message dedupe."""

    def __init__(
        self,
        *,
        messages: MessageStore,
        txns: TxnStore,
        is_own_user: Callable[[str], bool] = lambda _: True,
        summaries: SummaryStore | None = None,
        encryption: Encryption | None = None,
        key_wait_s: float = 30.0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        unread: UnreadStore | None = None,
        **kwargs: Any,
    ) -> None:
        """``summaries``: chapter summaries a redaction must drop (None: none kept).
        ``encryption``: decrypt encrypted room events and take in the keys that
        transactions bring; an event whose key has not come waits up to ``key_wait_s``
        for it, then goes to the sink still encrypted (unreadable); ``unread`` keeps
        the waiting ones over a restart (:meth:`resume_unread`). ``max_body_bytes``:
        the largest transaction taken."""
        params = dict(kwargs.pop("aiohttp_params", None) or {})
        params["client_max_size"] = max_body_bytes
        super().__init__(aiohttp_params=params, **kwargs)
        self.runner = None  # mautrix only sets it in start(); stop() must work before that
        self._is_own = is_own_user
        self.messages = messages
        self.txns = txns
        self.summaries = summaries
        self._sink: EventSink | None = None
        # Transactions answered 500 that may have committed anyway (the connection was
        # lost with the COMMIT's answer): their retry delivers instead of skipping.
        self._unsettled: dict[str, None] = {}
        # mautrix keeps every id ever seen in a set; the database is the real record.
        self.transactions = RecentSet(MAX_SEEN_TRANSACTIONS)  # type: ignore[assignment]
        self.encryption = encryption
        self.key_wait_s = key_wait_s
        self.unread = unread
        self._waiting: set[asyncio.Task[None]] = set()
        # The state store learns membership from the events we pass it ourselves,
        # in order, before routing; not as a racing background handler.
        self.event_handlers.clear()

    async def start(  # type: ignore[override]
        self, host: str = "127.0.0.1", port: int = 8080, *, sink: EventSink
    ) -> None:
        """Listen for transactions; ``sink`` receives each event in order once stored."""
        self._sink = sink
        await super().start(host, port)

    async def stop_listening(self) -> None:
        """Take no more transactions; intents keep working until :meth:`stop`."""
        self.ready = False
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.cleanup()

    async def stop(self) -> None:
        """Stop listening (if still) and close the homeserver client; safe before start."""
        await self.stop_listening()
        # A copy: each task's done callback discards it from the set.
        waiting = list(self._waiting)
        for task in waiting:
            task.cancel()
        for task in waiting:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await super().stop()

    async def _http_handle_transaction(self, request: web.Request) -> web.Response:
        # Every push gets exactly one outcome: new, duplicate, or rejected (auth,
        # bad body, or a failure answered 500 so the homeserver pushes it again).
        outcomes = metrics.MATRIX_TRANSACTIONS
        denied = self._auth_error(request)
        if denied is not None:
            outcomes.labels("rejected").inc()
            return denied
        try:
            data = await request.json()
        except web.HTTPRequestEntityTooLarge:
            outcomes.labels("rejected").inc()
            log.error(
                "a transaction of %s bytes is over appservice.max_transaction_size; "
                "the homeserver will retry it until the limit is raised",
                request.content_length,
            )
            return web.json_response(
                {"errcode": "M_TOO_LARGE", "error": "Transaction too large"}, status=413
            )
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            # RecursionError: nesting too deep for the parser (thousands of levels).
            outcomes.labels("rejected").inc()
            return web.json_response(
                {"errcode": "M_NOT_JSON", "error": "Body is not JSON"}, status=400
            )
        events = data.get("events") if isinstance(data, dict) else None
        if not isinstance(events, list):
            outcomes.labels("rejected").inc()
            return web.json_response(
                {"errcode": "M_BAD_JSON", "error": "Missing events array"}, status=400
            )
        to_device = _field(data, "to_device", "de.sorunome.msc2409") or []
        device_lists = _field(data, "device_lists", "org.matrix.msc3202")
        otk_counts = _field(data, "device_one_time_keys_count", "org.matrix.msc3202") or {}
        extra = [to_device, device_lists] if to_device or device_lists else None
        txn_id = transaction_key(request.match_info["transaction_id"], events, extra)
        if txn_id in self.transactions:
            outcomes.labels("duplicate").inc()
            return web.json_response({})
        try:
            fresh = await self.process_transaction(
                txn_id,
                events,
                to_device=to_device if isinstance(to_device, list) else [],
                device_lists=device_lists if isinstance(device_lists, dict) else None,
                otk_counts=otk_counts if isinstance(otk_counts, dict) else {},
            )
        except Exception as e:
            self._unsettle(txn_id)
            if is_connection_lost(e):
                log.warning(
                    "transaction %s failed, database connection lost (%s); "
                    "the homeserver will retry it",
                    txn_id,
                    type(e).__name__,
                )
            else:
                log.exception("transaction %s failed; the homeserver will retry it", txn_id)
            outcomes.labels("rejected").inc()
            return web.json_response(
                {"errcode": "M_UNKNOWN", "error": "Transaction failed"}, status=500
            )
        outcomes.labels("new" if fresh else "duplicate").inc()
        self.transactions.add(txn_id)
        return web.json_response({})

    def _auth_error(self, request: web.Request) -> web.Response | None:
        """401 without a token, 403 with a wrong one (the appservice spec's codes).

        The token is read from the Authorization header only: a query string
        ends up in access logs and proxies. It is compared in constant time.
        """
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
        if not token:
            error = (
                "hs_token must be sent in the Authorization header"
                if "access_token" in request.query
                else "Missing hs_token"
            )
            return web.json_response({"errcode": "M_UNAUTHORIZED", "error": error}, status=401)
        if not hmac.compare_digest(token.encode(), self.hs_token.encode()):
            return web.json_response(
                {"errcode": "M_FORBIDDEN", "error": "Invalid hs_token"}, status=403
            )
        return None

    def _check_token(self, request: web.Request) -> bool:
        """mautrix's own routes (ping, user and alias queries) authenticate here too."""
        return self._auth_error(request) is None

    def _unsettle(self, txn_id: str) -> None:
        self._unsettled[txn_id] = None
        while len(self._unsettled) > MAX_UNSETTLED:
            del self._unsettled[next(iter(self._unsettled))]

    async def process_transaction(
        self,
        txn_id: str,
        events: list[Any],
        *,
        to_device: list[Any] | None = None,
        device_lists: dict[str, Any] | None = None,
        otk_counts: dict[str, Any] | None = None,
    ) -> bool:
        """Store and deliver a transaction; False when it was processed before (a retry).

        Nothing is delivered before the commit, and an exception leaves here only
        before delivery; so a transaction that failed but committed all the same
        (its connection died with the COMMIT's answer) has delivered nothing, and
        its retry delivers the messages still unhandled instead of dropping them.

        With encryption, the keys the transaction brings are taken in first, then
        its encrypted events are decrypted and stored like any message; one whose
        key is still missing waits for it (:meth:`_read_later`).
        """
        events = [raw for raw in events if _shallow(raw)]
        unread: list[dict[str, Any]] = []
        if self.encryption is not None:
            await self.encryption.take_transaction(
                to_device or [],
                DeviceLists.deserialize(cast(Any, device_lists)) if device_lists else None,
                otk_counts or {},
            )
            events = [await self._open(raw, unread) for raw in events]
        now = int(time.time() * 1000)
        rows = [
            r
            for raw in events
            if isinstance(raw, dict) and (r := stored_from_event(raw, received_ms=now))
        ]
        if await self.txns.is_processed(txn_id):
            if txn_id not in self._unsettled:
                log.debug("transaction %s already processed", txn_id)
                return False
            log.info("transaction %s had committed before it failed; delivering it now", txn_id)
            fresh = await self._unrouted(rows)
        else:
            fresh = await self._store(txn_id, rows, events, unread, now)
        self._unsettled.pop(txn_id, None)
        # Counted once committed, so a transaction that failed and is retried counts once.
        for raw in events:
            kind = raw.get("type") if isinstance(raw, dict) else None
            metrics.MATRIX_EVENTS.labels(metrics.event_type_label(kind)).inc()
        # The transaction is committed: from here on one bad event must not fail it
        # (a 500 would make the homeserver retry a transaction we already took).
        for raw in events:
            if any(raw is u for u in unread):
                self._wait_for_key(raw, now)
                continue
            try:
                await self._deliver(raw, fresh)
            except Exception as e:
                log.warning("skipping an event that could not be handled: %s", type(e).__name__)
        return True

    # Encrypted events ------------------------------------------------------------------

    async def _open(self, raw: Any, unread: list[dict[str, Any]]) -> Any:
        """The plain event of an encrypted one we can read now; else ``raw`` itself (an
        encrypted event without its key is added to ``unread``)."""
        if not isinstance(raw, dict) or raw.get("type") != "m.room.encrypted":
            return raw
        if "state_key" in raw or not isinstance(raw.get("room_id"), str):
            return raw
        try:
            return await self._decrypt(raw)
        except Undecryptable as e:
            log.debug("cannot decrypt %s yet: %s", raw.get("event_id"), e.reason)
            unread.append(raw)
            return raw
        except Exception as e:  # a malformed event must not fail the transaction
            log.warning("cannot decrypt %s: %s: %s", raw.get("event_id"), type(e).__name__, e)
            return raw

    async def _decrypt(self, raw: dict[str, Any]) -> dict[str, Any]:
        assert self.encryption is not None
        room_id = str(raw["room_id"])
        members = await self.state_store.get_members(
            room_id,  # type: ignore[arg-type]
            memberships=(Membership.JOIN,),
        )
        readers = [str(m) for m in members if self._is_own(str(m))]
        return await self.encryption.decrypt(raw, readers)

    def _wait_for_key(self, raw: dict[str, Any], received_at: int) -> None:
        task = asyncio.create_task(self._read_later(raw, received_at))
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    async def resume_unread(self, max_age_s: float) -> int:
        """After a restart: what was waiting for its key waits out the rest of its time
        (then it is read, or said unreadable); older than ``max_age_s`` it is dropped,
        as late replies are. Returns how many wait again."""
        if self.unread is None or self.encryption is None:
            return 0
        now = time.time()
        resumed = 0
        for waiting in await self.unread.all():
            event_id = str(waiting.event.get("event_id"))
            if now - waiting.received_at / 1000 > max_age_s:
                log.info("dropping %s: it waited for its key before a restart, too long ago",
                         event_id)  # fmt: skip
                await self.unread.remove(event_id)
                continue
            self._wait_for_key(waiting.event, waiting.received_at)
            resumed += 1
        if resumed:
            log.info("%d encrypted events wait for their keys again", resumed)
        return resumed

    async def _read_later(self, raw: dict[str, Any], received_at: int) -> None:
        """An encrypted event whose room key had not come: decrypt it when keys arrive,
        store and route it then; after ``key_wait_s`` (at once when the sender withheld
        the key) hand it to the sink still encrypted: the handler says it went unread."""
        assert self.encryption is not None
        loop = asyncio.get_running_loop()
        left_s = received_at / 1000 + self.key_wait_s - time.time()
        deadline = loop.time() + max(0.0, left_s)
        reason = "no room key"
        try:
            while True:
                try:
                    plain = await self._decrypt(raw)
                except Undecryptable as e:
                    reason = e.reason
                    if e.session_id in self.encryption.withheld:
                        break  # the sender said it will not send the key: no use waiting
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    await self.encryption.wait_for_keys(left)
                    continue
                row = stored_from_event(plain, received_ms=int(time.time() * 1000))
                fresh: dict[str, StoredMessage] = {}
                if row is not None and await self.messages.insert(row):
                    fresh[row.event_id] = row
                log.info("decrypted %s after its key arrived", raw.get("event_id"))
                await self._deliver(plain, fresh)
                await self._done_waiting(raw)
                return
            log.info("could not decrypt %s: %s", raw.get("event_id"), reason)
            await self._deliver(raw, {})
            await self._done_waiting(raw)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("encrypted event %s not handled: %s", raw.get("event_id"), e)

    async def _done_waiting(self, raw: dict[str, Any]) -> None:
        if self.unread is not None:
            await self.unread.remove(str(raw.get("event_id")))

    async def _unrouted(self, rows: list[StoredMessage]) -> dict[str, StoredMessage]:
        """The stored, not yet handled messages of a transaction that committed unseen."""
        found = {}
        for row in rows:
            known = await self.messages.get(row.event_id)
            if known is not None and not known.handled:
                found[row.event_id] = known
        return found

    async def _store(
        self,
        txn_id: str,
        rows: list[StoredMessage],
        events: list[Any],
        unread: list[dict[str, Any]],
        now: int,
    ) -> dict[str, StoredMessage]:
        """Store the messages and the encrypted events still waiting for their key,
        apply edits and redactions, and mark the transaction processed, in one DB
        transaction."""
        fresh: dict[str, StoredMessage] = {}
        conn: LoggingConnection
        async with self.messages.db.acquire() as conn, conn.transaction():
            new = await self.messages.insert_many(rows, conn)
            for row in rows:
                if row.event_id in new:
                    fresh[row.event_id] = row
                elif self._is_own(row.sender):
                    # Our own sends are stored by the sender before the echo arrives;
                    # they still need routing once (personas address each other).
                    known = await self.messages.get(row.event_id, conn)
                    if known is not None and known.persona and not known.handled:
                        fresh[row.event_id] = known
            for raw in events:
                if isinstance(raw, dict):
                    await self._apply_change(raw, conn)
            if self.unread is not None:
                for raw in unread:
                    await self.unread.add(raw, now, conn)
            await self.txns.mark_processed(txn_id, conn)
        return fresh

    async def _apply_change(self, raw: dict[str, Any], conn: LoggingConnection) -> None:
        """A human's edit goes onto the message it edits (prompts read the newest text);
        a redaction blanks its message and the quotes of it in replies, and drops the
        summaries that covered it."""
        room_id, sender = raw.get("room_id"), raw.get("sender")
        if not isinstance(room_id, str) or not isinstance(sender, str):
            return
        edit = edit_of(raw)
        if edit is not None and not self._is_own(sender):
            original = await self.messages.get(edit.event_id, conn)
            if (
                original is not None
                and original.room_id == room_id
                and original.sender == sender  # only its author may edit a message
                and original.persona is None
                and original.content  # not redacted
            ):
                content = edited_content(original.content, edit)
                await self.messages.set_text(original.event_id, edit.body, content, conn)
            return
        redacts = redacted_id(raw)
        if redacts is None:
            return
        original = await self.messages.get(redacts, conn)
        if original is None or original.room_id != room_id:
            return
        if original.sender != sender and not await self._may_redact(room_id, sender):
            log.info("ignoring a redaction by %s, who may not redact others' messages", sender)
            return
        ts = await self.messages.redact(room_id, redacts, conn)
        for reply in await self.messages.replies_to(room_id, redacts, conn):
            body, content = without_quote(reply.content)
            await self.messages.set_text(reply.event_id, body, content, conn)
        if ts is not None and self.summaries is not None:
            await self.summaries.delete_covering(room_id, ts, conn)

    async def _may_redact(self, room_id: str, sender: str) -> bool:
        """Whether ``sender``'s power level reaches the room's redact level (as last seen)."""
        levels = await self.state_store.get_power_levels(room_id)  # type: ignore[arg-type]
        if levels is None:
            return False
        return bool(levels.get_user_level(sender) >= levels.redact)  # type: ignore[arg-type]

    async def _deliver(self, raw: Any, fresh: dict[str, StoredMessage]) -> None:
        if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
            return
        if not isinstance(raw.get("room_id"), str):
            return
        self._fix_prev_content(cast(Any, raw))
        redacts = redacted_id(raw)
        if redacts is not None:
            raw = {**raw, "redacts": redacts}  # room v11 moved it into the content
        event = Event.deserialize(raw)
        if event.type is None:
            return
        if getattr(event, "state_key", None) is not None:
            event.type = event.type.with_class(EventType.Class.STATE)
            await self.state_store.update_state(event)
            if self.encryption is not None:
                self.encryption.on_state(event)
                if event.type == EventType.ROOM_MEMBER:
                    await self.encryption.on_member(event)
        else:
            event.type = event.type.with_class(EventType.Class.MESSAGE)
        if self._sink is None:
            return
        result = self._sink(event, fresh.get(str(getattr(event, "event_id", ""))))
        if result is not None:
            await result


def _shallow(raw: Any) -> bool:
    """False (and a warning) for an event nested deeper than :data:`MAX_EVENT_DEPTH`."""
    depth = json_depth(raw, MAX_EVENT_DEPTH + 1)
    if depth <= MAX_EVENT_DEPTH:
        return True
    event_id = raw.get("event_id") if isinstance(raw, dict) else None
    log.warning("skipping event %.80s: nested deeper than %d levels", event_id, MAX_EVENT_DEPTH)
    return False


def json_depth(value: Any, limit: int) -> int:
    """How deep ``value`` nests (a scalar is 0), counted up to ``limit``, without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            if depth >= limit:
                return limit
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth) for child in children)
    return deepest
