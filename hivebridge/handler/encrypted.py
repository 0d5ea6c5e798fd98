"""Encrypted rooms are never silent: what personas cannot read, they say so.

With encryption off (``encryption.enabled: false``) personas cannot decrypt
``m.room.encrypted`` events. Rather than ignore one, the persona it is
addressed to posts a notice saying it cannot read encrypted messages and what
the room's members can do. Addressed means: any encrypted message in a direct
chat with the persona (two members), or, in a group, a reply to the persona or
a message in a thread on one of its messages (the relation stays unencrypted).
A persona, or the bot, that joins a room whose state has ``m.room.encryption``
says so as it joins.

Each of our users says it once per room. That fact is kept as room account
data of the user on the homeserver (:data:`NOTICE_KEY`), so a restart does
not repeat it and nothing of it lives in the bridge's database.

The handler reaches this module through two callbacks only
(``RoomEventHandler(on_encrypted=…)``, ``MembershipHandler(on_joined=…)``).

With encryption on, intake decrypts what it can and routes it as any message;
only an event whose room key never came (or was withheld) reaches
:class:`UnreadableMessages`, and the persona it was for says, encrypted, that it
could not read it: never a plain-text reply in an encrypted room.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mautrix.appservice import AppService, IntentAPI
from mautrix.errors import MNotFound
from mautrix.types import Event, EventType

from .. import metrics
from ..db.messages import MessageStore
from ..db.personas import Persona
from ..matrix.crypto import Encryption
from ..matrix.members import RoomMembers
from ..matrix.sender import Sender, stable_txn_id
from ..personas.directory import PersonaDirectory

log = logging.getLogger("hivebridge.encrypted")

#: Room account data of a user of ours that has said it cannot read the room.
NOTICE_KEY = "io.github.hivebridge.encrypted_notice"

_AFTER = "a room's encryption cannot be turned off once it is on"
DIRECT_TEXT = (
    "🔒 I can't read encrypted messages yet, so I can't answer in this room. To talk "
    f"with me, start a new direct chat with me with encryption turned off ({_AFTER})."
)
GROUP_TEXT = (
    "🔒 I can't read encrypted messages yet, so I can't answer in this room. To talk "
    f"with me, create a room with encryption turned off and invite me there ({_AFTER})."
)
BOT_TEXT = (
    "🔒 I can't read encrypted messages yet, so commands sent in this room go unanswered. "
    f"Send them from a room with encryption turned off and invite me there ({_AFTER})."
)


UNREAD_TEXT = (
    "🔒 I couldn't read a message from {sender}: its key never reached my device{why}. "
    "If your app only shares keys with verified sessions, verify me (or allow "
    "unverified sessions) and send it again."
)
#: What a withheld code means, in the notice.
WITHHELD_WHY = {
    "m.unverified": " (your app withheld it: my session is not verified)",
    "m.blacklisted": " (your app withheld it: my session is blocked)",
    "m.unauthorised": " (the sender's app did not allow it)",
    "m.unavailable": " (the sender's app no longer has it)",
    "m.no_olm": " (no secure channel to my device could be set up)",
}


class UnreadableMessages:
    """An encrypted message none of our users could decrypt in time: one notice per
    sender session, in the room, from the persona it was for (else one persona of the
    room, else the bot), encrypted as the room is."""

    def __init__(
        self,
        encryption: Encryption,
        appservice: AppService,
        personas: PersonaDirectory,
        members: RoomMembers,
        messages: MessageStore,
        sender: Sender,
    ) -> None:
        self.encryption = encryption
        self.appservice = appservice  # its intent exists only once started
        self.personas = personas
        self.members = members
        self.messages = messages
        self.sender = sender
        self._told: set[tuple[str, str, str]] = set()  # (room, sender, megolm session)

    async def on_encrypted(self, room_id: str, event: Event) -> None:
        sender = str(event.sender)
        if self.personas.is_ours(sender):
            return
        content = _content(event)
        session = str(content.get("session_id") or "")
        key = (room_id, sender, session)
        if key in self._told:
            return
        members = await self.members.joined(room_id)
        persona = await _addressed(self.personas, self.messages, event, members)
        if persona is None:
            here = sorted(p.name for m in members if (p := self.personas.get(m)) is not None)
            persona = (
                self.personas.get(self.personas.config.persona_mxid(here[0])) if here else None
            )
        if persona is not None:
            intent, who = self.personas.intent(persona), persona.name
        elif self.personas.bot_mxid in members:  # a room of the bot's only: it says so
            intent, who = self.appservice.intent, "the bot"
        else:
            return
        self._told.add(key)
        metrics.ENCRYPTED_UNANSWERED.inc()
        code = self.encryption.withheld.get(session, "")
        why = WITHHELD_WHY.get(code, f" ({code})" if code else "")
        log.info("%s could not decrypt %s from %s%s", who, event.event_id, sender, why,
                 extra={"room_id": room_id})  # fmt: skip
        text = UNREAD_TEXT.format(sender=sender, why=why)
        txn_id = stable_txn_id(str(event.event_id), "unreadable")
        await self.sender.send_text(intent, room_id, text, txn_id=txn_id, notice=True)
        metrics.ENCRYPTED_NOTICES.labels("unreadable").inc()


class EncryptedRoomNotices:
    """Tells a room, once per user of ours, that encrypted messages go unread."""

    def __init__(
        self,
        appservice: AppService,
        personas: PersonaDirectory,
        members: RoomMembers,
        messages: MessageStore,
        sender: Sender,
    ) -> None:
        self.appservice = appservice
        self.personas = personas
        self.members = members
        self.messages = messages
        self.sender = sender
        self._said: set[tuple[str, str]] = set()  # (room, user) known to have said it

    async def on_encrypted(self, room_id: str, event: Event) -> None:
        """An ``m.room.encrypted`` event: the persona it is addressed to says it cannot read it."""
        if self.personas.is_ours(str(event.sender)):
            return
        members = await self.members.joined(room_id)
        persona = await _addressed(self.personas, self.messages, event, members)
        if persona is None:
            return
        metrics.ENCRYPTED_UNANSWERED.inc()
        log.info("%s cannot read an encrypted message", persona.name, extra={"room_id": room_id})
        text = DIRECT_TEXT if len(members) == 2 else GROUP_TEXT
        txn_id = stable_txn_id(str(event.event_id), "encrypted")
        await self._say(room_id, self.personas.intent(persona), text, txn_id, "message")

    async def on_joined(self, room_id: str, mxid: str) -> None:
        """One of our users joined ``room_id``: if the room is encrypted, it says so."""
        if mxid == self.personas.bot_mxid:
            intent, text = self.appservice.intent, BOT_TEXT
        else:
            persona = self.personas.get(mxid)
            if persona is None:
                return
            intent = self.personas.intent(persona)
            text = DIRECT_TEXT if len(await self.members.joined(room_id)) == 2 else GROUP_TEXT
        try:
            await intent.get_state_event(room_id, EventType.ROOM_ENCRYPTION)  # type: ignore[arg-type]
        except MNotFound:
            return  # not encrypted
        await self._say(room_id, intent, text, stable_txn_id(room_id, mxid, "encrypted"), "join")

    async def _say(
        self, room_id: str, intent: IntentAPI, text: str, txn_id: str, trigger: str
    ) -> None:
        """Post ``text`` as ``intent``'s user unless it said so in this room before."""
        key = (room_id, str(intent.mxid))
        if key in self._said:
            return
        if await self._said_before(intent, room_id):
            self._said.add(key)
            return
        event_id = await self.sender.send_text(intent, room_id, text, txn_id=txn_id, notice=True)
        self._said.add(key)
        metrics.ENCRYPTED_NOTICES.labels(trigger).inc()
        record: dict[str, Any] = {"event_id": event_id, "sent_at": int(time.time() * 1000)}
        try:
            await intent.set_account_data(NOTICE_KEY, record, room_id)  # type: ignore[arg-type]
        except Exception as e:  # this run remembers it anyway
            log.warning("could not record the encrypted-room notice: %s", e)

    async def _said_before(self, intent: IntentAPI, room_id: str) -> bool:
        try:
            data = await intent.get_account_data(NOTICE_KEY, room_id)  # type: ignore[arg-type]
        except MNotFound:
            return False
        return bool(data)


async def _addressed(
    personas: PersonaDirectory, messages: MessageStore, event: Event, members: list[str]
) -> Persona | None:
    """The persona an encrypted event speaks to, from what is not encrypted."""
    here = [p for m in members if (p := personas.get(m)) is not None]
    if not here:
        return None
    if len(members) == 2:
        return here[0]  # a direct chat: every message is for the persona
    relates = _content(event).get("m.relates_to")
    if not isinstance(relates, dict):
        return None
    reply = relates.get("m.in_reply_to")
    targets = [reply.get("event_id") if isinstance(reply, dict) else None]
    if relates.get("rel_type") == "m.thread":
        targets.append(relates.get("event_id"))
    for target in targets:
        if not isinstance(target, str):
            continue
        replied = await messages.get(target)
        persona = personas.get(replied.sender) if replied is not None else None
        if persona is not None and persona in here:
            return persona
    return None


def _content(event: Event) -> dict[str, Any]:
    """The event's content as plain JSON, whatever shape mautrix parsed it into."""
    content = getattr(event, "content", None)
    try:
        data = content.serialize() if content is not None else {}
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}
