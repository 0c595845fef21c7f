"""The Engine: an SQLAlchemy ``AsyncEngine`` created, used and disposed of on the bridge loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import asyncpg
from sqlalchemy import URL, event
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from loopbridge._call import invoke
from loopbridge._closing import Closing
from loopbridge._dsn import DsnInfo, parse_dsn, redact, resolve_dsn
from loopbridge._loop import GRACE, ClosedWhenUnreachable
from loopbridge._source import connect_failure
from loopbridge._twins import OpenClose, twins
from loopbridge.bridge import Bridge, default_bridge
from loopbridge.errors import ConfigurationError, ConnectError

from ._options import (
    _RESERVED_ENGINE_OPTIONS,
    _check_engine_options,
    _check_sync_fn,
    _lift_url_options,
    _normalize_url,
    _session_options,
    _split_connect_args,
    _transaction_pooling,
)
from ._sources import PLAIN, Pinned, Plain
from .errors import EngineClosedError
from .session import SessionScope

if TYPE_CHECKING:
    from ._scope import _Scope

__all__ = ["Engine"]

logger = logging.getLogger("loopbridge")

R = TypeVar("R")


class Engine(ClosedWhenUnreachable, Closing, OpenClose):
    """An SQLAlchemy ``AsyncEngine`` (asyncpg dialect) that lives on a bridge loop, for every caller.

    ::

        engine = Engine("postgresql://app@db:5432/app")
        with engine.session() as session:                  # sync code: each call blocks
            session.add(User(name="ada"))
        async with engine.session() as session:            # async code, on any loop
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
        self._secrets = (*self._info.secrets, password if isinstance(password, str) else None)
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
        self._sessions: Plain = PLAIN  # where sessions get their connection; Pinned while pinned

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

    def __await__(self) -> Generator[Any, None, NoReturn]:
        raise TypeError(
            "an Engine is not awaited: 'async with Engine(...) as engine:', or await engine.aopen() to "
            "connect now"
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._engine is not None else "not opened yet"
        return f"<Engine {self._info.redacted!r} on bridge {self._bridge.name!r}, {state}>"

    # -- session scopes -----------------------------------------------------------------------------

    def session(self, **options: Any) -> SessionScope:
        """A session scope: ``with engine.session() as session:`` in sync code (a
        :class:`BridgedSession`, whose calls block), ``async with engine.session() as session:`` in async
        code on any loop (an :class:`AsyncBridgedSession`, whose calls are awaited).

        Commits when the block ends normally, rolls back when it raises. *options* go to
        ``AsyncSession`` (``autoflush``, ``info``, ``expire_on_commit``, which defaults to False here).

        :raises ConfigurationError: for ``bind``, ``binds`` or ``sync_session_class``.
        """
        return SessionScope(self, _session_options(options))

    # -- calls: each written once, as the coroutine that runs on the bridge loop ---------------------

    async def _run(self, fn: Callable[..., Awaitable[R]], *args: Any, timeout: float | None = None) -> R:
        """Call ``await fn(async_engine, *args)`` with the ``AsyncEngine``, on the bridge loop.

        The escape hatch for anything SQLAlchemy's asyncio API does (``async with engine.begin()``,
        streaming, pool inspection). The engine is only valid inside *fn*: do not keep it.
        """
        result: R = await invoke("Engine.run()", fn, (self._async_engine(), *args))
        return result

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
        async with self._sessions.transaction(self._async_engine()) as connection:
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

    # -- closing: close() and aclose() come from Closing --------------------------------------------

    def _opened(self) -> bool:
        return self._engine is not None

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
        await self._unpin(max(deadline - loop.time(), GRACE))  # give the pinned connection back first
        engine, self._engine = self._engine, None
        if engine is None:
            return
        try:
            await asyncio.wait_for(engine.dispose(), max(deadline - loop.time(), GRACE))
        except (asyncio.TimeoutError, TimeoutError):
            logger.warning("%r: the pool did not close in time; leaving its connections to the server", self)

    def _forget_after_fork(self) -> list[object]:
        dropped: list[object] = [*self._scopes, self._sessions]
        self._sessions = PLAIN
        if self._engine is not None:
            dropped.append(self._engine)
        self._engine = None
        self._scopes = set()
        self._drained = None
        return dropped

    # -- pinning: every session on one connection, in a transaction rolled back at the end -----------
    #
    # For test fixtures (loopbridge.contrib.pytest_plugin): the code under test opens its sessions as
    # usual, from any thread or loop, and they all run on one connection, inside an outer transaction
    # that _unpin rolls back. Each session joins it with join_transaction_mode="create_savepoint", so
    # its commits and rollbacks are savepoints and it sees what the test wrote before it. Sessions take
    # turns on the connection, one call at a time; sessions whose lifetimes overlap must end in the
    # reverse order of their first statements, as savepoints do (nested scopes do). Engine.run_sync
    # runs in a savepoint on the connection; Engine.run, which hands out the AsyncEngine, is not pinned.
    # Private: run both on the bridge loop, e.g. engine.bridge.run(engine._pin).

    async def _pin(self) -> None:
        """From now on, until :meth:`_unpin`, every session scope opened on this engine (and every
        ``run_sync``) runs on one connection, taken from the pool now, inside a transaction begun now.
        Scopes already open go on as they were.

        :raises RuntimeError: if the engine is already pinned.
        :raises EngineClosedError: if the engine is closed.
        """
        if isinstance(self._sessions, Pinned):
            raise RuntimeError(f"{self!r} is already pinned to a connection; unpin it first")
        connection = await self._async_engine().connect()
        try:
            transaction = await connection.begin()
            # The dialect sends BEGIN with the first statement: send one, so that the transaction is
            # open on the server from now on (and _unpin can tell whether something ended it).
            await connection.exec_driver_sql("SELECT 1")
        except BaseException:
            await connection.close()
            raise
        if isinstance(self._sessions, Pinned):  # pinned by another task while we connected
            await connection.close()
            raise RuntimeError(f"{self!r} is already pinned to a connection; unpin it first")
        self._sessions = Pinned(connection, transaction)

    async def _unpin(self, timeout: float = 10.0) -> bool:
        """Roll the outer transaction back and return the connection to the pool; scopes opened from now
        on use the pool again. Waits up to *timeout* seconds for a call still running on the connection,
        then discards the connection (the server rolls back). Scopes still open on it fail at their
        next call. Safe to call when not pinned.

        :returns: True if the outer transaction was still open when rolled back; False if something
            ended it from inside (a ``COMMIT`` sent as SQL, say), and what came after was committed, or
            if the engine was not pinned.
        """
        pinned = self._sessions
        if not isinstance(pinned, Pinned):
            return False
        self._sessions = PLAIN
        return await pinned.release(timeout)

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
