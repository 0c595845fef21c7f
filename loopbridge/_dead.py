"""Dead connections: how to tell that a connection died under a call, and when running it again is safe.

A pooled connection can die while it sits idle (its backend terminated, the server restarted) and be
handed out before asyncpg has seen its socket close; it can die while the pool sets it up; it can die in
the middle of a call. asyncpg reports each in its own terms: ``ConnectionDoesNotExistError``, a FATAL
``AdminShutdownError``, ``InterfaceError("connection is closed")``, or ``InternalClientError("cannot
switch to state 11; another operation (2) is in progress")`` when the server's FATAL arrived between two
calls. The stress suite met all of them.

Running a call again is safe only if nothing that could change data was sent: asyncpg counts what it
sends on a connection (:func:`loopbridge._asyncpg.sent_so_far`), so a count unchanged since the call
began proves it.

A timeout is never a lost connection by itself: on Python 3.11+ ``TimeoutError`` is an ``OSError``, but
asyncpg's ``command_timeout`` leaves the connection open (it cancels the statement on the server).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from ._asyncpg import is_connected, sent_so_far
from .errors import LoopBridgeError

__all__ = [
    "CONNECTION_FAILURES",
    "DEAD_CONNECTION_RETRIES",
    "died_in_acquire",
    "died_unsent",
    "discard",
    "is_connection_failure",
    "lost_connection",
]

#: How often a call whose connection turned out dead before anything was sent runs again. After a
#: server restart every idle connection of a pool may be dead, and asyncpg notices each one only when it
#: is used; the call's own timeout bounds the retries as well.
DEAD_CONNECTION_RETRIES = 3

#: What asyncpg raises when the connection is gone, depending on when and how it noticed (a socket
#: error, the server's FATAL, a protocol left mid-exchange by either, a closed connection).
CONNECTION_FAILURES = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
)

_TIMEOUTS = (TimeoutError, asyncio.TimeoutError)


def is_connection_failure(exc: BaseException) -> bool:
    """Is *exc* one of asyncpg's (or the socket's) ways of saying a connection broke, or may have? Not a
    timeout, and not one of loopbridge's own errors."""
    return (
        isinstance(exc, CONNECTION_FAILURES)
        and not isinstance(exc, _TIMEOUTS)
        and not isinstance(exc, LoopBridgeError)
    )


def lost_connection(exc: BaseException, protocol: Any) -> bool:
    """Did *exc* end the call because the connection died (rather than the server refusing a query)?

    Only asyncpg's (and the socket's) ways of reporting a broken connection count, and only when the
    connection is indeed closed, or the server's error was FATAL (it ends the session; asyncpg may not
    have seen the socket close yet). An error of the caller's own, or an InterfaceError on a connection
    that is still open ("another operation is in progress"), is left alone.
    """
    if not is_connection_failure(exc):
        return False
    if getattr(exc, "severity", None) in ("FATAL", "PANIC"):
        return True
    # Ask the protocol, not the connection proxy: asyncpg detaches the proxy of a connection that closed.
    return is_connected(protocol) is False


def died_unsent(exc: BaseException, protocol: Any, sent_before: int | None) -> bool:
    """*exc* says the connection of *protocol* died, and nothing had been sent on it since
    *sent_before* was read. Take *protocol* before the call: a connection that closed lets go of it."""
    return sent_before is not None and sent_so_far(protocol) == sent_before and lost_connection(exc, protocol)


def discard(connection: Any) -> None:
    """Close *connection* (a pool proxy) at once, so that it is never pooled again: the server rolls
    back whatever transaction it was in. Nothing happens if it is closed and released already."""
    try:
        connection.terminate()
    except asyncpg.InterfaceError:  # closed, so asyncpg has released it already
        pass


def died_in_acquire(exc: BaseException) -> bool:
    """Did the pool fail to hand out a connection because that connection died (not because it could
    not connect, was closed, timed out, or the caller's ``setup`` failed)?"""
    if isinstance(exc, (LoopBridgeError, *_TIMEOUTS)):  # ConnectError, PoolTimeoutError: the caller's
        return False
    return isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError, OSError))
