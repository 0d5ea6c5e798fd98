"""State keyed by what outsiders choose stays bounded (issue: bounded memory)."""

from __future__ import annotations

from typing import Any

import pytest
from mautrix.appservice.state_store import ASStateStore
from mautrix.client.state_store import MemoryStateStore

from hivebridge.bounded import LruDict, RecentSet
from hivebridge.matrix import intake as intake_module
from hivebridge.matrix.intake import Intake
from hivebridge.matrix.members import RoomMembers


def test_lru_dict_forgets_the_least_recently_used() -> None:
    d: LruDict[str, int] = LruDict(2)
    d["a"], d["b"] = 1, 2
    assert d.get("a") == 1  # a is now the most recent
    d["c"] = 3
    assert "b" not in d and d.get("a") == 1 and d["c"] == 3 and len(d) == 2
    assert d.setdefault("z", lambda: 9) == 9 and "a" not in d
    with pytest.raises(ValueError):
        LruDict(0)


def test_recent_set_keeps_the_newest() -> None:
    s: RecentSet[int] = RecentSet(3)
    for i in range(10):
        s.add(i)
    assert len(s) == 3 and 9 in s and 6 not in s


class MemoryStore(MemoryStateStore, ASStateStore):  # type: ignore[misc]
    pass


async def test_seen_transaction_ids_are_bounded() -> None:
    """Before: mautrix's set kept every transaction id for the life of the process."""
    intake = Intake(
        messages=None,  # type: ignore[arg-type]
        txns=None,  # type: ignore[arg-type]
        server="http://127.0.0.1:9",
        domain="hive.test",
        as_token="a",
        hs_token="h",
        bot_localpart="hive_bot",
        id="hivebridge",
        state_store=MemoryStore(),
    )
    for i in range(intake_module.MAX_SEEN_TRANSACTIONS + 5000):
        intake.transactions.add(f"txn-{i}")
    assert len(intake.transactions) == intake_module.MAX_SEEN_TRANSACTIONS
    assert f"txn-{intake_module.MAX_SEEN_TRANSACTIONS + 4999}" in intake.transactions


async def test_member_lists_of_many_rooms_are_bounded() -> None:
    class Store:
        async def get_members(self, room_id: str, memberships: Any) -> list[str]:
            return [f"@a:{room_id}"]

    members = RoomMembers(Store())  # type: ignore[arg-type]
    for i in range(10_000):
        assert await members.joined(f"!r{i}") == [f"@a:!r{i}"]
    assert len(members._joined) <= 4096
