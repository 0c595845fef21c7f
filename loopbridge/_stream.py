"""Streaming rows: a cursor on the bridge loop, rows handed across in batches, for ``for`` and ``async for``.

::

    for row in db.iterate("SELECT * FROM events", prefetch=1000):          # sync code
        writer.writerow(row)

    async for row in db.iterate("SELECT * FROM events"):                   # async code, any loop
        await websocket.send_json(dict(row))

A producer task on the bridge loop fetches a batch at a time from a cursor and puts each batch in a pipe
(a janus queue, see ``loopbridge._pipe``) that holds one batch: when the consumer is slow the producer
waits, so memory holds about three batches (the one being consumed, the one queued, the one being
fetched), whatever the size of the result. A sync consumer reads the queue's sync side directly; an
async consumer crosses to the bridge loop for each batch (it must not touch the queue's async side,
which belongs to the bridge loop).

Whatever stops the consumer early (``break``, ``close()``, an exception in the loop body, the iterator
being garbage collected, its owner going away) stops the producer and gives everything back.
``with ... as rows:`` (or ``async with``) makes that prompt and explicit.

The machinery is written once, for any cursor: :class:`Stream` is the caller's handle, :class:`Producer`
the bridge loop's side, and a :class:`Batches` says where the batches come from and how to give the
cursor back. Two kinds use it: :class:`RowStream` (``iterate()`` of a Database or a Transaction: an
asyncpg cursor, in the stream's own transaction or the caller's; see :class:`_CursorBatches`), and the
streams of ``loopbridge.sqlalchemy`` sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

import asyncpg
from asyncpg.cursor import Cursor

from ._asyncpg import close_portal
from ._call import ToCompletion
from ._limits import call_timeout
from ._owner import Finalizer, Owner, OwnerWatch, abandon_soon, guard
from ._pipe import End, Pipe, PipeClosed
from ._session_state import may_change_session_state, note_change
from ._twins import NotAwaitable, twin_contexts
from .errors import (
    BridgeClosedError,
    CallTimeoutError,
    ConfigurationError,
    ConnectionLostError,
    DatabaseClosedError,
    DeadlockError,
    TransactionClosedError,
)

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

if TYPE_CHECKING:
    from ._source import Source
    from .bridge import Bridge

__all__ = ["DEFAULT_PREFETCH", "Batches", "Producer", "RowStream", "Stream", "StreamMethods"]

logger = logging.getLogger("loopbridge")

T = TypeVar("T")

#: Rows fetched per round trip, and per batch handed across, unless ``prefetch=`` says otherwise.
DEFAULT_PREFETCH = 1000


def check_prefetch(prefetch: object) -> int:
    """:raises ConfigurationError: unless *prefetch* is a positive number of rows."""
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 1:
        raise ConfigurationError(f"prefetch must be a positive number of rows, not {prefetch!r}")
    return prefetch


# -- the machinery, for any cursor ----------------------------------------------------------------------


class Batches(Protocol[T]):
    """Where a stream's batches come from, on the bridge loop."""

    async def open(self, producer: Producer[T]) -> bool:
        """Run the statement and open the cursor (beginning a transaction of the stream's own first, if
        it has one). On failure, leave nothing held and raise. True if the stream is to watch its owner
        itself (False: what the cursor lives in does, and closes the stream when it ends)."""

    async def fetch(self) -> tuple[list[T], bool]:
        """The next batch, and whether it is the last."""

    async def finish(self, exhausted: bool, error: BaseException | None) -> None:
        """Give the cursor back: every row was read (*exhausted*), or the stream stopped early, because
        of *error* or (None) because the consumer stopped."""

    def may_cancel_fetch(self) -> bool:
        """Whether a fetch under way may be cancelled when the consumer stops, rather than waited for."""

    def explain(self, exc: BaseException) -> BaseException:
        """The error for the reader when fetching raised *exc*."""

    def ended(self, why: str) -> BaseException:
        """The error for a reader still reading when what the cursor lives in ends (see
        :meth:`Producer._abandon_on_bridge`)."""


