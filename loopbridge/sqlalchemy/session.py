"""The two session facades: ``BridgedSession`` for sync code, ``AsyncBridgedSession`` for async code.

Each is a scope (``_scope._Scope``) whose I/O methods are derived from the scope's coroutines
(``loopbridge._twins``): the sync facade's block, the async facade's are awaited, and the two cannot
drift apart.
"""

from __future__ import annotations

import asyncio
import difflib
import sys
import threading
from collections.abc import Generator, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

import sqlalchemy.exc
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.util import IdentitySet

from loopbridge._owner import Owner
from loopbridge._twins import twin_contexts, twins
from loopbridge.bridge import Bridge

from ._forms import NotAContext
from ._options import SessionConfig
from ._scope import C, ScopeHost, _Scope
from .connection import AsyncBridgedConnection, BridgedConnection

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

__all__ = ["AsyncBridgedSession", "BridgedSession", "SessionScope"]


class _PlainCalls(_Scope[C], NotAContext):
    """The methods of both facades that need no database: plain calls, in the caller's thread (see
    ``_Scope._in_memory``); and what a name the facades do not have says instead."""

    if not TYPE_CHECKING:  # for type checkers, the facades have no such attributes

        def __getattr__(self, name: str) -> NoReturn:
            raise AttributeError(_missing(type(self), name))

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
_exec = twins(_Scope._exec, owners=_OWNERS)
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

    _async = False
    _connection_class = BridgedConnection

    execute = _execute[0]
    scalar = _scalar[0]
    scalars = _scalars[0]
    exec = _exec[0]
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


class AsyncBridgedSession(_PlainCalls[AsyncBridgedConnection]):
    """The session of ``async with engine.session() as session:``, for async code on any loop.

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

    _async = True
    _connection_class = AsyncBridgedConnection

    execute = _execute[1]
    scalar = _scalar[1]
    scalars = _scalars[1]
    exec = _exec[1]
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


class SessionScope:
    """What ``engine.session(**options)`` returns: a session scope, for ``with`` in sync code and for
    ``async with`` in async code on any loop.

    ::

        with engine.session() as session:          # a BridgedSession: each call blocks this thread
            session.add(User(name="ada"))
        async with engine.session() as session:    # an AsyncBridgedSession: each call is awaited
            users = (await session.scalars(select(User))).all()

    The block is the transaction: it commits when the block ends normally and rolls back when it raises
    (cancellation included). A scope opens once; call ``engine.session()`` again for another.

    :raises TypeError: for ``await engine.session()`` (use ``async with``), or a session method called
        on the scope itself (open it first).
    :raises EngineClosedError: if the engine is (or gets) closed.
    """

    def __init__(self, engine: ScopeHost, config: SessionConfig) -> None:
        self._engine = engine
        self._config = config
        self._entered = False  # its block was entered: a scope opens once (see _claim)
        self._caller: object = None  # the task or thread that entered it (see _claim)
        self._guard = threading.Lock()
        self._session: BridgedSession | AsyncBridgedSession | None = None  # set on the bridge loop

    @property
    def bridge(self) -> Bridge:
        return self._engine.bridge

    def __repr__(self) -> str:
        state = "not entered" if self._session is None else self._session._state
        return f"<SessionScope of {self._engine!r}, {state}>"

    async def _open(self, owner: Owner) -> BridgedSession | AsyncBridgedSession:
        """Open the scope, for the caller's thread (``with``) or the caller's event loop (``async with``)."""
        facade = BridgedSession if owner.loop is None else AsyncBridgedSession
        session = facade(self._engine, self._config)
        await session._begin(self._caller)
        self._session = session
        return session

    async def _close(self, error: BaseException | None) -> None:
        """Commit if the block ended normally, else roll back; nothing if it never opened."""
        if self._session is not None:
            await self._session._close(error)

    def _claim(self) -> None:
        """Before the crossing that opens the scope: refuse a second opening in the caller's thread, so
        that the cleanup of a failed opening can only ever end what that opening began."""
        with self._guard:
            entered, self._entered = self._entered, True
        if entered:
            raise sqlalchemy.exc.InvalidRequestError(
                f"{self!r} was already used: a session scope opens once; call engine.session() again for "
                "a new one"
            )
        # Who opens it: the task, where one runs in this thread (a sync 'with' inside a running loop
        # included), else the thread. A pinned Engine lets one caller's scopes nest (see _sources).
        try:
            self._caller = asyncio.current_task()
        except RuntimeError:  # no running loop in this thread
            self._caller = None
        if self._caller is None:
            self._caller = threading.current_thread()

    def _ended_elsewhere(self, exc: BaseException | None) -> bool:
        session = self._session
        return session is None or session._ended_elsewhere(exc)

    # The four methods come from twin_contexts, with two checks in the caller's thread first (no
    # crossing): a second opening is refused before it could start a cleanup that ends the first; and
    # leaving a block whose scope the engine already ended, or that the parent process opened before a
    # fork, needs nothing from the bridge, which may be closed by then.
    _enter, _exit, _aenter, _aexit = twin_contexts(_open, _close)

    def __enter__(self) -> BridgedSession:
        self._claim()
        session = self._enter()
        assert isinstance(session, BridgedSession)
        return session

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._ended_elsewhere(exc):
            self._exit(exc_type, exc, tb)

    async def __aenter__(self) -> AsyncBridgedSession:
        self._claim()
        session = await self._aenter()
        assert isinstance(session, AsyncBridgedSession)
        return session

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._ended_elsewhere(exc):
            await self._aexit(exc_type, exc, tb)

    def __await__(self) -> Generator[Any, None, NoReturn]:
        raise TypeError(
            "a session scope is not awaited: use 'async with engine.session() as session:' (or, in sync "
            "code, 'with engine.session() as session:')"
        )

    if not TYPE_CHECKING:  # for type checkers, the scope has no such attributes

        def __getattr__(self, name: str) -> NoReturn:
            if name.startswith("_") or not hasattr(BridgedSession, name):
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            raise AttributeError(
                f"session.{name}() is a method of the session the scope opens, not of the scope: "
                f"'with engine.session() as session: session.{name}(...)' (sync), or 'async with "
                f"engine.session() as session: ...' (async)"
            )


def _missing(facade: type[_Scope[Any]], name: str) -> str:
    """What a session facade says of an attribute it does not have: what to use instead."""
    awaited = "await " if facade._async else ""
    block = "async with" if facade._async else "with"
    if name == "query":
        return (
            f"{facade.__name__} has no query(): the legacy Query API would do its I/O in your thread. Use "
            f"{awaited}session.execute(select(User).where(...)) or {awaited}session.scalars(select(User)) "
            f"(SQLAlchemy 2.0 style), or run existing Query code on the bridge loop: "
            f"{awaited}session.run_sync(lambda s: s.query(User).all())"
        )
    if name == "begin":
        return (
            f"{facade.__name__} has no begin(): the scope is the transaction (it commits when the block ends "
            f"and rolls back when it raises; {awaited}session.commit() commits so far). For a savepoint: "
            f"'{block} session.begin_nested():'"
        )
    public = [attribute for attribute in dir(facade) if not attribute.startswith("_")]
    close = difflib.get_close_matches(name, public, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"{facade.__name__!r} object has no attribute {name!r}{hint} (what the session does not offer, "
        f"{awaited}session.run_sync(fn) reaches with the real sync Session)"
    )
