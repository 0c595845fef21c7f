"""StreamResult: the rows of a server-side cursor, a batch per crossing, for ``for`` and ``async for``."""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar

import sqlalchemy.exc
from sqlalchemy.ext.asyncio import AsyncResult, AsyncScalarResult

from loopbridge._twins import twins
from loopbridge.bridge import Bridge
from loopbridge.errors import BridgeClosedError

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

if TYPE_CHECKING:
    from ._scope import _Scope

__all__ = ["StreamResult"]

T = TypeVar("T")  # what a stream yields

STREAM_CLOSED = (
    "this stream was closed (by close(), or by leaving its `with` block); run the statement again for "
    "more rows"
)


class StreamResult(Generic[T]):
    """The rows of ``session.stream(...)`` (``Row`` objects) or ``session.stream_scalars(...)`` (the
    first column: ORM objects for ``select(User)``): ``for row in result`` in sync code, ``async for
    row in result`` in async code, on any loop.

    Rows come from a server-side cursor on the bridge loop, *prefetch* at a time: about one batch is
    in your hands and one on the bridge, whatever the size of the result. The cursor lives in the
    scope's transaction, and other calls of the scope may run between batches. Stopping early (``break``,
    an exception) closes the cursor when the object is garbage collected; ``with``/``async with`` or
    ``close()``/``aclose()`` close it at once; the scope's end closes any still open.

    :raises sqlalchemy.exc.ResourceClosedError: when iterated after :meth:`close`.
    """

    def __init__(
        self, scope: _Scope[Any], result: AsyncResult[Any] | AsyncScalarResult[Any], prefetch: int
    ) -> None:
        self._scope = scope
        self._result = result  # on the bridge loop only
        self._prefetch = prefetch
        self._batch: list[T] = []
        self._index = 0
        self._exhausted = False
        self._closed = False
        # Dropped unfinished: close the cursor on the bridge loop, without anyone waiting.
        self._closer = weakref.finalize(self, _close_dropped_stream, scope, result)
        self._closer.atexit = False

    @property
    def bridge(self) -> Bridge:
        return self._scope.bridge

    def __repr__(self) -> str:
        state = "closed" if self._closed else "exhausted" if self._exhausted else "open"
        return f"<StreamResult of {self._scope!r}, prefetch={self._prefetch}, {state}>"

    async def _fetchmany(self, size: int | None = None, *, timeout: float | None = None) -> list[T]:
        """The next *size* rows (default: *prefetch*); fewer, then ``[]``, at the end."""
        return await self._scope._fetch_from(self._result, size or self._prefetch)

    async def _close(self, *, timeout: float | None = None) -> None:
        """Close the stream now, dropping the rows not read yet; the scope goes on. Safe to call twice.
        (As with SQLAlchemy's own ``stream()``, the server keeps the cursor's portal until the scope's
        transaction ends.)"""
        # Its caller waits for this (or, from the finalizer, is gone): no one else reads these now.
        self._closed = True
        self._batch, self._index = [], 0
        self._closer.detach()
        await self._scope._close_stream(self._result)

    fetchmany, afetchmany = twins(_fetchmany)
    close, aclose = twins(_close)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> T:
        if self._index >= len(self._batch):
            if self._exhausted:
                raise StopIteration
            self._check_open()
            self._take(self.fetchmany())
            if self._exhausted:
                raise StopIteration
        row = self._batch[self._index]
        self._index += 1
        return row

    def __aiter__(self) -> Self:
        return self

    def __await__(self) -> Generator[Any, None, NoReturn]:
        raise TypeError(
            "a StreamResult is not awaited but iterated: 'async for row in result:' (or, in sync code, "
            "'for row in result:')"
        )

    async def __anext__(self) -> T:
        if self._index >= len(self._batch):
            if self._exhausted:
                raise StopAsyncIteration
            self._check_open()
            self._take(await self.afetchmany())
            if self._exhausted:
                raise StopAsyncIteration
        row = self._batch[self._index]
        self._index += 1
        return row

    def _check_open(self) -> None:
        if self._closed:
            raise sqlalchemy.exc.ResourceClosedError(STREAM_CLOSED)

    def _take(self, rows: list[T]) -> None:
        self._batch, self._index = rows, 0
        if not rows:  # the bridge side closed the cursor at the end
            self._exhausted = True
            self._closer.detach()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _close_dropped_stream(scope: _Scope[Any], result: AsyncResult[Any] | AsyncScalarResult[Any]) -> None:
    """A :class:`StreamResult` was garbage collected with its cursor open (``break``, an exception):
    close the cursor on the bridge loop, in the scope's turn; nobody waits (this may run in any thread,
    the bridge's too)."""
    if scope._state != "open" or scope._pid != os.getpid():
        return  # the scope's end closed it, or it is the parent process's
    try:
        scope.bridge.submit(scope._close_stream, result)
    except BridgeClosedError:  # the bridge closed, and the connection with it
        pass
