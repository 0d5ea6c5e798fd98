"""A human with an encrypting device, for the demo's encrypted DM and the e2e tests.

It is what a Matrix app does, built from mautrix's client crypto (an Olm
machine with an in-memory store, syncing in the background): it uploads its
device keys, shares a Megolm session with the room's members' devices before
its first message in an encrypted room (or withholds it from devices it does
not trust enough: ``min_trust``), and decrypts what the personas answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, cast

from mautrix.client import Client
from mautrix.client.encryption_manager import DecryptionDispatcher
from mautrix.client.state_store.memory import MemoryStateStore
from mautrix.crypto import OlmMachine
from mautrix.crypto import StateStore as CryptoStateStore
from mautrix.crypto.store.memory import MemoryCryptoStore
from mautrix.errors import DecryptionError
from mautrix.types import (
    DeviceID,
    EncryptedEvent,
    Event,
    EventType,
    Membership,
    MessageEvent,
    RoomCreatePreset,
    RoomID,
    TrustState,
    UserID,
)

from .client import MEGOLM, HumanClient, register_user

Plain = dict[str, Any]


class _StateStore(MemoryStateStore, CryptoStateStore):  # type: ignore[misc]
    async def find_shared_rooms(self, user_id: UserID) -> list[RoomID]:
        shared = []
        for room_id in list(self.members):
            member = await self.get_member(room_id, user_id)
            if member and member.membership == Membership.JOIN and await self.is_encrypted(room_id):
                shared.append(room_id)
        return shared


class EncryptingHuman:
    """A registered user with one encrypting device; :meth:`close` stops its sync."""

    def __init__(self, client: Client, machine: OlmMachine, plain: HumanClient) -> None:
        self.client = client
        self.machine = machine
        #: The same user through plain client-server calls (history as the server has it).
        self.plain = plain
        self.user_id = str(client.mxid)
        #: Every room message seen, decrypted where we could, oldest first, per room.
        self.timeline: dict[str, list[Plain]] = {}
        self._encrypted: list[EncryptedEvent] = []
        self._sync: asyncio.Future[Any] | None = None

    @classmethod
    async def create(
        cls,
        base_url: str,
        shared_secret: str,
        username: str,
        password: str = "hunter2-hive",
        *,
        min_trust: TrustState = TrustState.UNVERIFIED,
    ) -> EncryptingHuman:
        """Register ``username`` and start its device. ``min_trust``: the least trust a
        device needs to be sent room keys (Element's "only verified sessions" is
        ``CROSS_SIGNED_TRUSTED``: cross-signed by a user this one verified); devices
        below it get ``m.room_key.withheld``."""
        data = await register_user(base_url, shared_secret, username, password)
        user_id, device_id = UserID(data["user_id"]), DeviceID(data["device_id"])
        state = _StateStore()
        store = MemoryCryptoStore(user_id, "in memory")
        client = Client(
            mxid=user_id,
            device_id=device_id,
            base_url=base_url,
            token=data["access_token"],
            state_store=state,
            sync_store=store,
        )
        machine = OlmMachine(client, store, state)
        machine.send_keys_min_trust = min_trust
        client.crypto = machine
        # Decrypting is ours (retried until the key has come), not the dispatcher's.
        client.remove_dispatcher(DecryptionDispatcher)
        await machine.load()
        await machine.share_keys()
        human = cls(client, machine, HumanClient(base_url, user_id, data["access_token"]))
        client.add_event_handler(EventType.ALL, human._on_event)
        human._sync = client.start(None)
        return human

    async def __aenter__(self) -> EncryptingHuman:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self.client.stop()
        await self.client.api.session.close()
        await self.plain.close()

    async def _on_event(self, event: Event) -> None:
        if isinstance(event, EncryptedEvent):
            self._encrypted.append(event)
        elif isinstance(event, MessageEvent) and event.type == EventType.ROOM_MESSAGE:
            self._add(event, encrypted=False)

    def _add(self, event: Event, *, encrypted: bool) -> None:
        raw = cast(Plain, event.serialize())
        raw["encrypted"] = encrypted
        events = self.timeline.setdefault(str(event.room_id), [])
        if all(e.get("event_id") != raw.get("event_id") for e in events):
            events.append(raw)

    async def _decrypt_pending(self) -> None:
        pending, self._encrypted = self._encrypted, []
        for event in pending:
            try:
                plain = await self.machine.decrypt_megolm_event(event)
            except DecryptionError:
                self._encrypted.append(event)  # its key may still come
                continue
            self._add(plain, encrypted=True)

    async def create_room(
        self, invite: list[str], *, direct: bool = False, encrypted: bool = True
    ) -> str:
        initial = [{"type": "m.room.encryption", "state_key": "", "content": MEGOLM}]
        room_id = await self.client.create_room(
            preset=RoomCreatePreset.TRUSTED_PRIVATE if direct else RoomCreatePreset.PRIVATE,
            invitees=[UserID(u) for u in invite],
            is_direct=direct,
            initial_state=cast(Any, initial if encrypted else []),
        )
        if encrypted:
            assert self.client.state_store is not None
            await self.client.state_store.set_encryption_info(room_id, MEGOLM)
        return str(room_id)

    async def wait_for_members(self, room_id: str, members: set[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            joined = await self.client.get_joined_members(RoomID(room_id))
            if members <= {str(m) for m in joined}:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{members} did not join {room_id}")
            await asyncio.sleep(0.1)

    async def send_text(self, room_id: str, body: str, **extra: Any) -> str:
        """Send a text message, encrypted when the room is (the session shared first)."""
        content = {"msgtype": "m.text", "body": body, **extra}
        # The member list as it is now, so the room key goes to everyone in the room.
        await self.client.get_joined_members(RoomID(room_id))
        return str(
            await self.client.send_message_event(
                RoomID(room_id), EventType.ROOM_MESSAGE, cast(Any, content)
            )
        )

    async def wait_for(
        self, room_id: str, predicate: Callable[[Plain], bool], timeout: float = 60.0
    ) -> Plain:
        """The first room message (decrypted when it was encrypted) that matches."""
        deadline = time.monotonic() + timeout
        while True:
            await self._decrypt_pending()
            for event in self.timeline.get(room_id, []):
                if predicate(event):
                    return event
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching event in {room_id} after {timeout:.0f}s")
            await asyncio.sleep(0.1)

    async def catch_up(self, pause: float = 0.5) -> None:
        """Let the background sync bring what was sent just now, and decrypt it."""
        await asyncio.sleep(pause)
        await self._decrypt_pending()

    def undecrypted(self, room_id: str) -> list[str]:
        """Event ids of encrypted messages in ``room_id`` we have no key for (yet)."""
        return [str(e.event_id) for e in self._encrypted if str(e.room_id) == room_id]