class Producer(Generic[T]):
    """The bridge loop's side of a stream: the producer task, the pipe, who watches the owner."""

    __slots__ = (
        "batches",
        "bridge",
        "closing",
        "fetching",
        "finalizer",
        "interrupted",
        "label",
        "opened",
        "pipe",
        "producer",
        "watch",
    )

    def __init__(self, batches: Batches[T], bridge: Bridge, label: str) -> None:
        self.batches = batches
        self.bridge = bridge
        self.label = label
        self.opened = False
        self.closing = False
        self.fetching = False
        # Set (from the consumer's thread, before it asks for the close) when the consumer's wait for
        # rows was cut short: a timeout, Ctrl-C, a cancelled task. See aclose.
        self.interrupted = False
        self.pipe: Pipe[list[T]] = Pipe.finished(label)  # until open(), on the bridge loop
        self.producer: asyncio.Task[None] | None = None
        self.watch: OwnerWatch | None = None
        self.finalizer: Finalizer | None = None

    async def open(self, handle: object, owner: Owner | None) -> None:
        """Open the cursor and start producing. *owner*: close the stream when it goes away, if the
        batches ask for that."""
        assert not self.opened, "a stream opens once"
        self.opened = True
        watch_owner = await self.batches.open(self)
        self.pipe = Pipe(1, self.label)
        self.producer = asyncio.get_running_loop().create_task(self._produce())
        if watch_owner and owner is not None:
            self.watch = OwnerWatch(self, owner)
        self.finalizer = guard(handle, self.bridge, self, "a row stream")

    async def _produce(self) -> None:
        error: BaseException | None = None
        exhausted = False
        try:
            while True:
                self.fetching = True
                try:
                    batch, last = await self.batches.fetch()
                finally:
                    self.fetching = False
                if batch:
                    await self.pipe.put(batch)
                if last:
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
            error = self.batches.explain(exc)
        try:
            await self.batches.finish(exhausted, error)
        except BaseException as exc:  # COMMIT failed: the rows read came from a transaction that failed
            error = error or exc
        finally:
            if self.watch is not None:
                self.watch.cancel()
            if self.finalizer is not None:
                self.finalizer.detach()
            # Last, so that a consumer seeing the end knows the connection is back in the pool.
            self.pipe.finish(error)

    async def aclose(self, error: BaseException | None = None) -> None:
        """Stop the producer and wait until it is done: the cursor given back (and, in the stream's own
        transaction, the connection). Idempotent. The reader, if still reading, gets *error* (or the end
        of the rows)."""
        self.closing = True
        self.pipe.close(error)  # wakes a producer waiting on the pipe
        producer = self.producer
        if producer is None:
            return
        if self.fetching and (self.interrupted or self.batches.may_cancel_fetch()):
            producer.cancel()
        # Our caller may stop waiting (Ctrl-C); the producer still finishes on its own.
        await asyncio.wait((producer,))

    async def _abandon_on_bridge(self, why: str) -> None:
        """Close a stream nobody closed (see loopbridge._owner), or one whose transaction ends."""
        if not self.closing:
            logger.debug("%s: %s; closing the stream", self.label, why)
        # Usually nobody reads any more. When the enclosing transaction ended under a reader that
        # still iterates, the reader must hear it: rows missing without an error would be data lost.
        # Closed already, it may still be finishing a fetch: an ending transaction waits for that.
        await self.aclose(self.batches.ended(why))


_HandleState = Literal["new", "open", "done", "closed"]

_STREAM_INSTEAD = "iterate the stream with 'async for' (or close it and use 'await db.afetch(...)')"


