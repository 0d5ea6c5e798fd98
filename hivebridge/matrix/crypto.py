"""End-to-end encryption for our users: one Olm device per persona and for the bot.

mautrix's :class:`~mautrix.crypto.OlmMachine` does the cryptography; this
module gives each of our users one, as an appservice may (no logins, no sync):

- **Devices** are created through the appservice (MSC4190: ``PUT /devices``
  with ``user_id``), and requests act as that device with the ``device_id``
  query parameter. The device id, the Olm account and every session are kept in
  the bridge's database (mautrix's ``crypto_*`` tables under their own version
  table), pickled with the configured key, so a restart reuses the device and
  keeps every Megolm session. With ``self_sign`` the persona cross-signs its own
  device, so clients that share keys only with cross-signed devices include it.
- **To-device events, device lists and one-time key counts** arrive in the
  appservice transactions (MSC2409/MSC3202) and are handed here by intake
  before the room events of the same transaction, so a room key that arrives
  with its message decrypts it.
- **Decrypting** tries the sender's machine first (our own echo), then each of
  our users in the room: each received its own copy of the room key.
- **Encrypting** shares a Megolm session with the room's joined and invited
  members on first use and after membership or device changes; if that fails,
  the send fails: a reply never goes out in plain text into an encrypted room.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Iterable
from typing import Any, cast

import aiohttp
from mautrix.api import Method, Path
from mautrix.appservice.state_store.asyncpg import PgASStateStore
from mautrix.client import Client
from mautrix.crypto import OlmMachine, PgCryptoStore
from mautrix.crypto import StateStore as CryptoStateStore
from mautrix.errors import (
    DecryptionError,
    EncryptionError,
    MatrixRequestError,
    MForbidden,
    MNotFound,
    SessionNotFound,
)
from mautrix.types import (
    ASToDeviceEvent,
    DeviceID,
    DeviceLists,
    DeviceOTKCount,
    EncryptedEvent,
    EncryptedMegolmEventContent,
    EventType,
    Membership,
    MemberStateEventContent,
    RoomEncryptionStateEventContent,
    RoomID,
    StateEvent,
    TrustState,
    UserID,
)
from mautrix.util.async_db import Database
from mautrix.util.logging import TraceLogger

log = logging.getLogger("hivebridge.crypto")

#: Membership changes after which a room's outbound Megolm session is replaced: anyone
#: who joins must not read what was said before, anyone who leaves what is said after.
#: (An invited user who joins, or a banned one who is let go, already had the key or
#: never will: mautrix's own rule.)
_KEEP_SESSION = {
    Membership.INVITE: Membership.JOIN,
    Membership.BAN: Membership.LEAVE,
    Membership.LEAVE: Membership.BAN,
}


class RoomStateStore(PgASStateStore, CryptoStateStore):  # type: ignore[misc]
    """mautrix's appservice state store (members, power levels, encryption), which is
    also all the room state an Olm machine asks about (encrypted? shared rooms?)."""


class Undecryptable(Exception):
    """An encrypted event none of our users can read (yet): its key is missing or withheld."""

    def __init__(self, reason: str, session_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.session_id = session_id


class Encryption:
    """The Olm machines of our users, created on first use and kept for the process."""

    def __init__(
        self,
        *,
        db: Database,
        state_store: RoomStateStore,
        homeserver: str,
        as_token: str,
        pickle_key: str,
        device_name: str = "hivebridge",
        self_sign: bool = True,
        is_ours: Callable[[str], bool] = lambda _: False,
    ) -> None:
        self.db = db
        self.state_store = state_store
        self.homeserver = homeserver
        self.as_token = as_token
        self._pickle_key = pickle_key
        self.device_name = device_name
        self.self_sign = self_sign
        self.is_ours = is_ours
        self._http: aiohttp.ClientSession | None = None
        self._machines: dict[str, OlmMachine] = {}
        self._loading: dict[str, asyncio.Lock] = {}
        self._share_locks: dict[tuple[str, str], asyncio.Lock] = {}
        #: Rooms known to be unencrypted (the state store only records encrypted ones);
        #: dropped when an m.room.encryption event arrives.
        self._plain_rooms: set[str] = set()
        #: Megolm sessions whose keys a sender's device told us it withholds, and why.
        self.withheld: dict[str, str] = {}
        #: Set whenever new room keys (or a withheld notice) were taken in.
        self._keys_changed = asyncio.Condition()

    def __repr__(self) -> str:  # never the pickle key
        return f"Encryption(devices={len(self._machines)})"

    async def start(self) -> None:
        """Create or upgrade the crypto tables; open the HTTP session the devices share."""
        await PgCryptoStore.upgrade_table.upgrade(self.db)
        self._http = aiohttp.ClientSession()

    async def close(self) -> None:
        machines, self._machines = self._machines, {}
        for machine in machines.values():
            await machine.crypto_store.close()
        if self._http is not None:
            await self._http.close()
            self._http = None

    # Devices -------------------------------------------------------------------------

    async def device(self, mxid: str) -> OlmMachine:
        """The Olm machine of our user ``mxid``: loaded from the database, or a new device."""
        machine = self._machines.get(mxid)
        if machine is not None:
            return machine
        lock = self._loading.setdefault(mxid, asyncio.Lock())
        async with lock:
            machine = self._machines.get(mxid)
            if machine is None:
                machine = await self._load(mxid)
                self._machines[mxid] = machine
        return machine

    async def ensure_devices(self, mxids: Iterable[str]) -> None:
        """Make sure each of these users has its device (at start, on spawn)."""
        await asyncio.gather(*(self.device(m) for m in mxids))

    def device_id(self, mxid: str) -> str | None:
        machine = self._machines.get(mxid)
        return str(machine.client.device_id) if machine is not None else None

    async def _load(self, mxid: str) -> OlmMachine:
        if self._http is None:
            raise RuntimeError("encryption is not started")
        store = PgCryptoStore(mxid, self._pickle_key, self.db)
        await store.open()
        client = Client(
            mxid=UserID(mxid),
            base_url=self.homeserver,
            token=self.as_token,
            client_session=self._http,
            state_store=self.state_store,
            log=logging.getLogger("mau.crypto.client"),
        )
        client.api.as_user_id = UserID(mxid)
        crypto_log = cast(TraceLogger, logging.getLogger("mau.crypto"))
        machine = OlmMachine(client, store, self.state_store, log=crypto_log)
        # Keys go to every device of the room's members, verified or not (as Element
        # does by default); a user who wants less can leave the room.
        machine.send_keys_min_trust = TrustState.UNVERIFIED
        known = await store.get_device_id()
        device_id = DeviceID(known or "HB" + secrets.token_hex(5).upper())
        # MSC4190: creates the device, or renames it when it exists; from here on every
        # request of this client acts as the device (device_id query parameter).
        try:
            await client.create_device_msc4190(device_id, self.device_name)
        except MatrixRequestError as e:
            raise RuntimeError(
                f"the homeserver did not create a device for {mxid} ({e.errcode}: {e.message}); "
                "does the registration have io.element.msc4190: true? (docs/operations.md, "
                "Encrypted rooms)"
            ) from e
        await machine.load()
        if not known:
            await store.put_device_id(device_id)
            await machine.share_keys()
            log.info("created device %s for %s", device_id, mxid)
            await self._drop_other_devices(client, device_id)
        elif machine.account is None or not machine.account.shared:
            await machine.share_keys()
        elif not await self._keys_on_server(machine):
            # The homeserver lost the device's keys (its database was reset): start over.
            log.warning("the keys of %s's device %s are gone from the server; new device",
                        mxid, device_id)  # fmt: skip
            await store.delete()
            return await self._load(mxid)
        if self.self_sign:
            await self._self_sign(machine)
        return machine

    async def _drop_other_devices(self, client: Client, keep: DeviceID) -> None:
        """Delete the user's other devices (an earlier database's, whose keys are gone):
        members' apps would otherwise keep encrypting for devices nobody reads. The
        namespace is exclusively ours, so no one else has devices there (MSC4190 lets
        an appservice delete them without interactive auth)."""
        found = await client.api.request(Method.GET, Path.v3.devices)
        for device in found.get("devices", []):
            old = device.get("device_id")
            if isinstance(old, str) and old != keep:
                try:
                    await client.api.request(Method.DELETE, Path.v3.devices[old], {})
                    log.info("deleted %s's stale device %s", client.mxid, old)
                except Exception as e:
                    log.warning("could not delete %s's device %s: %s", client.mxid, old, e)

    async def _keys_on_server(self, machine: OlmMachine) -> bool:
        client = machine.client
        resp = await client.query_keys([client.mxid])
        devices = resp.device_keys.get(client.mxid, {})
        own = devices.get(client.device_id)
        return own is not None and len(own.keys) > 0

    async def _self_sign(self, machine: OlmMachine) -> None:
        """Cross-sign the device with the user's own keys, once (the keys stay on the
        server, in secret storage; the recovery key is not kept: a new device gets new
        cross-signing keys, which an appservice may replace without interaction)."""
        trust = await machine.resolve_trust(machine.own_identity)
        if trust >= TrustState.CROSS_SIGNED_UNTRUSTED:
            return
        await machine.generate_recovery_key()
        log.info("cross-signed %s's device %s", machine.client.mxid, machine.client.device_id)

    # What transactions bring ---------------------------------------------------------

    async def take_transaction(
        self,
        to_device: list[Any],
        device_lists: DeviceLists | None,
        otk_counts: dict[str, dict[str, Any]],
    ) -> None:
        """To-device events (room keys), device list changes and one-time key counts.

        Called before the room events of the same transaction are decrypted. A bad
        event is logged and skipped: the transaction must not fail over it.
        """
        got_keys = False
        for raw in to_device:
            try:
                got_keys |= await self._to_device(raw)
            except Exception as e:
                log.warning("to-device event not taken in: %s: %s", type(e).__name__, e)
        if device_lists is not None and (device_lists.changed or device_lists.left):
            try:
                await self._device_lists(device_lists)
            except Exception as e:  # never fail (and so block) the transaction over it
                log.warning("device list changes not taken in: %s: %s", type(e).__name__, e)
        for user_id, devices in otk_counts.items():
            if not self.is_ours(user_id):
                continue
            try:
                machine = await self.device(user_id)
                for device_id, count in devices.items():
                    if device_id == machine.client.device_id:
                        await machine.handle_otk_count(DeviceOTKCount.deserialize(count))
            except Exception as e:
                log.warning("one-time keys of %s not topped up: %s: %s", user_id,
                            type(e).__name__, e)  # fmt: skip
        if got_keys:
            async with self._keys_changed:
                self._keys_changed.notify_all()

    async def _to_device(self, raw: Any) -> bool:
        """One to-device event for one of our devices; True if it may carry room keys."""
        if not isinstance(raw, dict):
            return False
        event = cast(ASToDeviceEvent, ASToDeviceEvent.deserialize(cast(Any, raw)))
        target = str(event.to_user_id)
        if not self.is_ours(target):
            return False
        if str(event.type) in ("m.room_key.withheld", "org.matrix.room_key.withheld"):
            content = raw.get("content") or {}
            session = content.get("session_id")
            if isinstance(session, str):
                self.withheld[session] = str(content.get("code") or "withheld")
                log.info("room key withheld from %s: %s", target, self.withheld[session])
                return True
            return False
        machine = await self.device(target)
        await machine.handle_as_to_device_event(event)
        return event.type == EventType.TO_DEVICE_ENCRYPTED

    async def _device_lists(self, lists: DeviceLists) -> None:
        """Someone's devices changed: fetch them, and start new sessions in the rooms we
        share, so a new device gets the next room key and a removed one does not."""
        changed = [u for u in lists.changed if not self.is_ours(str(u))]
        if not changed or not self._machines:
            return
        machine = next(iter(self._machines.values()))
        await machine.handle_device_lists(DeviceLists(changed=changed, left=[]))
        for user_id in changed:
            for room_id in await self.state_store.find_shared_rooms(user_id):
                await self._forget_outbound(str(room_id))

    # Rooms ---------------------------------------------------------------------------

    def on_state(self, event: StateEvent) -> None:
        """A state event intake passed to the state store."""
        if event.type == EventType.ROOM_ENCRYPTION:
            self._plain_rooms.discard(str(event.room_id))

    async def on_member(self, event: StateEvent) -> None:
        """A membership change in an encrypted room: the next message starts a new session.

        Our own users coming and going does not count: they read the room as the
        bridge anyway.
        """
        if self.is_ours(str(event.state_key)):
            return
        if not await self.state_store.is_encrypted(event.room_id):
            return
        prev = getattr(event.prev_content, "membership", None) or Membership.LEAVE
        cur = cast(MemberStateEventContent, event.content).membership
        if prev == cur or _KEEP_SESSION.get(prev) == cur:
            return
        await self._forget_outbound(str(event.room_id))

    async def _forget_outbound(self, room_id: str) -> None:
        """Every one of our users starts a new outbound session in ``room_id`` next time."""
        await self.db.execute(
            "DELETE FROM crypto_megolm_outbound_session WHERE room_id=$1", room_id
        )

    async def is_encrypted(self, room_id: str, mxid: str) -> bool:
        """Whether ``room_id`` is encrypted, asking the homeserver (as ``mxid``) once if
        the state store has not seen its ``m.room.encryption``."""
        if await self.state_store.is_encrypted(RoomID(room_id)):
            return True
        if room_id in self._plain_rooms:
            return False
        machine = await self.device(mxid)
        try:
            content = await machine.client.get_state_event(
                RoomID(room_id), EventType.ROOM_ENCRYPTION
            )
        except (MNotFound, MForbidden):
            self._plain_rooms.add(room_id)
            return False
        await self.state_store.set_encryption_info(
            RoomID(room_id), cast(RoomEncryptionStateEventContent, content)
        )
        return True

    # Encrypting ----------------------------------------------------------------------

    async def encrypt(
        self, mxid: str, room_id: str, event_type: EventType, content: Any
    ) -> EncryptedMegolmEventContent:
        """``content`` encrypted by ``mxid``'s device for ``room_id``; shares a session first
        when there is none. Raises when that fails: never fall back to plain text."""
        machine = await self.device(mxid)
        room = RoomID(room_id)
        try:
            return await machine.encrypt_megolm_event(room, event_type, content)
        except EncryptionError:
            pass
        lock = self._share_locks.setdefault((mxid, room_id), asyncio.Lock())
        async with lock:
            try:
                return await machine.encrypt_megolm_event(room, event_type, content)
            except EncryptionError:
                await machine.share_group_session(room, await self._recipients(machine, room))
        return await machine.encrypt_megolm_event(room, event_type, content)

    async def _recipients(self, machine: OlmMachine, room_id: RoomID) -> list[UserID]:
        """Who gets the room key: the joined and invited members."""
        if not await self.state_store.has_full_member_list(room_id):
            await machine.client.get_joined_members(room_id)
        members = await self.state_store.get_members(
            room_id, memberships=(Membership.JOIN, Membership.INVITE)
        )
        return list(members)

    # Decrypting ----------------------------------------------------------------------

    async def decrypt(self, raw: dict[str, Any], readers: list[str]) -> dict[str, Any]:
        """The plain event of an ``m.room.encrypted`` one, as the homeserver would have
        sent it unencrypted (same id, sender, time; the relation kept).

        ``readers``: our users in the room, tried in order (the sender first when it is
        ours). Raises :class:`Undecryptable` when none has the key.
        """
        event = EncryptedEvent.deserialize(cast(Any, raw))
        if not isinstance(event.content, EncryptedMegolmEventContent):
            raise Undecryptable("not a Megolm event")
        session_id = str(event.content.session_id)
        sender = str(event.sender)
        order = [sender] if self.is_ours(sender) else []
        order += [r for r in readers if r != sender]
        missing = "no room key"
        for mxid in order:
            machine = await self.device(mxid)
            try:
                decrypted = await machine.decrypt_megolm_event(event)
            except SessionNotFound:
                continue
            except DecryptionError as e:
                missing = f"{type(e).__name__}: {e}"
                continue
            content = decrypted.content.serialize()
            plain: dict[str, Any] = {
                "type": str(decrypted.type),
                "event_id": raw.get("event_id"),
                "room_id": raw.get("room_id"),
                "sender": sender,
                "origin_server_ts": raw.get("origin_server_ts"),
                "content": content,
                "unsigned": raw.get("unsigned") or {},
            }
            return plain
        if session_id in self.withheld:
            missing = f"the sender's device withheld the key ({self.withheld[session_id]})"
        raise Undecryptable(missing, session_id)

    async def wait_for_keys(self, timeout: float) -> bool:
        """Wait until new room keys (or withheld notices) were taken in; False on timeout."""
        async with self._keys_changed:
            try:
                await asyncio.wait_for(self._keys_changed.wait(), timeout)
            except TimeoutError:
                return False
        return True
