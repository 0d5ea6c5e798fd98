"""Which database errors mean a lost connection, and what is redone after one.

The real connection cuts run on PostgreSQL in tests/integration/test_db_outage.py.
"""

from __future__ import annotations

import asyncpg
import pytest

from hivebridge.db.resilience import is_connection_lost, retry_when_lost
from hivebridge.handler.handled import HandledMarks

LOST = asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")


@pytest.mark.parametrize(
    ("exc", "lost"),
    [
        (LOST, True),
        (asyncpg.AdminShutdownError("terminating connection due to administrator command"), True),
        (asyncpg.CannotConnectNowError("the database system is starting up"), True),
        (asyncpg.InterfaceError("cannot perform operation: connection is closed"), True),
        (
            asyncpg.InternalClientError(
                "cannot switch to state 12; another operation (2) is in progress"
            ),
            True,
        ),
        (ConnectionRefusedError(111, "refused"), True),
        # A bug or a bad query is no outage: never retried, never hidden.
        (
            asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
            False,
        ),
        (asyncpg.InternalClientError("unknown error in protocol implementation"), False),
        (asyncpg.QueryCanceledError("canceling statement due to statement timeout"), False),
        (asyncpg.UniqueViolationError("duplicate key"), False),
        (TimeoutError(), False),
        (ValueError("x"), False),
    ],
)
def test_what_counts_as_a_lost_connection(exc: BaseException, lost: bool) -> None:
    assert is_connection_lost(exc) is lost


async def test_work_is_redone_as_resumed_after_lost_connections() -> None:
    calls: list[bool] = []

    async def run(again: bool) -> str:
        calls.append(again)
        if len(calls) < 3:
            raise LOST
        return "done"

    assert await retry_when_lost(run, (0, 0, 0), what="test") == "done"
    assert calls == [False, True, True]


async def test_other_errors_and_the_last_loss_are_raised() -> None:
    calls: list[bool] = []

    async def broken(again: bool) -> None:
        calls.append(again)
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        await retry_when_lost(broken, (0, 0), what="test")
    assert calls == [False]

    async def down(again: bool) -> None:
        calls.append(again)
        raise LOST

    calls.clear()
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await retry_when_lost(down, (0, 0), what="test")
    assert calls == [False, True, True]


class FlakyMessages:
    """mark_handled_many() that loses its connection once."""

    def __init__(self) -> None:
        self.marked: list[str] = []
        self.fail_next = True

    async def mark_handled_many(self, event_ids: list[str]) -> None:
        if self.fail_next:
            self.fail_next = False
            raise LOST
        self.marked.extend(event_ids)


async def test_handled_marks_survive_a_lost_connection() -> None:
    store = FlakyMessages()
    marks = HandledMarks(store, delay=3600)  # type: ignore[arg-type]
    marks.add("$a")
    marks.add("$b")
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await marks.flush()
    marks.add("$c")
    await marks.flush()
    assert store.marked == ["$a", "$b", "$c"]
    assert marks._task is not None
    marks._task.cancel()