class Stream(NotAwaitable, Generic[T]):
    """The caller's side of a stream: iterate it once, with ``for`` or ``async for``; it is also a
    context manager (``with`` / ``async with``) that closes it. Opened at the first row asked for, or
    when a block enters it, unless it was opened on the bridge loop already."""

    __slots__ = ("__weakref__", "_batch", "_core", "_index", "_state", "_timeout")

    def __init__(self, batches: Batches[T], bridge: Bridge, label: str, timeout: float | None) -> None:
        self._core: Producer[T] = Producer(batches, bridge, label)
        self._timeout = None if timeout is None else call_timeout(timeout, label)
        self._batch: list[T] = []
        self._index = 0
        self._state: _HandleState = "new"

    @property
    def bridge(self) -> Bridge:
        return self._core.bridge

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._core.label} {self._state}>"

    def _after_close(self) -> None:
        """What iterating a stream its caller closed does: end (a subclass may raise instead)."""

    # -- sync ---------------------------------------------------------------------------------------

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> T:
        if self._index < len(self._batch):
            row = self._batch[self._index]
            self._index += 1
            return row
        if self._state == "new":
            self.__enter__()
        if self._state != "open":
            if self._state == "closed":
                self._after_close()
            raise StopIteration
        try:
            batch = self._core.pipe.receive(self.bridge, self._timeout, _STREAM_INSTEAD)
        except DeadlockError:  # refused before waiting: the stream is as it was
            raise
        except Exception as exc:  # from the server, or a timeout: the stream is over, and closed on return
            if isinstance(exc, CallTimeoutError):  # the wait for rows was cut short
                self._core.interrupted = True
            with contextlib.suppress(Exception):
                self._stop()
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
        """Stop the stream and give back what it holds (the cursor, its transaction, the connection).
        Blocks until that is done; safe to call twice."""
        self._batch, self._state = [], "closed"
        self._stop()

    def _stop(self) -> None:
        if self._state == "open":
            self._state = "done"
        if self._core.opened:
            # Run to completion: Ctrl-C stops this wait, not the closing (see ToCompletion).
            self.bridge._run(ToCompletion(self._core.aclose), (), None, None, f"{self._core.label}.close()")

    # -- async --------------------------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        if self._index < len(self._batch):
            row = self._batch[self._index]
            self._index += 1
            return row
        if self._state == "new":
            await self.__aenter__()
        if self._state != "open":
            if self._state == "closed":
                self._after_close()
            raise StopAsyncIteration
        try:
            batch = await self._core.pipe.areceive(self.bridge, self._timeout)
        except Exception as exc:
            if isinstance(exc, CallTimeoutError):  # the wait for rows was cut short
                self._core.interrupted = True
            with contextlib.suppress(Exception):
                await self._astop()
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
        self._batch, self._state = [], "closed"
        await self._astop()

    async def _astop(self) -> None:
        if self._state == "open":
            self._state = "done"
        if self._core.opened:
            await self.bridge._arun(
                ToCompletion(self._core.aclose), (), None, None, f"{self._core.label}.aclose()"
            )

    # -- both ---------------------------------------------------------------------------------------

    async def _open(self, owner: Owner) -> Self:
        """Open the cursor and start the producer. Once: entering a stream already started (or closed)
        just returns it."""
        if self._state == "new":
            self._state = "open"
            await self._core.open(self, owner)
        return self

    async def _close(self, error: BaseException | None) -> None:
        """Stop the stream and give back what it holds."""
        self._batch, self._state = [], "closed"
        await self._core.aclose()

    __enter__, __exit__, __aenter__, __aexit__ = twin_contexts(_open, _close)

    async def _opened_here(self) -> Self:
        """On the bridge loop: open now, for a stream whose statement runs before it is handed out (what
        it lives in watches its owner)."""
        self._state = "open"
        await self._core.open(self, None)
        return self

    def _broken(self, error: BaseException) -> None:
        # The wait for a batch was interrupted: stop the producer without waiting for it.
        self._batch, self._state = [], "done"
        self._core.interrupted = True
        abandon_soon(self.bridge, self._core, f"{type(error).__name__} while waiting for rows")


# -- rows of a Database or a Transaction: an asyncpg cursor -------------------------------------------


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
    """What ``iterate()`` runs on: a Database (a transaction of the stream's own) or a Transaction."""

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
        label = f"{type(self).__name__}.iterate()"
        batches = _CursorBatches(self, query, args, check_prefetch(prefetch), label)
        return RowStream(batches, self.bridge, label, timeout)


class RowStream(Stream[asyncpg.Record]):
    """The rows of one query (asyncpg ``Record`` objects), streamed from the bridge loop. Iterate it
    once, with ``for`` or ``async for``; it is also a context manager (``with`` / ``async with``) that
    closes it.

    :raises TransactionClosedError: on a stream inside a transaction, if the transaction ended (or
        lost its connection) while rows were still being read.
    :raises ConnectionLostError: on a stream of a Database (in a transaction of its own), if its
        connection was lost; asyncpg's error is the cause.
    :raises DatabaseClosedError: if the Database was closed while rows were being read.
    :raises BridgeClosedError: if the bridge was closed while rows were being read.
    """

    __slots__ = ()

    _right_form = "'async for row in db.iterate(...):'"


