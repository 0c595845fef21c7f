"""Streaming rows: a server-side cursor on the bridge loop, rows handed across in batches.

::

    for row in db.iterate("SELECT * FROM events", prefetch=1000):          # sync code
        writer.writerow(row)

    async for row in db.iterate("SELECT * FROM events"):                   # async code, any loop
        await websocket.send_json(dict(row))

A producer task on the bridge loop fetches ``prefetch`` rows at a time from a cursor and puts each
batch in a pipe (a janus queue, see ``loopbridge._pipe``) that holds one batch: when the consumer is
slow the producer waits, so memory holds about three batches (the one being consumed, the one queued,
the one being fetched), whatever the size of the result. The cursor lives in a transaction: one of the
stream's own from ``db.iterate`` (committed when the rows are exhausted, rolled back otherwise), or the
enclosing one from ``tx.iterate`` (where statements may run between batches).

A sync consumer reads the queue's sync side directly; an async consumer crosses to the bridge loop for
each batch (it must not touch the queue's async side, which belongs to the bridge loop).

Whatever stops the consumer early (``break``, ``close()``, an exception in the loop body, the iterator
being garbage collected, its owner going away) closes the cursor, ends the transaction and returns the
connection. ``with db.iterate(...) as rows:`` (or ``async with``) makes that prompt and explicit. In the
caller's transaction, stopping never cancels a fetch under way (that would abort the transaction): see
``_Core._may_cancel_fetch``.

The stream knows its transaction only through :class:`CursorTransaction` (what
``loopbridge.transaction`` provides), so that this module imports neither the transaction nor the
Database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Literal, Protocol

import asyncpg
from asyncpg.cursor import Cursor

from ._asyncpg import close_portal
from ._call import ToCompletion
from ._owner import Finalizer, Owner, OwnerWatch, abandon_soon, guard
from ._pipe import End, Pipe, PipeClosed
from ._twins import NotAwaitable, twin_contexts
from .errors import (
    BridgeClosedError,
    CallTimeoutError,
    ConfigurationError,
    ConnectionLostError,
    DatabaseClosedError,
    TransactionClosedError,
)

if TYPE_CHECKING:
    from ._source import Source
    from .bridge import Bridge

__all__ = ["DEFAULT_PREFETCH", "RowStream", "StreamMethods"]

logger = logging.getLogger("loopbridge")

#: Rows fetched per round trip, and per batch handed across, unless ``prefetch=`` says otherwise.
DEFAULT_PREFETCH = 1000


class CursorTransaction(Protocol):
    """The bridge loop's side of the transaction a stream declares its cursor in."""

    source: Source
    rolling_back: bool

    async def begin(self, handle: object, owner: Owner | None) -> None: ...

    def statement(
        self, *, kind: Literal["sql", "callers", "close"] = "sql", check_first: bool = True
    ) -> contextlib.AbstractAsyncContextManager[Any]: ...

    def add_dependent(self, dependent: Any) -> None: ...

    def remove_dependent(self, dependent: Any) -> None: ...

    async def end(self, error: BaseException | None) -> None: ...

    def is_lost(self) -> bool: ...


class StreamSource(Protocol):
    """What a stream runs on: a Database (a transaction of the stream's own) or a Transaction."""

    @property
    def bridge(self) -> Bridge: ...

    def _streaming_transaction(self) -> tuple[CursorTransaction, bool]:
        """The transaction to declare the cursor in, and whether the stream owns (begins, ends) it."""
        ...


class StreamMethods:
    """``iterate``, shared by :class:`~loopbridge.Database` and :class:`~loopbridge.Transaction`."""

    __slots__ = ()

    def iterate(
        self: StreamSource,
        query: str,
        *args: Any,
        prefetch: int = DEFAULT_PREFETCH,
        timeout: float | None = None,
    ) -> RowStream:
        """Stream the rows of *query* through a server-side cursor: ``for row in db.iterate(...)`` in
        sync code, ``async for row in db.iterate(...)`` in async code (on any loop).

        Nothing runs until iteration starts (or ``with`` / ``async with`` enters). *prefetch* rows are
        fetched per round trip and handed across per batch; at most about three batches are in memory
        at once. On a Database the cursor runs in a transaction of its own, committed once every row
        was read and rolled back if the stream stops early; on a Transaction it runs in that
        transaction.

        Stopping early (``break``, an exception) closes the cursor and returns the connection when the
        iterator is garbage collected; ``with db.iterate(...) as rows:`` (or ``async with``),
        ``rows.close()`` or ``await rows.aclose()`` do it at once.

        :param timeout: seconds for each wait for a batch (the first one includes running the query);
            on expiry the stream is closed and :class:`~loopbridge.CallTimeoutError` raised.
        :raises ConfigurationError: if *prefetch* is not a positive integer.
        """
        return RowStream(self, query, args, prefetch, timeout, f"{type(self).__name__}.iterate()")


