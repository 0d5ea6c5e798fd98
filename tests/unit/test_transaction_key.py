"""A transaction's dedupe key covers what it carries besides room events."""

from __future__ import annotations

from hivebridge.matrix.intake import transaction_key


def test_room_keys_only_transactions_with_a_reused_id_are_not_duplicates() -> None:
    """Synapse on SQLite numbers transactions anew after a restart; one that carries
    only to-device events (room keys) must not pass for an earlier one of that id."""
    key_a = [{"type": "m.room.encrypted", "to_user_id": "@hive_a:x", "content": {"c": 1}}]
    key_b = [{"type": "m.room.encrypted", "to_user_id": "@hive_a:x", "content": {"c": 2}}]
    assert transaction_key("7", [], [key_a, None]) != transaction_key("7", [], [key_b, None])
    # A retry carries the same: the same key.
    assert transaction_key("7", [], [key_a, None]) == transaction_key("7", [], [key_a, None])
    # Without anything else, the key is what it always was.
    events = [{"event_id": "$e"}]
    assert transaction_key("7", events) == transaction_key("7", events, None)
