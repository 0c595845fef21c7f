"""StreamResult: the rows of a session's server-side cursor, through the core's streaming machinery.

``session.stream(...)`` and ``session.stream_scalars(...)`` run their statement on the bridge loop and
hand back a :class:`StreamResult`, a :class:`loopbridge._stream.Stream` whose batches come from
SQLAlchemy's ``AsyncResult``: a producer on the bridge loop fetches a batch at a time, in the scope's
turn (so other calls of the scope may run between batches), and the consumer reads them with ``for`` or
``async for``, exactly as for ``db.iterate()``.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

import sqlalchemy.exc
from sqlalchemy.ext.asyncio import AsyncResult, AsyncScalarResult, AsyncSession

from loopbridge._stream import Producer, Stream


class ScopeOfStream(Protocol):
    """What a stream needs of its session scope (``loopbridge.sqlalchemy._scope``)."""

    _streams: set[Producer[Any]]

    @property
    def _state(self) -> str: ...

    def _using(self) -> AbstractAsyncContextManager[AsyncSession]: ...


__all__ = ["StreamResult"]

T = TypeVar("T")  # what a stream yields

STREAM_CLOSED = (
    "this stream was closed (by close(), or by leaving its `with` block); run the statement again for "
    "more rows"
)


class StreamResult(Stream[T]):
    """The rows of ``session.stream(...)`` (``Row`` objects) or ``session.stream_scalars(...)`` (the
    first column: ORM objects for ``select(User)``): ``for row in result`` in sync code, ``async for
    row in result`` in async code, on any loop.

    Rows come from a server-side cursor on the bridge loop, *prefetch* at a time: about one batch is in
    your hands, one queued and one being fetched, whatever the size of the result. The cursor lives in
    the scope's transaction, and other calls of the scope may run between batches. Stopping early
    (``break``, an exception) closes the cursor when the object is garbage collected; ``with``/``async
    with`` or ``close()``/``aclose()`` close it at once; the scope's end closes any still open.

    :raises sqlalchemy.exc.ResourceClosedError: when iterated after :meth:`close`, or when its scope
        ended while rows were still being read.
    """

    __slots__ = ()

    _right_form = "'async for row in result:'"

    def _after_close(self) -> None:
        raise sqlalchemy.exc.ResourceClosedError(STREAM_CLOSED)


class ResultBatches:
    """The batches of an ``AsyncResult`` (or its scalars) of a session scope, each fetched in the scope's
    turn on the bridge loop. The scope watches its owner, and closes its streams when it ends."""

    __slots__ = ("prefetch", "producer", "result", "scope")

    def __init__(
        self, scope: ScopeOfStream, result: AsyncResult[Any] | AsyncScalarResult[Any], prefetch: int
    ) -> None:
        self.scope = scope
        self.result = result
        self.prefetch = prefetch
        self.producer: Producer[Any] | None = None

    async def open(self, producer: Producer[Any]) -> bool:
        # The statement already ran (session.stream() returns once it has): the scope keeps the
        # producer, to close it when the scope ends.
        self.producer = producer
        self.scope._streams.add(producer)
        return False

    async def fetch(self) -> tuple[list[Any], bool]:
        async with self.scope._using():
            rows = list(await self.result.fetchmany(self.prefetch))
        return rows, len(rows) < self.prefetch

    async def finish(self, exhausted: bool, error: BaseException | None) -> None:
        scope, producer, self.producer = self.scope, self.producer, None
        scope._streams.discard(producer)
        if scope._state != "open":
            return  # the scope ended (or the engine ended it): the cursor went with its transaction
        try:
            async with scope._using():
                await self.result.close()
        except Exception:
            if scope._state == "open":
                raise
            # The scope ended meanwhile, and its end closed the cursor.

    def may_cancel_fetch(self) -> bool:
        # The cursor lives in the scope's transaction, which goes on: wait for the batch under way.
        return False

    def explain(self, exc: BaseException) -> BaseException:
        return exc

    def ended(self, why: str) -> BaseException:
        return sqlalchemy.exc.ResourceClosedError(f"this stream stopped: {why}; run the statement again")