_HandleState = Literal["new", "open", "done"]


class RowStream(NotAwaitable):
    """The rows of one query, streamed from the bridge loop. Iterate it once, with ``for`` or
    ``async for``; it is also a context manager (``with`` / ``async with``) that closes it.

    :raises TransactionClosedError: on a stream inside a transaction, if the transaction ended (or
        lost its connection) while rows were still being read.
    :raises ConnectionLostError: on a stream of a Database (in a transaction of its own), if its
        connection was lost; asyncpg's error is the cause.
    :raises DatabaseClosedError: if the Database was closed while rows were being read.
    :raises BridgeClosedError: if the bridge was closed while rows were being read.
    """

    __slots__ = ("__weakref__", "_batch", "_core", "_index", "_state", "_timeout")

    _right_form = "'async for row in db.iterate(...):'"

    def __init__(
        self,
        source: StreamSource,
        query: str,
        args: tuple[Any, ...],
        prefetch: int,
        timeout: float | None,
        label: str,
    ) -> None:
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 1:
            raise ConfigurationError(f"prefetch must be a positive number of rows, not {prefetch!r}")
        self._core = _Core(source, query, args, prefetch, label)
        self._timeout = timeout
        self._batch: list[asyncpg.Record] = []
        self._index = 0
        self._state: _HandleState = "new"

    @property
    def bridge(self) -> Bridge:
        return self._core.bridge

    def __repr__(self) -> str:
        return f"<RowStream {self._core.label} {self._state}>"

    # -- sync ---------------------------------------------------------------------------------------

    def __iter__(self) -> RowStream:
        return self

    def __next__(self) -> asyncpg.Record:
        if self._index < len(self._batch):
            row = self._batch[self._index]
            self._index += 1
            return row
        if self._state == "new":
            self.__enter__()
        if self._state == "done":
            raise StopIteration
        try:
            batch = self._core.pipe.receive(self._timeout)
        except Exception as exc:  # from the server, or a timeout: the stream is over, and closed on return
            if isinstance(exc, CallTimeoutError):  # the wait for rows was cut short
                self._core.interrupted = True
            with contextlib.suppress(Exception):
                self.close()
            raise
        except BaseException as exc:  # Ctrl-C: do not make an interrupted caller wait again
            self._broken(exc)
            raise
        if isinstance(batch, End):
            self._state = "done"
            raise StopIteration
        self._batch, self._index = batch, 1
        return batch[0]

    def close(self) -> None:
        """Stop the stream: close the cursor, end its transaction, return the connection. Blocks until
        that is done; safe to call twice."""
        self._batch, self._state = [], "done"
        if self._core.opened:
            # Run to completion: Ctrl-C stops this wait, not the closing (see ToCompletion).
            self.bridge._run(ToCompletion(self._core.aclose), (), None, None, f"{self._core.label}.close()")

    # -- async --------------------------------------------------------------------------------------

    def __aiter__(self) -> RowStream:
        return self

    async def __anext__(self) -> asyncpg.Record:
        if self._index < len(self._batch):
            row = self._batch[self._index]
            self._index += 1
            return row
        if self._state == "new":
            await self.__aenter__()
        if self._state == "done":
            raise StopAsyncIteration
        try:
            batch = await self._core.pipe.areceive(self.bridge, self._timeout)
        except Exception as exc:
            if isinstance(exc, CallTimeoutError):  # the wait for rows was cut short
                self._core.interrupted = True
            with contextlib.suppress(Exception):
                await self.aclose()
            raise
        except BaseException as exc:  # a cancelled task must not wait again
            self._broken(exc)
            raise
        if isinstance(batch, End):
            self._state = "done"
            raise StopAsyncIteration
        self._batch, self._index = batch, 1
        return batch[0]

    async def aclose(self) -> None:
        """:meth:`close` for async code, from any loop."""
        self._batch, self._state = [], "done"
        if self._core.opened:
            await self.bridge._arun(
                ToCompletion(self._core.aclose), (), None, None, f"{self._core.label}.aclose()"
            )

    # -- both ---------------------------------------------------------------------------------------

    async def _open(self, owner: Owner) -> RowStream:
        """Declare the cursor (beginning the stream's own transaction first) and start the producer.
        Once: entering a stream already started (or closed) just returns it."""
        if self._state == "new":
            self._state = "open"
            await self._core.open(self, owner)
        return self

    async def _close(self, error: BaseException | None) -> None:
        """Close the cursor, end the stream's transaction (if its own) and return the connection."""
        self._batch, self._state = [], "done"
        await self._core.aclose()

    __enter__, __exit__, __aenter__, __aexit__ = twin_contexts(_open, _close)

    def _broken(self, error: BaseException) -> None:
        # The wait for a batch was interrupted: stop the producer without waiting for it.
        self._batch, self._state = [], "done"
        self._core.interrupted = True
        abandon_soon(self.bridge, self._core, f"{type(error).__name__} while waiting for rows")


