"""PostgreSQL that survives its connections being cut (a restart, a failover, a kill).

asyncpg's pool reconnects on its own once it has *seen* a connection close,
but a server that ends a backend sends a FATAL message first and closes the
socket after. A connection idle in the pool that has read the message but not
yet the close is stuck: asyncpg has no handler for an unsolicited error while
idle and parks the protocol in its error-consume state, so the next statement
on it, or the pool's reset when it is released, raises ``InternalClientError:
cannot switch to state N; another operation (2) is in progress``. mautrix
answers every ``InternalClientError`` with ``sys.exit(26)``, and a failed reset
escapes ``async with acquire()`` even after a successful COMMIT.

:class:`ResilientPostgres` fixes both where the connection is handed out:

- a connection that fails as lost is terminated and the pool's other
  connections are expired, so the next acquire connects afresh instead of
  handing out the next stale one; losing it never exits the process;
- a lost connection noticed only when the pool resets it on release does not
  fail work that already finished on it;
- a single statement outside a caller's transaction is retried once on a fresh
  connection when that is safe: always when the statement never left the
  client, and for reads whatever happened. A write whose outcome is unknown is
  not retried: its caller sees the error (the intake answers 500 and the
  homeserver retries the transaction, the router retries the message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
from mautrix.util.async_db.asyncpg import PostgresDatabase
from mautrix.util.async_db.connection import LoggingConnection
from mautrix.util.async_db.database import conn_var

__all__ = ["ResilientPostgres", "is_connection_lost", "retry_when_lost"]

log = logging.getLogger("hivebridge.db")

T = TypeVar("T")

#: The server ended the session (57P01 admin shutdown, 57P02 crash, 57P03 starting up).
_SERVER_GONE = (
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
)
#: asyncpg's words for a connection it knows to be closed before it sends anything.
_CLOSED_WORDS = ("connection is closed", "underlying connection is closed")
#: A connection stuck after an unsolicited FATAL: 2 is asyncpg's PROTOCOL_ERROR_CONSUME
#: (asyncpg/protocol/coreproto.pxd). Any other "another operation" is a bug, not an outage.
_STUCK_WORDS = "another operation (2) is in progress"


def is_connection_lost(exc: BaseException) -> bool:
    """True when ``exc`` means the database connection went away, not that a query was wrong."""
    if isinstance(exc, (asyncpg.PostgresConnectionError, *_SERVER_GONE)):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        return any(w in str(exc) for w in _CLOSED_WORDS)
    if isinstance(exc, asyncpg.InternalClientError):
        return _STUCK_WORDS in str(exc)
    # Socket errors while connecting or talking (refused, reset); not a query timeout.
    return isinstance(exc, OSError) and not isinstance(exc, TimeoutError)


async def retry_when_lost(
    run: Callable[[bool], Awaitable[T]],
    delays: Sequence[float],
    *,
    what: str,
    extra: Mapping[str, object] | None = None,
) -> T:
    """``run(again)``, and after each lost connection a pause and a run with ``again`` True.

    For work that is safe to redo as a whole (``again`` tells it to resume rather
    than start over); the last failure, or any other error, is raised.
    """
    again = False
    for delay in (*delays, None):
        try:
            return await run(again)
        except Exception as e:
            if delay is None or not is_connection_lost(e):
                raise
            log.warning(
                "database connection lost during %s (%s); again in %.2gs",
                what,
                type(e).__name__,
                delay,
                extra=extra,
            )
        await asyncio.sleep(delay)
        again = True
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _never_sent(exc: BaseException) -> bool:
    """The statement never reached the server: retrying it cannot apply it twice."""
    before_session = (asyncpg.CannotConnectNowError, asyncpg.ClientCannotConnectError)
    if isinstance(exc, (asyncpg.InternalClientError, *before_session)):
        return True  # refused by the client's protocol state, or no session yet
    if isinstance(exc, asyncpg.InterfaceError):
        return True  # is_connection_lost() admits only "connection is closed" here
    # A raw socket error comes from connecting or from a write the closed peer refused;
    # a connection lost while awaiting an answer is ConnectionDoesNotExistError instead.
    return isinstance(exc, OSError)


def _read_only(query: str) -> bool:
    return query.lstrip().upper().startswith(("SELECT", "SHOW"))


class ResilientPostgres(PostgresDatabase):
    """mautrix's PostgreSQL database, minus the two ways a cut connection hurts (see module)."""

    async def stop(self) -> None:
        pool = self._pool
        await super().stop()
        # asyncpg refills the pool's floor in a background task that close() leaves
        # running; cancel it so a stop right after an outage leaks no connection.
        task = getattr(pool, "_maintenance_task", None)
        if isinstance(task, asyncio.Task) and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _handle_exception(self, err: Exception) -> None:
        if is_connection_lost(err):
            return  # not an asyncpg bug: acquire_direct() drops the connection
        await super()._handle_exception(err)

    @asynccontextmanager
    async def acquire_direct(self) -> AsyncIterator[LoggingConnection]:  # type: ignore[override]
        raw = await self.pool.acquire()
        try:
            yield LoggingConnection(
                self.scheme, raw, self.log, handle_exception=self._handle_exception
            )
        except BaseException as e:
            if is_connection_lost(e):
                await self._drop(raw)
            raise
        finally:
            try:
                await self.pool.release(raw)
            except Exception as e:
                # Only the reset after the work failed, and the pool has terminated it:
                # what ran on the connection stands (a COMMIT included).
                if not is_connection_lost(e):
                    raise
                log.debug("connection lost on release: %s", type(e).__name__)
                await self.pool.expire_connections()

    async def _drop(self, raw: Any) -> None:
        """Close a lost connection, and have the pool replace its idle siblings.

        The server that ended one session has most likely ended them all (a
        restart, a failover, an operator's kill), and the others may not show it
        yet: expiring them makes the next acquire connect afresh rather than
        hand out the next stale one.
        """
        # One the pool has already seen close is detached and refuses the call.
        with contextlib.suppress(asyncpg.InterfaceError):
            raw.terminate()
        await self.pool.expire_connections()

    async def _once(self, run: Callable[[LoggingConnection], Awaitable[T]]) -> T:
        conn: LoggingConnection
        async with self.acquire() as conn:
            return await run(conn)

    async def _retry_once(self, query: str, run: Callable[[LoggingConnection], Awaitable[T]]) -> T:
        if conn_var.get(None) is not None:
            # Inside the caller's acquire() or transaction: a retry is theirs to decide.
            return await self._once(run)
        try:
            return await self._once(run)
        except Exception as e:
            if not is_connection_lost(e) or not (_never_sent(e) or _read_only(query)):
                raise
            log.warning(
                "database connection lost (%s); retrying once on a new one", type(e).__name__
            )
        return await self._once(run)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        return await self._retry_once(query, lambda c: c.execute(query, *args, timeout=timeout))

    async def executemany(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        return await self._retry_once(query, lambda c: c.executemany(query, *args, timeout=timeout))

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        return await self._retry_once(query, lambda c: c.fetch(query, *args, timeout=timeout))

    async def fetchval(
        self, query: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any:
        return await self._retry_once(
            query, lambda c: c.fetchval(query, *args, column=column, timeout=timeout)
        )

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        return await self._retry_once(query, lambda c: c.fetchrow(query, *args, timeout=timeout))
