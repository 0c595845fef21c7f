"""The few asyncpg internals loopbridge relies on, in one place, checked before first use.

asyncpg's public API cannot tell how many statements a connection has sent (so a call on a connection that
turned out dead may safely run again), which pooled connections are held (so a closing bridge can end
the ones nobody will give back), whether a cancel request is still on its way, which statements a
connection has prepared (so a reset can tell whether the session dropped them), or close a cursor's
portal before its transaction ends. loopbridge reads those from asyncpg's private attributes, here and
nowhere else. :func:`check` verifies that they exist when the first pool opens: an asyncpg release that
renamed one fails there, with a message saying what to install, instead of deep inside a later call.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import asyncpg
import asyncpg.connection
import asyncpg.cursor
import asyncpg.pool
import asyncpg.protocol
import asyncpg.utils

from ._loop import bridge_threads

__all__ = [
    "check",
    "close_portal",
    "forget_statements",
    "held_connections",
    "idle_connections",
    "is_connected",
    "pending_cancellations",
    "prepared_statements",
    "protocol_of",
    "quiet_floor_warnings",
    "quote_ident",
    "release_at_once",
    "restoring_floor",
    "sent_so_far",
    "socket_of",
    "unproxied",
]

#: The asyncpg releases these internals were checked against.
TESTED = "0.30 to 0.32"


def _incompatible(what: str) -> RuntimeError:
    return RuntimeError(
        f"loopbridge needs asyncpg's internal {what}, which asyncpg {asyncpg.__version__} does not have: "
        f"install an asyncpg release loopbridge was tested with ({TESTED}): pip install 'asyncpg>=0.30,<0.33'"
    )


def _class_internals() -> Iterable[tuple[object, str, str]]:
    yield asyncpg.cursor.Cursor, "_close_portal", "Cursor._close_portal()"
    yield asyncpg.utils, "_quote_ident", "asyncpg.utils._quote_ident()"
    yield asyncpg.pool.PoolConnectionProxy, "_con", "PoolConnectionProxy._con"
    yield asyncpg.pool.PoolConnectionProxy, "_holder", "PoolConnectionProxy._holder"
    yield asyncpg.pool.Pool, "_closed", "Pool._closed"
    for name in ("_release", "_setup_inactive_callback", "_max_queries", "_generation", "_timeout", "_pool"):
        yield asyncpg.pool.PoolConnectionHolder, name, f"PoolConnectionHolder.{name}"
    for name in (
        "_on_release",
        "_top_xact",
        "_listeners",
        "_log_listeners",
        "_protocol",
        "_stmt_cache",
        "_stmts_to_close",
    ):
        yield asyncpg.connection.Connection, name, f"Connection.{name}"
    yield asyncpg.connection.Connection, "_mark_stmts_as_closed", "Connection._mark_stmts_as_closed()"
    cache = getattr(asyncpg.connection, "_StatementCache", None)  # not in asyncpg's type stubs
    yield cache, "iter_statements", "_StatementCache.iter_statements()"
    yield asyncpg.protocol.protocol.PreparedStatementState, "name", "PreparedStatementState.name"


@functools.cache
def _checked_classes() -> None:
    for owner, name, what in _class_internals():
        if not hasattr(owner, name):
            raise _incompatible(what)


def check(pool: asyncpg.Pool) -> None:
    """Raise a ``RuntimeError`` saying which asyncpg to install if an internal loopbridge uses is gone.

    Called on the bridge loop when a pool has just opened, with its ``min_size`` connections.
    """
    _checked_classes()
    holders = getattr(pool, "_holders", None)
    if not isinstance(holders, list):
        raise _incompatible("Pool._holders")
    for holder in holders:
        for name in ("_in_use", "_con"):
            if not hasattr(holder, name):
                raise _incompatible(f"PoolConnectionHolder.{name}")
        connection = holder._con
        if connection is None:
            continue
        for name in ("_cancellations", "_transport"):
            if not hasattr(connection, name):
                raise _incompatible(f"Connection.{name}")
        protocol = protocol_of(connection)
        for name in ("queries_count", "is_connected"):
            if not hasattr(protocol, name):
                raise _incompatible(f"the connection protocol's {name}")
        return


def protocol_of(connection: object) -> Any:
    """The protocol behind a connection or its pool proxy (kept by callers: a connection that closes
    lets go of its proxy, not of its protocol), or None."""
    return getattr(connection, "_protocol", None)


def sent_so_far(connection: object) -> int | None:
    """How many statements asyncpg has sent on *connection* (or its protocol): a Bind/Execute or a simple
    query counts, a Parse/Describe, which changes nothing, does not. None if it cannot tell."""
    protocol = protocol_of(connection) or connection
    count: int | None = getattr(protocol, "queries_count", None)
    return count


def is_connected(protocol: Any) -> bool | None:
    """Whether the protocol's socket is still open; None if it cannot tell."""
    connected = getattr(protocol, "is_connected", None)
    return None if connected is None else bool(connected())


