"""SQLAlchemy on the bridge: one ``AsyncEngine`` for every caller, and one session scope for every context.

An SQLAlchemy ``AsyncEngine`` belongs to the event loop that first used it, which is how ADR-047's team
ended up with two session patterns (``session_scope()`` on the server's loop, ``session_scope_fresh()``
with a new engine per request everywhere else). Here the engine lives on the bridge loop: it is created
there on first use, every connection is made and used there, and it is disposed there. Callers never
touch it; they only reach it through the bridge:

* ``with engine.session() as session:`` — sync code (views, scripts, notebooks, a running loop's sync
  call). Each method of the :class:`BridgedSession` blocks the caller while it runs on the bridge loop.
* ``async with engine.asession() as session:`` — async code on any loop. Each awaitable method of the
  :class:`AsyncBridgedSession` runs on the bridge loop; the caller's loop only awaits.

Both scopes hold a real ``AsyncSession`` that lives on the bridge loop; both facades take their methods
from one implementation each (``loopbridge._twins``), so the two cannot drift. Both commit on normal exit
and roll back on an exception, as ``session.begin()`` does.

ORM objects come back to the caller's thread with their loaded attributes. What they have not loaded (a
lazy relationship, an expired or deferred column) cannot be loaded there: the session does its I/O only on
the bridge loop, so such an access raises :class:`LazyLoadError`, saying to load eagerly or to use
``run_sync``. Sessions default to ``expire_on_commit=False`` for that reason, as SQLAlchemy advises for
asyncio.

Needs the ``loopbridge[sqlalchemy]`` extra; ``import loopbridge`` never imports this module.
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import logging
import os
import re
import sys
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar
from urllib.parse import unquote_plus

import asyncpg
import sqlalchemy.exc
from sqlalchemy import URL, event
from sqlalchemy.engine import Result, Row, ScalarResult
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncResult,
    AsyncScalarResult,
    AsyncSession,
    AsyncSessionTransaction,
    create_async_engine,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.base import Executable
from sqlalchemy.util import IdentitySet

from ._dsn import DsnInfo, parse_dsn, redact, resolve_dsn
from ._loop import GRACE, ClosedWhenUnreachable
from ._owner import Owner
from ._source import connect_failure
from ._stream import DEFAULT_PREFETCH
from ._twins import OpenClose, twin_contexts, twins
from .bridge import Bridge, default_bridge
from .errors import (
    BridgeClosedError,
    ConfigurationError,
    ConnectError,
    DatabaseClosedError,
    DeadlockError,
    LoopBridgeError,
)

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

__all__ = [
    "AsyncBridgedConnection",
    "AsyncBridgedSession",
    "BridgedConnection",
    "BridgedSession",
    "Engine",
    "EngineClosedError",
    "LazyLoadError",
    "Savepoint",
    "StreamResult",
]

logger = logging.getLogger("loopbridge")

R = TypeVar("R")
M = TypeVar("M")  # a mapped class
T = TypeVar("T")  # what a stream yields
C = TypeVar("C", bound="_ScopeConnection")  # the connection facade of a session facade

if TYPE_CHECKING:
    from typing import TypeAlias

    from typing_extensions import Unpack

    #: Rows of any shape, as ``AsyncSession.execute`` returns them.
    AnyResult: TypeAlias = Result[Unpack[tuple[Any, ...]]]
    #: Statement parameters: one mapping, or a list of them for an executemany.
    Params: TypeAlias = Mapping[str, Any] | Sequence[Mapping[str, Any]]

#: How much longer than its own timeout a close may take to cross to the bridge and back.
_CLOSE_MARGIN = 5.0

# The options of SQLAlchemy's asyncpg dialect itself (its adapter around each asyncpg connection), which
# it takes from the URL's query and from connect_args, apart from asyncpg.connect's keywords.
_DIALECT_OPTIONS = frozenset({"prepared_statement_cache_size", "prepared_statement_name_func"})
# asyncpg.connect's keywords, for connect_args. (loop: the connection is always made on the bridge loop.)
_CONNECT_OPTIONS = frozenset(inspect.signature(asyncpg.connect).parameters) - {"dsn", "loop"}
# URL query options that are keywords, not what asyncpg's URL syntax makes of an unknown option (a
# server setting): the dialect's, and asyncpg.connect's that a URL can spell, as SQLAlchemy passes them.
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "prepared_statement_cache_size": int,
    "statement_cache_size": int,
    "max_cached_statement_lifetime": int,
    "max_cacheable_statement_size": int,
    "command_timeout": float,
    "timeout": float,
    "ssl": str,
}
# asyncpg >= 0.31 keeps prepare() unnamed when its statement cache is off: SQLAlchemy's statements are
# then re-parsed at each execution, which survives transaction pooling even outside a transaction, and
# leaves nothing behind on the servers (see _transaction_pooling).
_UNNAMED_PREPARE = tuple(int(part) for part in re.findall(r"\d+", asyncpg.__version__)[:2]) >= (0, 31)

# Keywords the Engine manages itself: it connects with asyncpg on the bridge loop, from the URL.
_RESERVED_ENGINE_OPTIONS = {
    "creator": "the Engine connects with asyncpg on the bridge loop itself; pass asyncpg.connect options "
    "as connect_args={...}",
    "async_creator": "the Engine connects with asyncpg on the bridge loop itself; pass asyncpg.connect "
    "options as connect_args={...}",
    "module": "the Engine always uses asyncpg",
}
# Keywords a session scope manages itself.
_RESERVED_SESSION_OPTIONS = {"bind", "binds", "sync_session_class"}
_STREAM_CLOSED = (
    "this stream was closed (by close(), or by leaving its `with` block); run the statement again for "
    "more rows"
)


class EngineClosedError(DatabaseClosedError):
    """The :class:`Engine` was closed, or closed while a session scope was open (which was then ended
    without committing); create a new Engine to keep working."""


class LazyLoadError(LoopBridgeError, sqlalchemy.exc.MissingGreenlet):
    """An ORM object tried to load from the database outside the bridge loop: a lazy relationship, or an
    expired or deferred attribute, touched in the caller's thread.

    The session does its I/O only on the bridge loop. Load what you need inside the scope (eagerly with
    ``selectinload()``/``joinedload()``, or with ``session.refresh(obj, ["attr"])``), or move the code that
    walks relationships into ``session.run_sync(fn)``, where lazy loading works. Also a
    ``sqlalchemy.exc.MissingGreenlet``, which is what SQLAlchemy raises for the same mistake.
    """

    code = ""  # SQLAlchemy's link would explain greenlets; our message says what to do instead


class Engine(ClosedWhenUnreachable, OpenClose):
    """An SQLAlchemy ``AsyncEngine`` (asyncpg dialect) that lives on a bridge loop, for every caller.

    ::

        engine = Engine("postgresql://app@db:5432/app")
        with engine.session() as session:                  # sync code: each call blocks
            session.add(User(name="ada"))
        async with engine.asession() as session:           # async code, on any loop
            users = (await session.scalars(select(User))).all()

    The ``AsyncEngine`` is created on the bridge loop on first use (or by :meth:`open`), used only there
    and disposed there by :meth:`close` or when the bridge closes. After ``os.fork()`` the child creates
    a fresh engine on first use and never touches the connections it inherited.

    :param url: ``postgresql://``, ``postgres://`` or ``postgresql+asyncpg://user:password@host:port/db``,
        with asyncpg's URL syntax (multi-host and query options included: unknown query options become
        server settings, ``?search_path=app``). The query options SQLAlchemy's asyncpg dialect reads as
        keywords are keywords here too: ``prepared_statement_cache_size`` (the dialect's own),
        ``statement_cache_size``, ``command_timeout``, ``timeout``, ``max_cached_statement_lifetime``,
        ``max_cacheable_statement_size`` and ``ssl``. A ``sqlalchemy.URL`` works too. Default:
        ``$LOOPBRIDGE_DSN``, then ``$DATABASE_URL``.
    :param bridge: the bridge the engine lives on; default :func:`~loopbridge.default_bridge`.
    :param pgbouncer: the server is reached through PgBouncer (or another pooler) in transaction or
        statement pooling mode: no prepared statement outlives its execution (no statement cache in
        SQLAlchemy's dialect nor in asyncpg, and unnamed statements; unique names on asyncpg < 0.31).
    :param engine_kwargs: passed to ``create_async_engine`` (``pool_size``, ``max_overflow``,
        ``pool_timeout``, ``pool_pre_ping``, ``echo``, ``poolclass``, ...). ``connect_args``, as in
        SQLAlchemy, take the dialect's ``prepared_statement_cache_size`` and
        ``prepared_statement_name_func`` and ``asyncpg.connect``'s keywords (``statement_cache_size``,
        ``server_settings``, ``command_timeout``, ``ssl``, ...); they override the URL's.
    :raises ConfigurationError: for a malformed URL, a non-asyncpg driver, no URL at all, an unknown or
        malformed connect option, or an option ``create_async_engine`` refuses.
    """

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        bridge: Bridge | None = None,
        pgbouncer: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        if isinstance(url, URL):
            url = url.render_as_string(hide_password=False)
        dsn, url_options = _lift_url_options(_normalize_url(resolve_dsn(url)))
        self._info: DsnInfo = parse_dsn(dsn)
        for name, why in _RESERVED_ENGINE_OPTIONS.items():
            if name in engine_kwargs:
                raise ConfigurationError(f"Engine does not take {name!r}: {why}")
        connect_args = dict(engine_kwargs.pop("connect_args", None) or {})
        password = connect_args.get("password")
        self._secrets = (self._info.password, password if isinstance(password, str) else None)
        try:
            # As in SQLAlchemy: connect_args override the URL's options.
            self._dialect_args, self._connect_args = _split_connect_args({**url_options, **connect_args})
            if pgbouncer:
                _transaction_pooling(self._dialect_args, self._connect_args)
        except ConfigurationError as exc:
            raise ConfigurationError(redact(str(exc), *self._secrets)) from None
        # SQLAlchemy's URL only names the dialect and shows where we connect, in its logs: never a
        # password. The connections themselves come from _connect, with the full DSN.
        self._url = URL.create(
            "postgresql+asyncpg",
            username=self._info.user,
            host=self._info.hosts[0],
            port=int(self._info.ports[0]),
            database=self._info.database,
        )
        self._engine_kwargs = engine_kwargs
        _check_engine_options(self._url, engine_kwargs)
        self._bridge = bridge if bridge is not None else default_bridge()
        # Closed is set from any thread and read everywhere; the rest is bridge-loop state.
        self._closed = False
        self._engine: AsyncEngine | None = None
        self._scopes: set[_Scope[Any]] = set()
        self._drained: asyncio.Event | None = None  # set when closing and the last scope ends

    # -- properties ---------------------------------------------------------------------------------

    @property
    def bridge(self) -> Bridge:
        """The bridge whose loop owns the engine."""
        return self._bridge

    @property
    def url(self) -> str:
        """The URL with its password replaced by ``***``."""
        return self._info.redacted

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._engine is not None else "not opened yet"
        return f"<Engine {self._info.redacted!r} on bridge {self._bridge.name!r}, {state}>"

    # -- session scopes -----------------------------------------------------------------------------

    def session(self, **options: Any) -> BridgedSession:
        """A session scope for sync code: ``with engine.session() as session:``.

        Commits when the block ends normally, rolls back when it raises. *options* go to
        ``AsyncSession`` (``autoflush``, ``info``, ``expire_on_commit``, which defaults to False here).

        :raises ConfigurationError: for ``bind``, ``binds`` or ``sync_session_class``.
        """
        return BridgedSession(self, _session_options(options))

    def asession(self, **options: Any) -> AsyncBridgedSession:
        """A session scope for async code on any loop: ``async with engine.asession() as session:``.

        Same options and the same commit/rollback rule as :meth:`session`.
        """
        return AsyncBridgedSession(self, _session_options(options))

    # -- calls: each written once, as the coroutine that runs on the bridge loop ---------------------

    async def _run(self, fn: Callable[..., Awaitable[R]], *args: Any, timeout: float | None = None) -> R:
        """Call ``await fn(async_engine, *args)`` with the ``AsyncEngine``, on the bridge loop.

        The escape hatch for anything SQLAlchemy's asyncio API does (``async with engine.begin()``,
        streaming, pool inspection). The engine is only valid inside *fn*: do not keep it.
        """
        result = fn(self._async_engine(), *args)
        if not inspect.isawaitable(result):
            raise TypeError(
                f"Engine.run() runs async functions, but {_name(fn)} returned {type(result).__name__}; "
                "define it with 'async def', or use Engine.run_sync() for a sync function"
            )
        return await result

    async def _run_sync(
        self, /, fn: Callable[..., R], *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> R:
        """Call ``fn(connection, *args, **kwargs)`` with a sync-style SQLAlchemy ``Connection`` in a
        transaction, on the bridge loop: committed if *fn* returns, rolled back if it raises.

        Reuses sync Core code as it is: ``engine.run_sync(metadata.create_all)``. The connection is only
        valid inside *fn*. (``timeout`` is the call's own; pass a *fn* keyword of that name with
        ``functools.partial``.)
        """
        _check_sync_fn(fn, "Engine.run_sync()", "connection")
        async with self._async_engine().begin() as connection:
            return await connection.run_sync(fn, *args, **kwargs)

    async def _open(self, *, timeout: float | None = None) -> None:
        """Create the engine now and make one connection, instead of on first use.

        :raises ConnectError: if the server cannot be reached or refuses the login.
        """
        async with self._async_engine().connect():
            pass

    run, arun = twins(_run)
    run_sync, arun_sync = twins(_run_sync)
    open, aopen = twins(_open)

    # -- closing ------------------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Dispose of the engine on the bridge loop. Session scopes still open may end within *timeout*
        seconds; those that do not are ended without committing (their owners get
        :class:`EngineClosedError`). Later use raises :class:`EngineClosedError`. Safe to call twice.
        The bridge keeps running.

        :raises DeadlockError: if called on the bridge thread (await :meth:`aclose` there); the engine
            is then left as it was, open.
        """
        # Before anything changes: marked closed but never disposed, the engine would refuse every
        # caller while its pool kept its connections.
        if self._bridge.in_bridge_thread():
            raise DeadlockError(
                f"Engine.close() was called on the bridge thread of {self._bridge.name!r}, where it would "
                "wait forever for the loop that is running it; the engine is still open. On the bridge "
                "loop, await engine.aclose() instead"
            )
        if self._mark_closed():
            try:
                self._bridge._run(
                    self._aclose_on_bridge, (timeout,), None, timeout + _CLOSE_MARGIN, "Engine.close()"
                )
            except BridgeClosedError:  # the bridge closed meanwhile, and disposed of the engine with it
                pass

    async def aclose(self, timeout: float = 10.0) -> None:
        """:meth:`close` for async code, from any loop."""
        if self._mark_closed():
            try:
                await self._bridge._arun(
                    self._aclose_on_bridge, (timeout,), None, timeout + _CLOSE_MARGIN, "Engine.aclose()"
                )
            except BridgeClosedError:
                pass

    def _mark_closed(self) -> bool:
        """Mark closed; True if an engine may exist on a running bridge and must be disposed there."""
        was_closed, self._closed = self._closed, True
        return not was_closed and self._engine is not None and self._bridge.running

    async def _aclose_on_bridge(self, timeout: float) -> None:
        self._closed = True
        self._bridge._unregister(self)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._scopes:
            # A graceful close loses nothing: open scopes may still commit within the timeout...
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                pass
            # ... and those still open then end without committing.
            for scope in list(self._scopes):
                logger.warning(
                    "%r: a session scope was still open after %g s; ending it without commit", self, timeout
                )
                await scope._abandon()
        engine, self._engine = self._engine, None
        if engine is None:
            return
        try:
            await asyncio.wait_for(engine.dispose(), max(deadline - loop.time(), GRACE))
        except (asyncio.TimeoutError, TimeoutError):
            logger.warning("%r: the pool did not close in time; leaving its connections to the server", self)

    def _forget_after_fork(self) -> list[object]:
        dropped: list[object] = [*self._scopes]
        if self._engine is not None:
            dropped.append(self._engine)
        self._engine = None
        self._scopes = set()
        self._drained = None
        return dropped

    # -- the engine, on the bridge loop -------------------------------------------------------------

    def _async_engine(self) -> AsyncEngine:
        """The AsyncEngine, created on first use. On the bridge loop only."""
        engine = self._engine
        if engine is not None:
            return engine
        if self._closed:
            raise EngineClosedError(f"{self!r} is closed; create a new Engine to keep working")
        # Registered at once, so that bridge close and fork know about it.
        engine = create_async_engine(self._url, **self._engine_kwargs)
        event.listen(engine.sync_engine, "do_connect", self._dbapi_connect)
        self._engine = engine
        self._bridge._register(self)
        logger.debug("%r: engine created", self)
        return engine

    def _dbapi_connect(self, dialect: Dialect, record: object, cargs: object, cparams: object) -> Any:
        """Each new pooled connection (SQLAlchemy's ``do_connect`` event, in its greenlet): the dialect's
        adapter, with the dialect's own options, around the asyncpg connection :meth:`_connect` makes.
        What ``async_creator`` cannot do: it passes the dialect no options."""
        return dialect.loaded_dbapi.connect(async_creator_fn=self._connect, **self._dialect_args)

    async def _connect(self) -> asyncpg.Connection:
        """Every new pooled connection: asyncpg's connect with the full DSN, failures made to say where
        (and never with a password)."""
        try:
            return await asyncpg.connect(self._info.dsn, **self._connect_args)
        except Exception as exc:
            error = ConnectError(connect_failure(self._info, exc, *self._secrets))
            if not _repeats_a_secret(exc, self._secrets):
                raise error from exc
        # The driver's own error repeats a password (one given to another option by mistake, say): raised
        # out here, the ConnectError keeps it neither as its cause nor as its context, so no traceback
        # shows it. The message has its type and its text, scrubbed.
        raise error

    def _forget_scope(self, scope: _Scope[Any]) -> None:
        self._scopes.discard(scope)
        if self._drained is not None and not self._scopes:
            self._drained.set()


