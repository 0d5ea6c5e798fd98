"""The personas' keys in the bridge's own database, on SQLite and PostgreSQL.

Olm accounts and Megolm sessions are pickled with the configured key into
mautrix's ``crypto_*`` tables (under their own version table, beside alembic's):
they survive closing and opening the database, and another key cannot read them.
"""

from __future__ import annotations

import olm
import pytest
from mautrix.crypto import OlmAccount, PgCryptoStore
from mautrix.crypto.sessions import InboundGroupSession
from mautrix.types import DeviceID, IdentityKey, RoomID, SigningKey

from hivebridge.db import open_database
from hivebridge.matrix.crypto import Encryption, RoomStateStore

PICKLE_KEY = "a-pickle-key-for-the-tests"
ROOM = RoomID("!room:hive.test")


async def _open(url: str) -> tuple[object, Encryption]:
    db = await open_database(url)
    state = RoomStateStore(db)
    await state.upgrade_table.upgrade(db)
    encryption = Encryption(
        db=db, state_store=state, homeserver="http://127.0.0.1:9", as_token="t",
        pickle_key=PICKLE_KEY,
    )  # fmt: skip
    await encryption.start()
    return db, encryption


async def test_keys_survive_a_restart_and_need_the_pickle_key(db_url: str) -> None:
    db, encryption = await _open(db_url)
    try:
        store = PgCryptoStore("@hive_assistant:hive.test", PICKLE_KEY, db)  # type: ignore[arg-type]
        await store.put_device_id(DeviceID("HBTEST"))
        account = OlmAccount()
        await store.put_account(account)
        outbound = olm.OutboundGroupSession()
        inbound = InboundGroupSession(
            session_key=outbound.session_key,
            signing_key=SigningKey(account.signing_key),
            sender_key=IdentityKey(account.identity_key),
            room_id=ROOM,
        )
        await store.put_group_session(ROOM, IdentityKey(account.identity_key), inbound.id, inbound)
        ciphertext = outbound.encrypt("a secret")
    finally:
        await encryption.close()
        await db.stop()  # type: ignore[attr-defined]

    db, encryption = await _open(db_url)  # a restart: the upgrade runs again, harmlessly
    try:
        again = PgCryptoStore("@hive_assistant:hive.test", PICKLE_KEY, db)  # type: ignore[arg-type]
        loaded = await again.get_account()
        assert loaded is not None and loaded.identity_key == account.identity_key
        session = await again.get_group_session(ROOM, inbound.id)
        assert session is not None and session.decrypt(ciphertext)[0] == "a secret"
        # The pickle key matters: with another one the account cannot be read.
        wrong = PgCryptoStore("@hive_assistant:hive.test", "another-key-entirely", db)  # type: ignore[arg-type]
        with pytest.raises(olm.OlmAccountError):
            await wrong.get_account()
        # Every account keeps its own rows.
        other = PgCryptoStore("@hive_poet:hive.test", PICKLE_KEY, db)  # type: ignore[arg-type]
        assert await other.get_account() is None
    finally:
        await encryption.close()
        await db.stop()  # type: ignore[attr-defined]


async def test_waiting_encrypted_events_are_kept_until_read_or_given_up(db_url: str) -> None:
    from hivebridge.db.unread import UnreadStore

    db = await open_database(db_url)
    try:
        store = UnreadStore(db)
        event = {"type": "m.room.encrypted", "event_id": "$a", "room_id": str(ROOM),
                 "sender": "@alice:hive.test", "content": {"session_id": "s"}}  # fmt: skip
        await store.add(event, 1_000)
        await store.add(event, 2_000)  # the same event again (a retried transaction)
        waiting = await store.all()
        assert [(w.event, w.received_at) for w in waiting] == [(event, 1_000)]
        await store.remove("$a")
        assert await store.all() == []
    finally:
        await db.stop()
