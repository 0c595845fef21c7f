"""The exceptions loopbridge raises.

Every error that loopbridge itself raises derives from :class:`LoopBridgeError` *and* from the builtin it
most resembles, so ``except TimeoutError`` or ``except RuntimeError`` keep working in code that has never
heard of loopbridge. Errors raised by your own code or by asyncpg (``UniqueViolationError``, a syntax
error, ...) are **not** wrapped: they reach the caller unchanged, with a traceback that shows where on
the bridge they were raised.

The exceptions to that rule are the connection itself. Every failure to connect (refused, wrong
password, unknown database, DNS failure, timeout) becomes a :class:`ConnectError` naming host, port,
database and user; a connection that dies during a call (its backend terminated, the server restarting,
the network) becomes a :class:`ConnectionLostError`, whichever of asyncpg's many ways of saying so it
took. asyncpg's original error is the ``__cause__`` of both.
"""

from __future__ import annotations

import asyncio
import sys

__all__ = [
    "BridgeClosedError",
    "CallTimeoutError",
    "ConfigurationError",
    "ConnectError",
    "ConnectionLostError",
    "DatabaseClosedError",
    "DeadlockError",
    "LoopBridgeError",
    "PoolTimeoutError",
    "SubscriptionClosedError",
    "TransactionClosedError",
    "TransactionTimeoutError",
]


class LoopBridgeError(Exception):
    """Base class of the errors loopbridge itself raises."""


class BridgeClosedError(LoopBridgeError, RuntimeError):
    """The bridge is closed (or closing), or it was closed while the call was in flight.

    A bridge cannot be reopened: create a new :class:`~loopbridge.Bridge` (or use
    :func:`~loopbridge.default_bridge`, which replaces a closed default bridge).
    """


class DatabaseClosedError(LoopBridgeError, RuntimeError):
    """The :class:`~loopbridge.Database` was closed; create a new one to keep querying."""


class DeadlockError(LoopBridgeError, RuntimeError):
    """A blocking call was made on the bridge's own thread.

    The call would wait for the loop that is busy running the caller, forever. On the bridge loop,
    await the async twin instead (``await db.afetch(...)`` rather than ``db.fetch(...)``).
    """


# On Python 3.10, asyncio.TimeoutError is not yet the builtin; inherit from both so either
# ``except`` clause catches our timeouts.
_TIMEOUT_BASES: tuple[type[BaseException], ...] = (
    (TimeoutError,) if sys.version_info >= (3, 11) else (TimeoutError, asyncio.TimeoutError)
)


class CallTimeoutError(LoopBridgeError, *_TIMEOUT_BASES):  # type: ignore[misc]
    """A call did not finish within its ``timeout``; its work on the bridge loop was cancelled.

    For a single statement outside a transaction the server may still have committed it just before
    the cancellation arrived: treat the outcome as unknown and make writes idempotent (unique keys).
    """


class PoolTimeoutError(CallTimeoutError):
    """No pooled connection became free within the Database's ``pool_timeout``."""


class ConnectError(LoopBridgeError, ConnectionError):
    """A connection to PostgreSQL could not be established.

    The message names host, port, database and user (never the password); the original asyncpg or
    OS error is attached as ``__cause__``.
    """


class ConnectionLostError(LoopBridgeError, ConnectionError):
    """The connection died during the call: its backend was terminated, the server restarted or shut
    down, or the network failed.

    A transaction that had not committed was rolled back by the server. A single statement outside a
    transaction may have committed just before the connection died: treat its outcome as unknown and
    make writes you retry idempotent (unique keys). The pool replaces the connection; simply retry.
    A call that found its pooled connection dead *before* sending anything is retried on a fresh one
    by loopbridge itself and never raises this.
    """


class ConfigurationError(LoopBridgeError, ValueError):
    """A DSN or an option is invalid, or no DSN was given and none is configured."""


class TransactionClosedError(LoopBridgeError, RuntimeError):
    """A statement was sent on a transaction that can no longer take one.

    The message says which case it is: the transaction already ended (committed or rolled back), it was
    rolled back because its owner went away (the thread that began it ended, the event loop closed, the
    object was dropped), or its connection was lost (then the server rolled it back). In the last two
    cases nothing the transaction did was committed: begin a new transaction and do the work again.

    The statement that was running when the connection broke raises :class:`ConnectionLostError`;
    every statement after it raises this.

    The end of a ``with`` block raises it too when a statement in the block failed and its error was
    caught there: the server had aborted the transaction, so it was rolled back (a savepoint to its
    start) and nothing was kept. Let such errors propagate, or run the statement in a savepoint.
    """


class TransactionTimeoutError(TransactionClosedError, CallTimeoutError):
    """A transaction block's ``timeout=`` expired (``db.transaction(timeout=...)``, or the Database's
    ``transaction_timeout``): the statement running then was cancelled, the transaction rolled back (or
    its connection terminated, when the server did not answer the ROLLBACK) and its connection returned
    at once. Nothing it did was committed: begin a new transaction.

    Raised by that statement, by every later one, by the end of a block that would have committed, and
    by a block that could not begin in time. Both a :class:`TransactionClosedError` and a
    :class:`CallTimeoutError` (a ``TimeoutError``). A COMMIT cut off by the timeout is not this: its
    outcome is unknown, and it raises a plain :class:`CallTimeoutError` saying so.
    """


class SubscriptionClosedError(LoopBridgeError, RuntimeError):
    """:meth:`Subscription.get() <loopbridge.Subscription.get>` was called after the subscription was
    closed. Iterating a closed subscription simply ends."""