def held_connections(pool: asyncpg.Pool) -> list[Any]:
    """The open connections of *pool* that somebody holds (acquired and not yet released)."""
    return [
        holder._con
        for holder in getattr(pool, "_holders", ())
        if holder._in_use is not None and holder._con is not None and not holder._con.is_closed()
    ]


def idle_connections(pool: asyncpg.Pool) -> list[Any]:
    """The open connections of *pool* that nobody holds."""
    return [
        holder._con
        for holder in getattr(pool, "_holders", ())
        if holder._in_use is None and holder._con is not None and not holder._con.is_closed()
    ]


def pending_cancellations(connection: Any) -> set[Any]:
    """Tasks still sending a cancel request for a statement of *connection*."""
    return set(getattr(connection, "_cancellations", ()))


def close_portal(cursor: object) -> Callable[[], Awaitable[None]] | None:
    """A function that CLOSEs *cursor*'s portal now (asyncpg's Cursor has no public close), or None."""
    close = getattr(cursor, "_close_portal", None)
    return None if close is None else functools.partial(close, None)


def unproxied(connection: object) -> object:
    """The connection behind a pool's proxy (a connection is itself)."""
    return getattr(connection, "_con", None) or connection


def release_at_once(proxy: Any, clean: Callable[[Any], bool]) -> bool:
    """Give a pooled connection that needs nothing back to its pool now, without a task: True if done,
    False (nothing done) when asyncpg's own release must do it (:meth:`asyncpg.Pool.release`).

    asyncpg's release runs as a task of its own (shielded), with a timeout context, for every
    connection, though for one that needs no reset it does no I/O at all: it checks the connection,
    drops its listeners, puts its holder back in the pool's queue and rearms its inactivity timer. That
    is what this does, in line, for a connection that is open, not in a transaction, not being
    cancelled, not due to be closed (``max_queries``, an expired generation), and that *clean* (the
    session-state check of ``loopbridge._session_state``) says needs no reset. On the bridge loop.
    """
    con = proxy._con
    holder = proxy._holder
    if con is None or holder._in_use is None or holder._pool._closed or con.is_closed():
        return False
    protocol = con._protocol
    if (
        protocol.is_in_transaction()
        or con._top_xact is not None
        or protocol._is_cancelling()
        or protocol.queries_count >= holder._max_queries
        or holder._generation != holder._pool._generation
        or not clean(con)
    ):
        return False
    con._on_release()  # what Pool.release() does first: the check for listeners left behind
    con._listeners.clear()  # what Connection._reset() does for a connection not in a transaction
    con._log_listeners.clear()
    holder._timeout = None
    holder._release()  # back in the pool's queue, the proxy detached
    holder._setup_inactive_callback()
    return True


def prepared_statements(connection: Any) -> int:
    """How many named statements asyncpg knows it has prepared in *connection*'s session (not a proxy):
    those in its cache and those waiting to be closed. A ``PreparedStatement`` of the caller's own that
    is in neither adds one more on the server; the cache being off (``statement_cache_size=0``), every
    statement is unnamed and none is counted."""
    statements = itertools.chain(connection._stmt_cache.iter_statements(), connection._stmts_to_close)
    return sum(1 for statement in statements if statement.name)


def forget_statements(connection: Any) -> None:
    """Forget every statement asyncpg has prepared on *connection* (not a proxy), cached or waiting to
    be closed, without closing any on the server: for a session that has none left (``DEALLOCATE
    ALL``). The next call of each prepares it anew."""
    connection._mark_stmts_as_closed()


def quote_ident(name: str) -> str:
    """*name* as a quoted SQL identifier, as asyncpg quotes the channels it LISTENs on."""
    quoted: str = asyncpg.utils._quote_ident(name)
    return quoted


def socket_of(connection: object) -> Any:
    """The socket under an asyncpg connection (through TLS too), or None if it cannot tell."""
    transport = getattr(connection, "_transport", None)
    return None if transport is None else transport.get_extra_info("socket")


def restoring_floor(pool: object) -> bool:
    """Whether the running task is *pool*'s own, reconnecting in the background to keep ``min_size``
    connections open (asyncpg 0.32's connection floor; earlier releases have none)."""
    task = getattr(pool, "_maintenance_task", None)
    return task is not None and task is asyncio.current_task()


#: What asyncpg 0.32's pool logs, with a traceback, each time it fails to reconnect to its ``min_size``.
_FLOOR_WARNING = "Failed to restore the pool connection floor"


class _QuietFloor(logging.Filter):
    """Drops asyncpg's floor warnings logged on a bridge thread: loopbridge's source says it once per
    episode, in a line (``PoolSource._floor_failed``). Pools of other loops are left alone."""

    def __init__(self, bridge_threads: set[int]) -> None:
        super().__init__()
        self.bridge_threads = bridge_threads

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            isinstance(record.msg, str)
            and record.msg.startswith(_FLOOR_WARNING)
            and threading.get_ident() in self.bridge_threads
        )


@functools.cache
def quiet_floor_warnings() -> None:
    """Install the filter on asyncpg's pool logger, once (when the first pool opens: importing
    loopbridge changes nothing)."""
    logging.getLogger("asyncpg.pool").addFilter(_QuietFloor(bridge_threads))
