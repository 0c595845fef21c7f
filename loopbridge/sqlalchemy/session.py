"""The two session facades: ``BridgedSession`` for sync code, ``AsyncBridgedSession`` for async code.

Each is a scope (``_scope._Scope``) whose I/O methods are derived from the scope's coroutines
(``loopbridge._twins``): the sync facade's block, the async facade's are awaited, and the two cannot
drift apart.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.util import IdentitySet

from loopbridge._owner import Owner
from loopbridge._twins import twin_contexts, twins

from ._scope import C, _Scope
from .connection import AsyncBridgedConnection, BridgedConnection

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

__all__ = ["AsyncBridgedSession", "BridgedSession"]


def scope_contexts(
    open_: Callable[[Any, Owner], Coroutine[Any, Any, Any]],
    close: Callable[[Any, BaseException | None], Coroutine[Any, Any, None]],
) -> tuple[
    Callable[[Any], Any],
    Callable[[Any, type[BaseException] | None, BaseException | None, TracebackType | None], None],
    Callable[[Any], Coroutine[Any, Any, Any]],
    Callable[
        [Any, type[BaseException] | None, BaseException | None, TracebackType | None],
        Coroutine[Any, Any, None],
    ],
]:
    """``twin_contexts(open_, close)`` for a session scope (its promises included: the exit runs to
    completion, and an opening interrupted on the caller's side is ended), with two checks made in the
    caller's thread first, without crossing:

    * entering a scope a second time is refused (``_claim_opening``): the cleanup of that failed
      opening must never end the scope its first block still uses;
    * leaving a block whose scope the engine already ended, or that the parent process opened before a
      fork, needs nothing from the bridge (which may be closed by then): the block's own error goes on,
      and a block that succeeded is told its work was not committed (``_ended_elsewhere``).
    """
    enter, exit_, aenter, aexit = twin_contexts(open_, close)

    def __enter__(self: _Scope[Any]) -> Any:
        self._claim_opening()
        return enter(self)

    def __exit__(
        self: _Scope[Any],
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._ended_elsewhere(exc):
            exit_(self, exc_type, exc, tb)

    async def __aenter__(self: _Scope[Any]) -> Any:
        self._claim_opening()
        return await aenter(self)

    async def __aexit__(
        self: _Scope[Any],
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._ended_elsewhere(exc):
            await aexit(self, exc_type, exc, tb)

    return __enter__, __exit__, __aenter__, __aexit__


class _PlainCalls(_Scope[C]):
    """The methods of both facades that need no database: plain calls, in the caller's thread (see
    ``_Scope._in_memory``)."""

    def add(self, instance: object) -> None:
        """Place *instance* in the session; it is inserted at the next flush, query or commit."""
        self._in_memory("add", lambda session: session.add(instance))

    def add_all(self, instances: Iterable[object]) -> None:
        """:meth:`add` each of *instances*."""
        self._in_memory("add_all", lambda session: session.add_all(instances))

    def expunge(self, instance: object) -> None:
        """Remove *instance* from the session (its pending changes are forgotten)."""
        self._in_memory("expunge", lambda session: session.expunge(instance))

    def expire(self, instance: object, attribute_names: Iterable[str] | None = None) -> None:
        """Mark *instance*'s attributes as stale. Reading them later needs the database: do it inside
        :meth:`run_sync`, or :meth:`refresh` the object first (see :class:`LazyLoadError`)."""
        self._in_memory("expire", lambda session: session.expire(instance, attribute_names))

    def in_transaction(self) -> bool:
        """True if the session has begun a transaction (it does so at the first statement)."""
        return self._in_memory("in_transaction", lambda session: session.in_transaction())

    def __contains__(self, instance: object) -> bool:
        return self._in_memory("__contains__", lambda session: instance in session)

    def __iter__(self) -> Iterator[object]:
        """The objects in the session (a snapshot: the pending ones and the identity map's)."""
        return iter(self._in_memory("__iter__", lambda session: list(session)))

    @property
    def info(self) -> dict[Any, Any]:
        """The session's ``info`` dictionary, for your own use."""
        return self._in_memory("info", lambda session: session.info)

    def expire_all(self) -> None:
        """Mark every object in the session stale (see :meth:`expire`)."""
        self._in_memory("expire_all", lambda session: session.expire_all())

    def expunge_all(self) -> None:
        """Remove every object from the session (their pending changes are forgotten)."""
        self._in_memory("expunge_all", lambda session: session.expunge_all())

    def is_modified(self, instance: object, include_collections: bool = True) -> bool:
        """True if *instance* has changes the next flush would write (compares loaded attributes only,
        as SQLAlchemy does: nothing is loaded)."""
        return self._in_memory(
            "is_modified", lambda session: session.is_modified(instance, include_collections)
        )

    def in_nested_transaction(self) -> bool:
        """True inside a :meth:`begin_nested` block."""
        return self._in_memory("in_nested_transaction", lambda session: session.in_nested_transaction())

    @property
    def new(self) -> IdentitySet:
        """The objects added and not flushed yet."""
        return self._in_memory("new", lambda session: session.new)

    @property
    def dirty(self) -> IdentitySet:
        """The persistent objects with attributes changed since they were loaded or flushed (possibly
        to equal values: :meth:`is_modified` tells)."""
        return self._in_memory("dirty", lambda session: session.dirty)

    @property
    def deleted(self) -> IdentitySet:
        """The objects marked deleted and not flushed yet."""
        return self._in_memory("deleted", lambda session: session.deleted)

    @property
    def no_autoflush(self) -> AbstractContextManager[Self]:
        """``with session.no_autoflush:``: no autoflush for the calls made in the block (a query that
        must not see half-built objects, say)."""
        return self._without_autoflush()

    @contextmanager
    def _without_autoflush(self) -> Iterator[Self]:
        before = self._in_memory("no_autoflush", lambda session: _swap_autoflush(session, False))
        try:
            yield self
        finally:
            if self._state == "open":
                self._in_memory("no_autoflush", lambda session: _swap_autoflush(session, before))


def _swap_autoflush(session: AsyncSession, autoflush: bool) -> bool:
    before = session.sync_session.autoflush
    session.sync_session.autoflush = autoflush
    return before


_OWNERS = ("BridgedSession", "AsyncBridgedSession")
_execute = twins(_Scope._execute, owners=_OWNERS)
_scalar = twins(_Scope._scalar, owners=_OWNERS)
_scalars = twins(_Scope._scalars, owners=_OWNERS)
_get = twins(_Scope._get, owners=_OWNERS)
_get_one = twins(_Scope._get_one, owners=_OWNERS)
_merge = twins(_Scope._merge, owners=_OWNERS)
_delete = twins(_Scope._delete, owners=_OWNERS)
_refresh = twins(_Scope._refresh, owners=_OWNERS)
_flush = twins(_Scope._flush, owners=_OWNERS)
_commit = twins(_Scope._commit, owners=_OWNERS)
_rollback = twins(_Scope._rollback, owners=_OWNERS)
_run_sync = twins(_Scope._run_sync, owners=_OWNERS)
_connection = twins(_Scope._connection, owners=_OWNERS)
_stream = twins(_Scope._stream, owners=_OWNERS)
_stream_scalars = twins(_Scope._stream_scalars, owners=_OWNERS)
# Entering and leaving a scope's block, for both facades: written once, as _Scope._open and _close.
_contexts = scope_contexts(_Scope._open, _Scope._close)


class BridgedSession(_PlainCalls[BridgedConnection]):
    """The session of ``with engine.session() as session:``, for sync code.

    It reads like SQLAlchemy's ``Session``. These need the database and block the calling thread while
    they run on the bridge loop: ``execute``, ``scalar``, ``scalars``, ``get``, ``get_one``, ``delete``,
    ``merge``, ``flush``, ``refresh``, ``commit``, ``rollback``, ``connection``, ``stream``,
    ``stream_scalars``, ``with session.begin_nested():``, and ``run_sync`` for code that needs the real
    sync ``Session`` (it reaches everything else). These are plain calls: ``add``, ``add_all``,
    ``expire``, ``expire_all``, ``expunge``, ``expunge_all``, ``is_modified``, ``in_transaction``,
    ``in_nested_transaction``, ``new``, ``dirty``, ``deleted``, ``info``, ``no_autoflush``. Ending the
    block commits; an exception rolls back.

    :raises EngineClosedError: if the engine is (or gets) closed.
    :raises LazyLoadError: if an object of the session loads from the database outside the bridge loop.
    :raises sqlalchemy.exc.InvalidRequestError: if used outside its block.
    """

    _facade = "session"
    _connection_class = BridgedConnection

    execute = _execute[0]
    scalar = _scalar[0]
    scalars = _scalars[0]
    get = _get[0]
    get_one = _get_one[0]
    merge = _merge[0]
    delete = _delete[0]
    refresh = _refresh[0]
    flush = _flush[0]
    commit = _commit[0]
    rollback = _rollback[0]
    run_sync = _run_sync[0]
    connection = _connection[0]
    stream = _stream[0]
    stream_scalars = _stream_scalars[0]

    if TYPE_CHECKING:

        def __enter__(self) -> Self: ...
        def __exit__(
            self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
        ) -> None: ...

    else:
        __enter__, __exit__ = _contexts[:2]


class AsyncBridgedSession(_PlainCalls[AsyncBridgedConnection]):
    """The session of ``async with engine.asession() as session:``, for async code on any loop.

    It reads like SQLAlchemy's ``AsyncSession``. These are awaited and run on the bridge loop (cancelling
    the awaiting task cancels the work there): ``await session.execute(...)``, ``scalar``, ``scalars``,
    ``get``, ``get_one``, ``delete``, ``merge``, ``flush``, ``refresh``, ``commit``, ``rollback``,
    ``connection``, ``stream``, ``stream_scalars``, ``async with session.begin_nested():``, and
    ``run_sync`` (it reaches everything else, with the real sync ``Session``). These are plain calls:
    ``add``, ``add_all``, ``expire``, ``expire_all``, ``expunge``, ``expunge_all``, ``is_modified``,
    ``in_transaction``, ``in_nested_transaction``, ``new``, ``dirty``, ``deleted``, ``info``,
    ``no_autoflush``. Ending the block commits; an exception (cancellation included) rolls back.

    :raises EngineClosedError: if the engine is (or gets) closed.
    :raises LazyLoadError: if an object of the session loads from the database outside the bridge loop.
    :raises sqlalchemy.exc.InvalidRequestError: if used outside its block.
    """

    _facade = "asession"
    _connection_class = AsyncBridgedConnection

    execute = _execute[1]
    scalar = _scalar[1]
    scalars = _scalars[1]
    get = _get[1]
    get_one = _get_one[1]
    merge = _merge[1]
    delete = _delete[1]
    refresh = _refresh[1]
    flush = _flush[1]
    commit = _commit[1]
    rollback = _rollback[1]
    run_sync = _run_sync[1]
    connection = _connection[1]
    stream = _stream[1]
    stream_scalars = _stream_scalars[1]

    if TYPE_CHECKING:

        async def __aenter__(self) -> Self: ...
        async def __aexit__(
            self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
        ) -> None: ...

    else:
        __aenter__, __aexit__ = _contexts[2:]