_State = Literal["new", "open", "ended", "abandoned"]


class _Scope(Generic[C]):
    """What the two session facades share: the ``AsyncSession`` that lives on the bridge loop, each of
    its I/O methods written once (as the coroutine that runs there), and the in-memory methods.

    The facades have what an ORM user of ``AsyncSession`` reaches for. What they leave out is the
    scope's own business (``begin()``: the scope is the transaction; ``close()``, ``reset()``,
    ``invalidate()``: the scope ends the session) or would hand out objects that belong to the bridge
    loop (``sync_session``, ``bind``, ``get_bind()``, ``identity_map``, ``get_transaction()``);
    ``run_sync(fn)`` reaches all of it, with the real sync ``Session``.

    A scope is for one caller at a time, as a SQLAlchemy session is. Its calls are still serialized on
    the bridge loop, so a call that is cancelled but still unwinding never overlaps the next one; and
    the methods that need no database run in the caller's thread only while nothing holds the session on
    the bridge (otherwise they wait their turn there), so the session is never used by two threads at
    once.
    """

    _facade = "session"
    _connection_class: type[C]

    def __init__(self, engine: Engine, options: dict[str, Any]) -> None:
        self._engine = engine
        self._options = options
        self._pid = os.getpid()
        self._state: _State = "new"
        # Bridge-loop state, created by _begin.
        self._session: AsyncSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task[Any] | None = None  # the call using the session now
        self._streams: set[AsyncResult[Any] | AsyncScalarResult[Any]] = set()  # open cursors
        # Which side holds the session, shared by the two threads (see _claim and _in_memory): the
        # bridge (a call or the scope's end, under _lock) or the caller's thread (a method that needs
        # no database). A caller that stopped waiting for a call may go on while it still unwinds.
        self._guard = threading.Lock()
        self._bridge_holds = 0
        self._caller_holds = False
        self._caller_left: asyncio.Event | None = None  # set when the caller's thread lets go

    @property
    def bridge(self) -> Bridge:
        return self._engine.bridge

    @property
    def engine(self) -> Engine:
        return self._engine

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._engine!r}, {self._state}>"

    # -- I/O: each written once, as the coroutine that runs on the bridge loop -----------------------

    async def _execute(
        self,
        /,
        statement: Executable,
        params: Params | None = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> AnyResult:
        """Execute a Core or ORM statement (``select()``, ``insert()``, ``update()``, ``text()``, ...) in the
        scope's transaction and return its buffered ``Result``, as ``AsyncSession.execute`` does.

        :param kw: ``execution_options``, ``bind_arguments``.
        :param timeout: seconds; on expiry the statement is cancelled and
            :class:`~loopbridge.CallTimeoutError` raised (the scope then rolls back when it ends).
        """
        async with self._using() as session:
            return await session.execute(statement, params, **kw)

    async def _scalar(
        self,
        /,
        statement: Executable,
        params: Params | None = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> Any:
        """Execute *statement* and return the first column of its first row, or None."""
        async with self._using() as session:
            return await session.scalar(statement, params, **kw)

    async def _scalars(
        self,
        /,
        statement: Executable,
        params: Params | None = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> ScalarResult[Any]:
        """Execute *statement* and return its first column as a buffered ``ScalarResult``
        (``.all()``, ``.first()``, ``.one()``)."""
        async with self._using() as session:
            return await session.scalars(statement, params, **kw)

    async def _get(
        self, /, entity: type[M], ident: Any, *, timeout: float | None = None, **kw: Any
    ) -> M | None:
        """Return the instance of *entity* with primary key *ident*, or None (from the identity map when
        it is there). *kw*: ``options``, ``populate_existing``, ``with_for_update``, ..."""
        async with self._using() as session:
            return await session.get(entity, ident, **kw)

    async def _get_one(self, /, entity: type[M], ident: Any, *, timeout: float | None = None, **kw: Any) -> M:
        """Like :meth:`get`, but raise ``sqlalchemy.exc.NoResultFound`` when there is no such row."""
        async with self._using() as session:
            return await session.get_one(entity, ident, **kw)

    async def _merge(
        self, /, instance: M, *, load: bool = True, timeout: float | None = None, **kw: Any
    ) -> M:
        """Copy the state of *instance* (say, an object from another scope) into this session and
        return the session's own instance."""
        async with self._using() as session:
            return await session.merge(instance, load=load, **kw)

    async def _delete(self, instance: object, *, timeout: float | None = None) -> None:
        """Mark *instance* deleted; the DELETE is emitted at the next flush (or at commit)."""
        async with self._using() as session:
            await session.delete(instance)

    async def _refresh(
        self,
        /,
        instance: object,
        attribute_names: Iterable[str] | None = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> None:
        """Load *instance*'s attributes (or just *attribute_names*, relationships included) now: the way
        to load what lazy loading would load, before the object leaves the scope."""
        async with self._using() as session:
            await session.refresh(instance, attribute_names, **kw)

    async def _flush(self, objects: Sequence[Any] | None = None, *, timeout: float | None = None) -> None:
        """Write pending changes to the database (in the scope's transaction; nothing is committed)."""
        async with self._using() as session:
            await session.flush(objects)

    async def _commit(self, *, timeout: float | None = None) -> None:
        """Commit now. The scope goes on, in a new transaction, and still commits when it ends."""
        async with self._using() as session:
            await session.commit()

    async def _rollback(self, *, timeout: float | None = None) -> None:
        """Roll back now. The scope goes on, in a new transaction."""
        async with self._using() as session:
            await session.rollback()

    async def _run_sync(
        self, /, fn: Callable[..., R], *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> R:
        """Call ``fn(session, *args, **kwargs)`` with the scope's sync-style ``sqlalchemy.orm.Session``, on
        the bridge loop, and return its result.

        The escape hatch for existing sync ORM code: inside *fn*, lazy loading works and
        ``session.query()``, ``session.execute()`` and relationship access behave as in any sync
        SQLAlchemy program. The session is only valid inside *fn*.
        """
        _check_sync_fn(fn, f"{type(self).__name__}.run_sync()", "session")
        async with self._using() as session:
            return await session.run_sync(fn, *args, **kwargs)

    async def _connection(
        self,
        /,
        *,
        execution_options: Mapping[str, Any] | None = None,
        bind_arguments: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> C:
        """The session's connection, in the scope's transaction, begun now if it was not yet: for Core
        statements that bypass the ORM (no autoflush), and for connection-level execution options.

        *execution_options* (``isolation_level="SERIALIZABLE"``, ...) apply only if the connection
        is procured by this call, as in SQLAlchemy: call it first thing in the scope. The connection
        object follows the scope's transaction; it is valid only inside the scope.
        """
        async with self._using() as session:
            await session.connection(
                bind_arguments=dict(bind_arguments) if bind_arguments is not None else None,
                execution_options=dict(execution_options) if execution_options is not None else None,
            )
        return self._connection_class(self)

    async def _stream(
        self,
        /,
        statement: Executable,
        params: Params | None = None,
        *,
        prefetch: int = DEFAULT_PREFETCH,
        timeout: float | None = None,
        **kw: Any,
    ) -> StreamResult[Row[Any]]:
        """Execute *statement* with a server-side cursor and return its rows as a :class:`StreamResult`
        (``for row in ...`` / ``async for row in ...``), fetched *prefetch* at a time: memory stays
        bounded whatever the number of rows. ORM statements load ``yield_per=prefetch`` objects at a
        time. *kw*: ``execution_options``, ``bind_arguments``.

        :raises ConfigurationError: if *prefetch* is not a positive integer.
        """
        return StreamResult(self, await self._open_stream(statement, params, prefetch, kw), prefetch)

    async def _stream_scalars(
        self,
        /,
        statement: Executable,
        params: Params | None = None,
        *,
        prefetch: int = DEFAULT_PREFETCH,
        timeout: float | None = None,
        **kw: Any,
    ) -> StreamResult[Any]:
        """Like :meth:`stream`, yielding the first column of each row (ORM objects for
        ``select(User)``)."""
        result = await self._open_stream(statement, params, prefetch, kw, scalars=True)
        return StreamResult(self, result, prefetch)

    async def _open_stream(
        self,
        statement: Executable,
        params: Params | None,
        prefetch: int,
        kw: dict[str, Any],
        *,
        scalars: bool = False,
    ) -> AsyncResult[Any] | AsyncScalarResult[Any]:
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 1:
            raise ConfigurationError(f"prefetch must be a positive number of rows, not {prefetch!r}")
        # The ORM buffers every row of a result unless told yield_per; with it, both the ORM and the
        # cursor hold about one batch.
        options = {"yield_per": prefetch, **(kw.pop("execution_options", None) or {})}
        async with self._using() as session:
            rows = await session.stream(statement, params, execution_options=options, **kw)
            result = rows.scalars() if scalars else rows
            self._streams.add(result)
        return result

    async def _fetch_from(self, result: AsyncResult[Any] | AsyncScalarResult[Any], size: int) -> list[Any]:
        """Up to *size* rows of an open stream; [] (and the cursor closed) at its end."""
        async with self._using():
            if result not in self._streams:
                raise sqlalchemy.exc.ResourceClosedError(_STREAM_CLOSED)
            rows = list(await result.fetchmany(size))
            if not rows:
                self._streams.discard(result)
                await result.close()
            return rows

    async def _close_stream(self, result: AsyncResult[Any] | AsyncScalarResult[Any]) -> None:
        """Close an open stream's cursor; nothing if it is closed already (the scope's end closes them)."""
        if result not in self._streams or self._state != "open" or self._pid != os.getpid():
            return
        try:
            async with self._using():
                if result in self._streams:
                    self._streams.discard(result)
                    await result.close()
        except Exception:
            if self._state == "open":
                raise
            # The scope ended meanwhile, and its end closed the cursor.

    async def _close_streams(self) -> None:
        """At the scope's end: close the cursors still open, before the commit ends their transaction."""
        streams, self._streams = list(self._streams), set()
        for result in streams:
            try:
                await result.close()
            except Exception as exc:  # the end's commit or rollback says what matters
                logger.debug("%r: a stream's cursor did not close cleanly: %r", self, exc)

    def begin_nested(self) -> Savepoint:
        """A SAVEPOINT: ``with session.begin_nested():`` (sync) or ``async with session.begin_nested():``.

        The block's end releases the savepoint (flushing first); an exception in the block rolls back
        to it and propagates, and the scope goes on: catch it around the block to keep what came
        before. Entering and leaving run on the bridge loop, in the scope's turn.
        """
        self._here()
        return Savepoint(self)

    # -- in memory: no I/O, so the caller's own thread does it (see _in_memory) ---------------------

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

    def _in_memory(self, name: str, op: Callable[[AsyncSession], R]) -> R:
        """``op(session)`` for a method that needs no database: in the caller's thread, unless a call of
        this scope still holds the session on the bridge loop (its caller was cancelled or timed out and
        went on while it unwinds, or another task shares the scope). Then this waits for that call and
        does *op* on the bridge loop, in turn: the session is never touched by two threads at once."""
        session = self._here()
        with self._guard:
            free = self._bridge_holds == 0
            if free:
                self._caller_holds = True
        if not free:
            label = f"{type(self).__name__}.{name}()"
            result: R = self.bridge._run(_Scope._in_turn, (self, op), None, None, label)
            return result
        try:
            return op(session)
        finally:
            with self._guard:
                self._caller_holds = False
                left, self._caller_left = self._caller_left, None
            if left is not None:  # the bridge side waits for us (see _claim)
                assert self._loop is not None
                try:
                    self._loop.call_soon_threadsafe(left.set)
                except RuntimeError:  # the bridge loop is closed, and the waiter with it
                    pass

    async def _in_turn(self, op: Callable[[AsyncSession], R]) -> R:
        async with self._using() as session:
            return op(session)

    # -- the scope ------------------------------------------------------------------------------------

    async def _begin(self) -> None:
        """Open the scope: a fresh ``AsyncSession`` on the bridge loop (its connection comes at the first
        statement)."""
        if self._state != "new":
            raise sqlalchemy.exc.InvalidRequestError(
                f"{self!r} was already used: a session scope opens once; open a new one with "
                f"`{self._opening()} as session:`"
            )
        engine = self._engine._async_engine()
        self._session = AsyncSession(engine, sync_session_class=_HomeSession, **self._options)
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._state = "open"
        self._engine._scopes.add(self)

    async def _end(self, commit: bool) -> None:
        """Close the scope: commit (or roll back), then close the session so its connection returns to the
        pool. Shielded: even if the caller stops waiting (a cancelled task, a timeout, Ctrl-C), the end
        completes on the bridge loop. A commit interrupted that way has an unknown outcome."""
        if self._state == "new":  # opening failed: nothing to end
            return
        if self._pid != os.getpid():  # the parent's scope: never touch its connection
            if commit:
                raise self._unusable()
            return
        ending = asyncio.get_running_loop().create_task(self._ending(commit))
        ending.add_done_callback(_retrieve)
        await asyncio.shield(ending)

    async def _ending(self, commit: bool) -> None:
        assert self._lock is not None
        assert self._session is not None
        async with self._lock:
            await self._claim()
            try:
                if self._state != "open":
                    if commit:
                        raise self._unusable()
                    return  # the engine closed it: nothing left to roll back
                session = self._session
                self._state = "ended"
                try:
                    await self._close_streams()
                    if commit:
                        await session.commit()
                finally:
                    try:
                        await session.close()  # rolls back whatever was not committed
                    finally:
                        self._engine._forget_scope(self)
            finally:
                self._let_go()

    async def _abandon(self) -> None:
        """The engine is closing and this scope did not end in time: end it without committing."""
        assert self._lock is not None
        if self._state == "open":
            self._state = "abandoned"
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # its caller gets EngineClosedError (see _using)
        try:
            await asyncio.wait_for(self._lock.acquire(), GRACE)
        except (asyncio.TimeoutError, TimeoutError):
            locked = False
        else:
            locked = True
        try:
            await asyncio.wait_for(self._claim(), GRACE)
        except (asyncio.TimeoutError, TimeoutError):  # the caller's thread is stuck in a method
            claimed = False
        else:
            claimed = True
        try:
            # Unless its owner's own end got there first (then it ends as the owner asked).
            if self._state == "abandoned" and self._session is not None:
                self._streams = set()  # their cursors go with the connection
                await self._session.invalidate()  # the server rolls back; the connection is discarded
        except Exception:
            logger.exception("%r: error while ending an abandoned session", self._engine)
        finally:
            if claimed:
                self._let_go()
            if locked:
                self._lock.release()
            self._engine._forget_scope(self)

    @asynccontextmanager
    async def _using(self) -> AsyncIterator[AsyncSession]:
        """The session, for one call at a time, on the bridge loop."""
        self._here()
        assert self._lock is not None
        async with self._lock:
            session = self._here()
            self._task = asyncio.current_task()
            try:
                await self._claim()
                try:
                    yield session
                finally:
                    self._let_go()
            except asyncio.CancelledError:
                if self._state == "abandoned":  # cancelled by Engine.close(): say so, not "cancelled"
                    raise self._unusable() from None
                raise
            finally:
                self._task = None

    async def _claim(self) -> None:
        """Take the session for the bridge side (under _lock), once the caller's thread has let go of it
        (a method that needs no database, in progress there: see _in_memory)."""
        while True:
            with self._guard:
                if not self._caller_holds:
                    self._bridge_holds += 1
                    return
                if self._caller_left is None:
                    self._caller_left = asyncio.Event()
                left = self._caller_left
            await left.wait()

    def _let_go(self) -> None:
        with self._guard:
            self._bridge_holds -= 1

    def _here(self) -> AsyncSession:
        """The session, if this scope may use it now; any thread."""
        if self._state == "open" and self._pid == os.getpid():
            assert self._session is not None
            return self._session
        raise self._unusable()

    def _unusable(self) -> Exception:
        if self._pid != os.getpid():
            return sqlalchemy.exc.InvalidRequestError(
                "this session scope was opened before os.fork(), in the parent process; its connection "
                "belongs to the parent. Open a new scope in the child"
            )
        if self._state == "abandoned":
            return EngineClosedError(
                f"{self._engine!r} was closed while this session scope was open; the scope was ended "
                "without committing"
            )
        if self._state == "new":
            return sqlalchemy.exc.InvalidRequestError(
                f"the session is not open: use it inside its block, `{self._opening()} as session: ...`"
            )
        return sqlalchemy.exc.InvalidRequestError(
            "this session scope has ended (committed or rolled back, and closed); open a new one. "
            "Objects from it can join a new scope with session.add(obj) or session.merge(obj)"
        )

    def _ended_elsewhere(self, exc: BaseException | None) -> bool:
        """At the end of the block: True if the engine already ended this scope (or it is the parent
        process's), so there is nothing to cross for. Raises if the block itself succeeded: its work was
        not committed."""
        if self._state != "abandoned" and self._pid == os.getpid():
            return False
        if exc is None:
            raise self._unusable()
        return True

    def _opening(self) -> str:
        return f"{'async with' if self._facade == 'asession' else 'with'} engine.{self._facade}()"

    def _interrupted_opening(self, exc: BaseException) -> None:
        # Cancelled (or Ctrl-C) while opening: the opening may have completed on the bridge all the
        # same, and no __exit__ will come to end it. Queue its end behind it; if it never opened, the
        # end does nothing. (An Exception means _begin itself refused, and opened nothing.)
        if isinstance(exc, Exception):
            return
        try:
            self.bridge.submit(_Scope._end, self, False)
        except BridgeClosedError:  # the bridge closed, and the engine and its scopes with it
            pass

    def _exit_failed(self, exc: BaseException) -> None:
        # Ending a scope that is already failing: the scope's own error is what the caller must see,
        # and nothing was committed either way (a failed rollback still ends the transaction).
        logger.warning("%r: could not roll back cleanly while handling an error: %s", self, exc)


class _ScopeConnection:
    """What the two connection facades share: the session's connection, in the scope's transaction,
    each call made in the scope's turn on the bridge loop (see ``_Scope._connection``)."""

    def __init__(self, scope: _Scope[Any]) -> None:
        self._scope = scope

    @property
    def bridge(self) -> Bridge:
        return self._scope.bridge

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._scope!r}>"

    @asynccontextmanager
    async def _on_connection(self) -> AsyncIterator[AsyncConnection]:
        """The session's connection, in the scope's turn on the bridge loop, for one call."""
        async with self._scope._using() as session:
            yield await session.connection()

    async def _execute(
        self,
        /,
        statement: Executable,
        params: Params | None = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> AnyResult:
        """Execute a Core statement on the session's connection, in its transaction, without the ORM
        (no autoflush); return its buffered ``Result``. *kw*: ``execution_options``."""
        async with self._on_connection() as connection:
            return await connection.execute(statement, params, **kw)

    async def _scalar(
        self,
        /,
        statement: Executable,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> Any:
        """Execute *statement* and return the first column of its first row, or None."""
        async with self._on_connection() as connection:
            return await connection.scalar(statement, params, **kw)

    async def _scalars(
        self,
        /,
        statement: Executable,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> ScalarResult[Any]:
        """Execute *statement* and return its first column as a buffered ``ScalarResult``."""
        async with self._on_connection() as connection:
            return await connection.scalars(statement, params, **kw)

    async def _exec_driver_sql(
        self,
        /,
        statement: str,
        parameters: Any = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> AnyResult:
        """Execute a SQL string as the driver takes it (asyncpg's ``$1`` placeholders), on the session's
        connection."""
        async with self._on_connection() as connection:
            return await connection.exec_driver_sql(statement, parameters, **kw)

    async def _run_sync(
        self, /, fn: Callable[..., R], *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> R:
        """Call ``fn(connection, *args, **kwargs)`` with the sync-style ``sqlalchemy.Connection`` of the
        session, in its transaction, on the bridge loop (sync Core code, ``metadata.create_all``,
        ``pandas.DataFrame.to_sql``, ...). The connection is only valid inside *fn*."""
        _check_sync_fn(fn, f"{type(self).__name__}.run_sync()", "connection")
        async with self._on_connection() as connection:
            return await connection.run_sync(fn, *args, **kwargs)


_CONNECTIONS = ("BridgedConnection", "AsyncBridgedConnection")
_c_execute = twins(_ScopeConnection._execute, owners=_CONNECTIONS)
_c_scalar = twins(_ScopeConnection._scalar, owners=_CONNECTIONS)
_c_scalars = twins(_ScopeConnection._scalars, owners=_CONNECTIONS)
_c_exec_driver_sql = twins(_ScopeConnection._exec_driver_sql, owners=_CONNECTIONS)
_c_run_sync = twins(_ScopeConnection._run_sync, owners=_CONNECTIONS)


class BridgedConnection(_ScopeConnection):
    """``session.connection()`` of a :class:`BridgedSession`: the session's connection, in the scope's
    transaction. ``execute``, ``scalar``, ``scalars``, ``exec_driver_sql`` and ``run_sync`` block the
    calling thread while they run on the bridge loop. Valid only inside the scope."""

    execute = _c_execute[0]
    scalar = _c_scalar[0]
    scalars = _c_scalars[0]
    exec_driver_sql = _c_exec_driver_sql[0]
    run_sync = _c_run_sync[0]


class AsyncBridgedConnection(_ScopeConnection):
    """``await session.connection()`` of an :class:`AsyncBridgedSession`: the session's connection, in
    the scope's transaction. ``execute``, ``scalar``, ``scalars``, ``exec_driver_sql`` and ``run_sync``
    are awaited, from any loop, and run on the bridge loop. Valid only inside the scope."""

    execute = _c_execute[1]
    scalar = _c_scalar[1]
    scalars = _c_scalars[1]
    exec_driver_sql = _c_exec_driver_sql[1]
    run_sync = _c_run_sync[1]


class Savepoint:
    """``session.begin_nested()``: a SAVEPOINT for ``with`` (sync session) or ``async with`` (async
    session). Leaving the block normally releases it (after a flush); an exception rolls back to it and
    propagates. The scope's own transaction goes on either way. Entered once."""

    def __init__(self, scope: _Scope[Any]) -> None:
        self._scope = scope
        self._entered = False
        self._transaction: AsyncSessionTransaction | None = None  # on the bridge loop

    @property
    def bridge(self) -> Bridge:
        return self._scope.bridge

    def __repr__(self) -> str:
        state = "active" if self._transaction is not None else "ended" if self._entered else "new"
        return f"<Savepoint of {self._scope!r}, {state}>"

    async def _begin(self, owner: Owner) -> Self:
        if self._entered:
            raise sqlalchemy.exc.InvalidRequestError(
                "this savepoint was already used: call session.begin_nested() again for a new one"
            )
        self._entered = True
        async with self._scope._using() as session:
            self._transaction = await session.begin_nested()
        return self

    async def _end(self, error: BaseException | None) -> None:
        transaction, self._transaction = self._transaction, None
        if transaction is None:  # it never began
            return
        if self._scope._state != "open" and error is not None:
            return  # the scope ended under it (the engine closed): the block's error says enough
        async with self._scope._using():
            # SQLAlchemy's own end of a nested block: release, or roll back to the savepoint (also when
            # the release fails), and nothing if the block already ended it.
            await transaction.__aexit__(
                type(error) if error is not None else None,
                error,
                error.__traceback__ if error is not None else None,
            )

    __enter__, __exit__, __aenter__, __aexit__ = twin_contexts(_begin, _end)


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
            raise sqlalchemy.exc.ResourceClosedError(_STREAM_CLOSED)

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
        scope.bridge.submit(_Scope._close_stream, scope, result)
    except BridgeClosedError:  # the bridge closed, and the connection with it
        pass


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


class BridgedSession(_Scope[BridgedConnection]):
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

    def __enter__(self) -> Self:
        try:
            self.bridge._run(_Scope._begin, (self,), None, None, "engine.session()")
        except BaseException as exc:
            self._interrupted_opening(exc)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._ended_elsewhere(exc):
            return
        if exc is None:
            self.bridge._run(_Scope._end, (self, True), None, None, "BridgedSession commit")
            return
        try:
            self.bridge._run(_Scope._end, (self, False), None, None, "BridgedSession rollback")
        except Exception as failure:
            self._exit_failed(failure)


class AsyncBridgedSession(_Scope[AsyncBridgedConnection]):
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

    async def __aenter__(self) -> Self:
        try:
            await self.bridge._arun(_Scope._begin, (self,), None, None, "engine.asession()")
        except BaseException as exc:
            self._interrupted_opening(exc)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._ended_elsewhere(exc):
            return
        if exc is None:
            await self.bridge._arun(_Scope._end, (self, True), None, None, "AsyncBridgedSession commit")
            return
        try:
            await self.bridge._arun(_Scope._end, (self, False), None, None, "AsyncBridgedSession rollback")
        except Exception as failure:
            self._exit_failed(failure)


class _HomeSession(Session):
    """The sync ``Session`` inside each scope's ``AsyncSession``: it refuses to touch the database from any
    thread but the one it was made on (the bridge thread).

    An ORM object in the caller's thread that reads an attribute it has not loaded calls
    :meth:`execute` here (lazy loads, expired and deferred attributes all do), before any autoflush: the
    check stops it while nothing has happened yet, with a message that says what to do instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._home = threading.get_ident()

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != self._home:
            raise LazyLoadError(_lazy_load_message(args[0] if args else kwargs.get("statement")))
        return super().execute(*args, **kwargs)

    def flush(self, objects: Sequence[Any] | None = None) -> None:
        if threading.get_ident() != self._home:
            raise LazyLoadError(_lazy_load_message(None))
        super().flush(objects)


# -- helpers ---------------------------------------------------------------------------------------


def _normalize_url(url: str) -> str:
    """*url* for asyncpg, checked (parse_dsn refuses what asyncpg cannot read)."""
    scheme = url.partition("://")[0].lower()
    dialect, plus, driver = scheme.partition("+")
    if plus and dialect in ("postgresql", "postgres") and driver != "asyncpg":
        raise ConfigurationError(
            f"Engine runs SQLAlchemy's asyncpg dialect on the bridge loop, not {driver!r}: write the URL as "
            "'postgresql+asyncpg://user:password@host:5432/dbname' (or 'postgresql://...')"
        )
    return parse_dsn(f"postgresql{url[len(scheme) :]}" if scheme == "postgres+asyncpg" else url).dsn


def _lift_url_options(dsn: str) -> tuple[str, dict[str, Any]]:
    """Take the query options that SQLAlchemy's asyncpg dialect reads as keywords (``_URL_OPTIONS``) out
    of *dsn*, as keywords of their type; the rest of the URL stays as it was, for asyncpg.

    :raises ConfigurationError: for a value of the wrong type, or ``prepared_statement_name_func``
        (a function, which a URL cannot hold).
    """
    base, question, rest = dsn.partition("?")
    if not question:
        return dsn, {}
    query, hash_, fragment = rest.partition("#")
    kept: list[str] = []
    lifted: dict[str, Any] = {}
    for item in query.split("&"):
        key, _, raw = item.partition("=")
        name = unquote_plus(key)
        if name == "prepared_statement_name_func":
            raise ConfigurationError(
                "prepared_statement_name_func is a function, which a URL cannot hold: pass it as "
                "connect_args={'prepared_statement_name_func': ...}"
            )
        convert = _URL_OPTIONS.get(name)
        if convert is None:
            kept.append(item)
            continue
        value = unquote_plus(raw)
        try:
            lifted[name] = convert(value)
        except ValueError:
            raise ConfigurationError(
                f"URL option {name}={value!r} is not a{'n integer' if convert is int else ' number'}"
            ) from None
    query = "&".join(kept)
    return f"{base}{'?' if query else ''}{query}{hash_}{fragment}", lifted


def _split_connect_args(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split connect options into the dialect's (for its connection adapter) and asyncpg.connect's.

    :raises ConfigurationError: for an unknown option, or a dialect option of the wrong type.
    """
    dialect_args: dict[str, Any] = {}
    connect_args: dict[str, Any] = {}
    for name, value in options.items():
        if name in _DIALECT_OPTIONS:
            dialect_args[name] = value
        elif name in _CONNECT_OPTIONS:
            connect_args[name] = value
        elif name == "loop":
            raise ConfigurationError(
                "connect_args cannot take 'loop': connections are made on the bridge loop"
            )
        else:
            close = difflib.get_close_matches(name, _DIALECT_OPTIONS | _CONNECT_OPTIONS, n=1)
            raise ConfigurationError(
                f"unknown connect option {name!r}{f'; did you mean {close[0]!r}?' if close else ''} "
                "(connect_args take SQLAlchemy's asyncpg dialect options, prepared_statement_cache_size and "
                "prepared_statement_name_func, and asyncpg.connect's keywords)"
            )
    cache = dialect_args.get("prepared_statement_cache_size", 0)
    if not isinstance(cache, int) or isinstance(cache, bool) or cache < 0:
        raise ConfigurationError(
            f"prepared_statement_cache_size must be a number of statements (0 turns the cache off), "
            f"not {cache!r}"
        )
    name_func = dialect_args.get("prepared_statement_name_func")
    if name_func is not None and not callable(name_func):
        raise ConfigurationError(
            "prepared_statement_name_func must be a function returning a statement name, such as "
            f"lambda: f'__asyncpg_{{uuid.uuid4()}}__', not {type(name_func).__name__}"
        )
    return dialect_args, connect_args


def _transaction_pooling(dialect_args: dict[str, Any], connect_args: dict[str, Any]) -> None:
    """Adjust the options for PgBouncer in transaction pooling mode (``pgbouncer=True``), in place.

    There a server connection is lent for one transaction, so a prepared statement must not outlive its
    execution: no statement cache in SQLAlchemy's adapter nor in asyncpg. SQLAlchemy's dialect then
    prepares each statement anew, and asyncpg (>= 0.31, with its cache off) keeps it unnamed and parses
    it again with its execution, in one exchange: that works inside and outside a transaction
    (autocommit) and leaves nothing on the servers. Older asyncpg names every prepared statement, so
    names are made unique instead (SQLAlchemy's documented recipe; it still needs a transaction).

    :raises ConfigurationError: if the options ask for a statement cache.
    """
    for name, options in (
        ("statement_cache_size", connect_args),
        ("prepared_statement_cache_size", dialect_args),
    ):
        value = options.get(name, 0)
        if value != 0:
            raise ConfigurationError(
                f"pgbouncer=True turns the prepared statement caches off, but {name}={value!r} was given: "
                "cached statements do not survive transaction pooling. Drop "
                f"{name} (or pgbouncer=True if the pooler runs in session mode)"
            )
        options[name] = 0
    if not _UNNAMED_PREPARE:
        dialect_args.setdefault("prepared_statement_name_func", _unique_statement_name)


def _unique_statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4()}__"


def _check_engine_options(url: URL, options: dict[str, Any]) -> None:
    """Let SQLAlchemy judge the options now, in the caller's thread, rather than at first use on the
    bridge: creating an engine makes no connection and binds to no loop, and this one is dropped."""
    try:
        create_async_engine(url, async_creator=_never_connect, **options)
    except (TypeError, sqlalchemy.exc.ArgumentError) as exc:
        raise ConfigurationError(
            f"invalid engine option: {exc} (Engine passes its keyword arguments to SQLAlchemy's "
            "create_async_engine; asyncpg.connect options go in connect_args={...})"
        ) from None


async def _never_connect() -> asyncpg.Connection:  # pragma: no cover - the dry-run engine never connects
    raise AssertionError("the engine built to check options must not connect")


def _session_options(options: dict[str, Any]) -> dict[str, Any]:
    for name in options:
        if name in _RESERVED_SESSION_OPTIONS:
            raise ConfigurationError(
                f"a session scope does not take {name!r}: it is always bound to its Engine, on the "
                "bridge loop"
            )
    # Objects leave the scope with their attributes: expiring them at commit would make every later
    # read a lazy load, which cannot work outside the bridge loop (SQLAlchemy advises the same for
    # asyncio).
    return {"expire_on_commit": False, **options}


def _check_sync_fn(fn: object, label: str, first: str) -> None:
    if not callable(fn):
        raise TypeError(f"{label} needs a function that takes the {first} first, not {type(fn).__name__}")
    if inspect.iscoroutinefunction(fn):
        raise TypeError(
            f"{label} runs plain (sync) functions, with a sync {first}, but {_name(fn)} is 'async def'. "
            f"incorrect: {label.replace('()', f'({_name(fn)})')}; correct: define it with 'def', "
            "or await the async API directly"
        )


def _repeats_a_secret(exc: BaseException, secrets: Iterable[str | None]) -> bool:
    """Does *exc*, or an exception it chains, show one of *secrets* in its message or repr?"""
    seen: set[int] = set()
    chained: BaseException | None = exc
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        shown = f"{chained}\n{chained!r}"
        if any(secret and secret in shown for secret in secrets):
            return True
        chained = chained.__cause__ or chained.__context__
    return False


def _swap_autoflush(session: AsyncSession, autoflush: bool) -> bool:
    before = session.sync_session.autoflush
    session.sync_session.autoflush = autoflush
    return before


def _retrieve(task: asyncio.Task[Any]) -> None:
    # The caller that stopped waiting no longer sees the outcome; this keeps asyncio from logging
    # "exception never retrieved" for it (a failure is logged where it matters: _exit_failed).
    if not task.cancelled():
        task.exception()


def _name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__)


def _lazy_load_message(statement: object) -> str:
    what = "an ORM object"
    descriptions = getattr(statement, "column_descriptions", None)
    if descriptions:
        entity = descriptions[0].get("entity")
        if isinstance(entity, type):
            what = f"an ORM object (loading {entity.__name__})"
    return (
        f"{what} tried to load from the database in thread {threading.current_thread().name!r}, "
        "outside the bridge loop: an attribute that was not loaded (a lazy relationship, or an expired "
        "or deferred column) was read there. Its session does I/O only on the bridge loop, so lazy "
        "loading cannot work here. Load what you need inside the session scope: eagerly, with "
        "select(...).options(selectinload(Parent.children)), or with session.refresh(obj, ['children']); "
        "or move the code that walks relationships into session.run_sync(fn), where lazy loading works"
    )
