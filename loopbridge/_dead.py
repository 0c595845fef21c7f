"""Dead connections: how to tell that a connection died under a call, and when running it again is safe.

A pooled connection can die while it sits idle (its backend terminated, the server restarted) and be
handed out before asyncpg has seen its socket close; it can die while the pool sets it up; it can die in
the middle of a call. asyncpg reports each in its own terms: ``ConnectionDoesNotExistError``, a FATAL
``AdminShutdownError``, ``InterfaceError("connection is closed")``, or ``InternalClientError("cannot
switch to state 11; another operation (2) is in progress")`` when the server's FATAL arrived between two
calls. The stress suite met all of them.

Running a call again is safe only if nothing that could change data was sent. asyncpg counts what it
sends on a connection (``queries_count``: a Bind/Execute or a simple query; a Parse/Describe, which
changes nothing, is not counted), so a count unchanged since the call began proves it.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from .errors import LoopBridgeError

__all__ = [
    "CONNECTION_FAILURES",
    "DEAD_CONNECTION_RETRIES",
    "died_in_acquire",
    "died_unsent",
    "discard",
    "lost_connection",
    "protocol_of",
    "sent_so_far",
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


def protocol_of(connection: object) -> Any:
    """The asyncpg protocol behind a connection or its pool proxy, or None. Not public asyncpg API: read
    through getattr, so that a different asyncpg only ever turns retries off."""
    return getattr(connection, "_protocol", None)


def sent_so_far(connection: object) -> int | None:
    """How many statements asyncpg has sent on *connection* (or its protocol); None if it cannot tell."""
    protocol = protocol_of(connection) or connection
    count: int | None = getattr(protocol, "queries_count", None)
    return count


def lost_connection(exc: BaseException, protocol: Any) -> bool:
    """Did *exc* end the call because the connection died (rather than the server refusing a query)?

    Only asyncpg's (and the socket's) ways of reporting a broken connection count, and only when the
    connection is indeed closed, or the server's error was FATAL (it ends the session; asyncpg may not
    have seen the socket close yet). An error of the caller's own, or an InterfaceError on a connection
    that is still open ("another operation is in progress"), is left alone.
    """
    if not isinstance(exc, CONNECTION_FAILURES) or isinstance(exc, LoopBridgeError):
        return False
    if getattr(exc, "severity", None) in ("FATAL", "PANIC"):
        return True
    # Ask the protocol, not the connection proxy: asyncpg detaches the proxy of a connection that closed.
    is_connected = getattr(protocol, "is_connected", None)
    return is_connected is not None and not is_connected()


def died_unsent(exc: BaseException, protocol: Any, sent_before: int | None) -> bool:
    """*exc* says the connection of *protocol* died, and nothing had been sent on it since
    *sent_before* was read. Take *protocol* before the call: a connection that closed lets go of it."""
    sent = getattr(protocol, "queries_count", None)
    return sent_before is not None and sent == sent_before and lost_connection(exc, protocol)


def discard(connection: Any) -> None:
    """Close *connection* (a pool proxy) at once, so that it is never pooled again: the server rolls
    back whatever transaction it was in. Nothing happens if it is closed and released already."""
    try:
        connection.terminate()
    except asyncpg.InterfaceError:  # closed, so asyncpg has released it already
        pass


def died_in_acquire(exc: BaseException) -> bool:
    """Did the pool fail to hand out a connection because that connection died (not because it could
    not connect, was closed, or the caller's ``setup`` failed)?"""
    if isinstance(exc, LoopBridgeError):  # ConnectError, PoolTimeoutError: the caller's to see
        return False
    return isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError, OSError))