class _Core:
    """The bridge loop's side of a stream: the cursor, its transaction, the producer and the pipe."""

    __slots__ = (
        "args",
        "bridge",
        "closing",
        "cursor",
        "fetching",
        "finalizer",
        "interrupted",
        "label",
        "opened",
        "owns_transaction",
        "pipe",
        "prefetch",
        "producer",
        "query",
        "source",
        "transaction",
        "watch",
    )

    def __init__(
        self, source: StreamSource, query: str, args: tuple[Any, ...], prefetch: int, label: str
    ) -> None:
        self.source = source
        self.bridge = source.bridge
        self.query = query
        self.args = args
        self.prefetch = prefetch
        self.label = label
        self.opened = False
        self.closing = False
        self.fetching = False
        # Set (from the consumer's thread, before it asks for the close) when the consumer's wait for
        # rows was cut short: a timeout, Ctrl-C, a cancelled task. See aclose.
        self.interrupted = False
        self.transaction: CursorTransaction | None = None
        self.owns_transaction = False
        self.cursor: Cursor[asyncpg.Record] | None = None
        self.pipe: Pipe[list[asyncpg.Record]] = Pipe.finished(label)  # until open(), on the bridge loop
        self.producer: asyncio.Task[None] | None = None
        self.watch: OwnerWatch | None = None
        self.finalizer: Finalizer | None = None

    async def open(self, handle: RowStream, owner: Owner) -> None:
        assert not self.opened, "a stream opens once"
        self.opened = True
        core, owned = self.source._streaming_transaction()
        self.transaction, self.owns_transaction = core, owned
        if owned:
            await core.begin(handle, None)  # the stream watches its owner itself, below
        else:
            core.add_dependent(self)
        try:
            async with core.statement() as con:
                self.cursor = await con.cursor(self.query, *self.args)
        except BaseException as exc:
            await self._end_transaction(exc)
            raise
        self.pipe = Pipe(1, self.label)
        self.producer = asyncio.get_running_loop().create_task(self._produce())
        if owned:
            self.watch = OwnerWatch(self, owner)
        self.finalizer = guard(handle, self.bridge, self, "a row stream")

    async def _produce(self) -> None:
        core = self.transaction
        assert core is not None
        assert self.cursor is not None
        error: BaseException | None = None
        exhausted = False
        try:
            while True:
                async with core.statement(check_first=False):
                    self.fetching = True
                    try:
                        batch = await self.cursor.fetch(self.prefetch)
                    finally:
                        self.fetching = False
                if batch:
                    await self.pipe.put(batch)
                if len(batch) < self.prefetch:
                    exhausted = True
                    break
        except PipeClosed:  # the consumer closed the stream
            pass
        except asyncio.CancelledError:
            if not self.closing:
                error = BridgeClosedError(
                    f"{self.label} was stopped because its bridge was closed while rows were being read"
                )
        except BaseException as exc:
            error = self._explain(exc)
        try:
            if not exhausted and error is None and not self.owns_transaction:
                await self._close_cursor()
            await self._end_transaction(None if exhausted else error or _Stopped())
        except BaseException as exc:  # COMMIT failed: the rows read came from a transaction that failed
            error = error or exc
        finally:
            if self.watch is not None:
                self.watch.cancel()
            if self.finalizer is not None:
                self.finalizer.detach()
            # Last, so that a consumer seeing the end knows the connection is back in the pool.
            self.pipe.finish(error)

    async def _close_cursor(self) -> None:
        """CLOSE the cursor of a stream stopped early in the caller's transaction, which goes on: until
        the transaction ends, an open cursor keeps what it holds on the server.

        asyncpg's Cursor has no public close: its private one is read through getattr, so that another
        asyncpg only leaves the cursor open until the transaction ends. Failing to close it is harmless
        for the same reason (and a transaction that ended or lost its connection closed it already).
        """
        assert self.transaction is not None
        close = close_portal(self.cursor)
        if close is None:
            return
        try:
            async with self.transaction.statement(kind="close"):
                await close()
        except Exception as exc:
            logger.debug("%s: closing the cursor failed: %r", self.label, exc)

    async def _end_transaction(self, error: BaseException | None) -> None:
        transaction = self.transaction
        if transaction is None:
            return
        if self.owns_transaction:
            await transaction.end(error)
        else:
            transaction.remove_dependent(self)

    def _explain(self, exc: BaseException) -> BaseException:
        """The error for the reader when fetching raised *exc*."""
        core = self.transaction
        assert core is not None
        broken = (
            asyncpg.InterfaceError,
            asyncpg.PostgresConnectionError,
            OSError,
            TransactionClosedError,
            DatabaseClosedError,
            ConnectionLostError,
        )
        error: BaseException
        if core.source.closed and isinstance(exc, broken):
            # Closing the Database terminates the connections still in use after its timeout: say so,
            # rather than leave the reader with a bare "connection is closed".
            error = DatabaseClosedError(
                f"{self.label} stopped: its Database was closed while rows were being read"
            )
            error.__cause__ = exc
            return error
        lost = isinstance(exc, ConnectionLostError) or (
            isinstance(exc, TransactionClosedError) and core.is_lost()
        )
        if lost and self.owns_transaction:
            # The transaction is the stream's own, which the reader never opened: a lost connection
            # is said as for any other call. (In the caller's transaction, the transaction's own
            # errors say it, as for its other statements.)
            cause = exc.__cause__ or exc  # asyncpg's error (see loopbridge.transaction._Step)
            detail = core.source.redact(str(cause) or type(cause).__name__)
            error = ConnectionLostError(
                f"{self.label} stopped: its connection was lost while rows were being read "
                f"({type(cause).__name__}: {detail}). The rows before it were delivered; the pool opens "
                "a new connection: run the query again"
            )
            error.__cause__ = cause
            return error
        return exc

    async def aclose(self, error: BaseException | None = None) -> None:
        """Stop the producer and wait until it is done: the cursor closed, the connection back (or, in
        the caller's transaction, free for its next statement). Idempotent.

        The reader, if still reading, gets *error* (or the end of the rows).
        """
        self.closing = True
        self.pipe.close(error)  # wakes a producer waiting on the pipe
        producer = self.producer
        if producer is None:
            return
        if self.fetching and self._may_cancel_fetch():
            producer.cancel()
        # Our caller may stop waiting (Ctrl-C); the producer still finishes on its own.
        await asyncio.wait((producer,))

    def _may_cancel_fetch(self) -> bool:
        """Whether a fetch still waiting for the server may be cancelled, rather than waited for.

        Cancelling a query makes the server abort the transaction it runs in. That is the stream's
        own transaction (rolled back anyway), or the caller's: never abort that one because its stream
        stopped early (a ``break``, ``close()``, the end of a block). The caller's transaction keeps
        going then, so wait for the fetch, one batch, and CLOSE the cursor after it. Cancel only when
        that transaction rolls back anyway, or when the consumer's own wait for rows was cut short
        (a timeout, Ctrl-C, a cancelled task), as a statement's would be: its block then fails at its
        end if the error was caught (see loopbridge.transaction).
        """
        transaction = self.transaction
        return (
            self.owns_transaction
            or self.interrupted
            or (transaction is not None and transaction.rolling_back)
        )

    async def _abandon_on_bridge(self, why: str) -> None:
        """Close a stream nobody closed (see loopbridge._owner), or one whose transaction ends."""
        if not self.closing:
            logger.debug("%s: %s; closing the stream", self.label, why)
        # Usually nobody reads any more. When the enclosing transaction ended under a reader that
        # still iterates, the reader must hear it: rows missing without an error would be data lost.
        # Closed already, it may still be finishing a fetch: an ending transaction waits for that.
        await self.aclose(TransactionClosedError(f"{self.label} stopped: {why}"))


class _Stopped(Exception):
    """The reason handed to the stream's own transaction when it ends before the rows did."""
