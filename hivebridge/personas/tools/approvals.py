"""Approvals for tools with side effects: a trusted user in the room says yes or no.

The reply that wants such a call posts a request and waits (with a timeout);
a trusted user answers with a reaction on the request (✅ 👍 yes, ❌ 👎 no) or
with ``!approve`` / ``!deny`` in the room. Answers are taken as the events
arrive (:meth:`Approvals.offer`, called before the room's ordered queue), since
the reply waiting for them holds that queue; the ``!approve`` command itself
runs later, in order, and reports what its message decided (:meth:`outcome_of`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger("hivebridge.tools")

YES = frozenset({"✅", "✔️", "✔", "👍", "👍️"})
NO = frozenset({"❌", "✖️", "👎", "👎️", "🚫"})
#: Answers remembered for the ``!approve`` commands that carried them.
MAX_OUTCOMES = 256

Decision = Literal["approved", "denied", "timeout"]


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    by: str | None = None  # who decided; None on a timeout


@dataclass(eq=False)
class _Pending:
    room_id: str
    what: str  # "Ada: send_mail(to=…)", for the answers
    future: asyncio.Future[Verdict]
    request_event: str | None = None
    created: float = field(default_factory=time.monotonic)


class Approvals:
    """Pending approval requests by room; answers come from :meth:`offer`."""

    def __init__(self, is_trusted: Callable[[str], bool], *, command_prefix: str = "!") -> None:
        self.is_trusted = is_trusted
        self.prefix = command_prefix
        self._pending: dict[str, list[_Pending]] = {}
        self._outcomes: OrderedDict[str, str] = OrderedDict()

    def pending(self, room_id: str) -> int:
        return len(self._pending.get(room_id, ()))

    async def request(
        self,
        room_id: str,
        what: str,
        post: Callable[[str], Awaitable[str]],
        timeout_s: float,
    ) -> Verdict:
        """Post the request (``post`` sends it, returns its event id) and wait for an answer."""
        loop = asyncio.get_running_loop()
        entry = _Pending(room_id, what, loop.create_future())
        self._pending.setdefault(room_id, []).append(entry)
        try:
            minutes = max(1, round(timeout_s / 60))
            entry.request_event = await post(
                f"🔐 {what} needs approval: a trusted user reacts ✅ (or {self.prefix}approve) "
                f"to run it, ❌ (or {self.prefix}deny) to refuse; "
                f"it is refused in {minutes} min otherwise."
            )
            return await asyncio.wait_for(asyncio.shield(entry.future), timeout_s)
        except TimeoutError:
            return Verdict("timeout")
        finally:
            waiting = self._pending.get(room_id, [])
            if entry in waiting:
                waiting.remove(entry)
            if not waiting:
                self._pending.pop(room_id, None)

    def offer_reaction(self, room_id: str, sender: str, relates_to: str, key: str) -> bool:
        """A reaction: True when it answered a request."""
        if key not in YES | NO:
            return False
        for entry in self._pending.get(room_id, ()):
            if entry.request_event == relates_to and not entry.future.done():
                if not self.is_trusted(sender):
                    log.info("ignoring an approval by %s (not trusted)", sender)
                    return False
                entry.future.set_result(Verdict("approved" if key in YES else "denied", sender))
                return True
        return False

    def offer_command(self, room_id: str, sender: str, event_id: str, body: str) -> bool:
        """``!approve`` / ``!deny``: answer the room's oldest request; True if it was one.

        What happened is kept for :meth:`outcome_of`, so the command (run later,
        in the room's order) can say so.
        """
        word = body.strip().lower()
        if word not in (f"{self.prefix}approve", f"{self.prefix}deny"):
            return False
        approve = word.endswith("approve")
        waiting = [e for e in self._pending.get(room_id, ()) if not e.future.done()]
        if not waiting:
            outcome = "Nothing here is waiting for approval."
        elif not self.is_trusted(sender):
            outcome = "Only trusted users can approve or deny a tool."
        else:
            entry = waiting[0]
            entry.future.set_result(Verdict("approved" if approve else "denied", sender))
            outcome = f"{'Approved' if approve else 'Denied'}: {entry.what}."
        self._outcomes[event_id] = outcome
        while len(self._outcomes) > MAX_OUTCOMES:
            self._outcomes.popitem(last=False)
        return True

    def outcome_of(self, event_id: str) -> str | None:
        return self._outcomes.get(event_id)