class _CursorBatches:
    """An asyncpg cursor in a transaction: the stream's own (``db.iterate``), begun before the cursor is
    declared and ended with it, or the caller's (``tx.iterate``), where statements may run between
    batches. In the caller's transaction, stopping never cancels a fetch under way (that would abort the
    transaction): see :meth:`may_cancel_fetch`."""

    __slots__ = (
        "args",
        "cursor",
        "label",
        "owns_transaction",
        "prefetch",
        "producer",
        "query",
        "source",
        "transaction",
    )

    def __init__(
        self, source: StreamSource, query: str, args: tuple[Any, ...], prefetch: int, label: str
    ) -> None:
        self.source = source
        self.query = query
        self.args = args
        self.prefetch = prefetch
        self.label = label
        self.transaction: CursorTransaction | None = None
        self.owns_transaction = False
        self.cursor: Cursor[asyncpg.Record] | None = None
        self.producer: Producer[asyncpg.Record] | None = None

    async def open(self, producer: Producer[asyncpg.Record]) -> bool:
        self.producer = producer
        core, owned = self.source._streaming_transaction()
        self.transaction, self.owns_transaction = core, owned
        if owned:
            await core.begin(producer, None)  # the stream watches its owner itself
        else:
            core.add_dependent(producer)  # the caller's transaction watches its owner, and ends us
        try:
            async with core.statement() as con:
                if may_change_session_state(self.query):  # SELECT set_config(...), say
                    note_change(con)
                self.cursor = await con.cursor(self.query, *self.args)
        except BaseException as exc:
            await self._end_transaction(exc)
            raise
        return owned

    async def fetch(self) -> tuple[list[asyncpg.Record], bool]:
        assert self.transaction is not None
        assert self.cursor is not None
        async with self.transaction.statement(check_first=False):
            batch = await self.cursor.fetch(self.prefetch)
        return batch, len(batch) < self.prefetch

    async def finish(self, exhausted: bool, error: BaseException | None) -> None:
        if not exhausted and error is None and not self.owns_transaction:
            await self._close_cursor()
        await self._end_transaction(None if exhausted else error or _Stopped())

    async def _close_cursor(self) -> None:
        """CLOSE the cursor of a stream stopped early in the caller's transaction, which goes on: until
        the transaction ends, an open cursor keeps what it holds on the server.

        asyncpg's Cursor has no public close (see ``loopbridge._asyncpg``): without it the cursor stays
        open until the transaction ends. Failing to close it is harmless for the same reason (and a
        transaction that ended or lost its connection closed it already).
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
            transaction.remove_dependent(self.producer)
        # The producer and its batches refer to each other: a cycle that would keep the source (and a
        # Database nothing else holds) alive until the cyclic collector runs.
        self.producer = None

    def may_cancel_fetch(self) -> bool:
        """Whether a fetch still waiting for the server may be cancelled, rather than waited for.

        Cancelling a query makes the server abort the transaction it runs in. That is the stream's
        own transaction (rolled back anyway), or the caller's: never abort that one because its stream
        stopped early (a ``break``, ``close()``, the end of a block). The caller's transaction keeps
        going then, so wait for the fetch, one batch, and CLOSE the cursor after it. Cancel only when
        that transaction rolls back anyway, or when the consumer's own wait for rows was cut short
        (a timeout, Ctrl-C, a cancelled task: the producer checks that itself), as a statement's would
        be: its block then fails at its end if the error was caught (see loopbridge.transaction).
        """
        transaction = self.transaction
        return self.owns_transaction or (transaction is not None and transaction.rolling_back)

    def explain(self, exc: BaseException) -> BaseException:
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

    def ended(self, why: str) -> BaseException:
        return TransactionClosedError(f"{self.label} stopped: {why}")


class _Stopped(Exception):
    """The reason handed to the stream's own transaction when it ends before the rows did."""
