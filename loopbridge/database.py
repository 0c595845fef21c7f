"""Database: an asyncpg pool that lives only on the bridge loop, usable from every kind of caller.

The pool is created on the bridge loop, used there and closed there; callers never touch it. Sync code
calls ``db.fetch(...)`` and blocks; async code on any loop awaits ``db.afetch(...)``. Both are derived
from one implementation (see ``loopbridge._twins``), so they cannot drift apart.
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ._dsn import DsnInfo, parse_dsn, redact, resolve_dsn
from ._twins import twins
from .bridge import Bridge, default_bridge
from .errors import (
    BridgeClosedError,
    ConfigurationError,
    ConnectError,
    DatabaseClosedError,
    PoolTimeoutError,
)

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

__all__ = ["Database"]

logger = logging.getLogger("loopbridge")

R = TypeVar("R")

#: How much longer than its own timeout a close may take to cross to the bridge and back.
_CLOSE_MARGIN = 5.0

# Options Database manages itself, and may not be passed through to asyncpg.
_RESERVED_OPTIONS = {"dsn", "loop", "min_size", "max_size"}


def _pass_through_options() -> frozenset[str]:
    names = set(inspect.signature(asyncpg.create_pool).parameters)
    names |= set(inspect.signature(asyncpg.connect).parameters)
    return frozenset(names - _RESERVED_OPTIONS - {"connect_kwargs"})


_POOL_OPTIONS = _pass_through_options()


class Database:
    """A PostgreSQL connection pool on a bridge, for sync and async callers alike.

    ::

        db = Database("postgresql://app@db:5432/app")
        rows = db.fetch("SELECT * FROM users WHERE id = $1", 42)          # sync code
        rows = await db.afetch("SELECT * FROM users WHERE id = $1", 42)   # async code, any loop

    The pool is created on the bridge loop on first use (or by :meth:`open`); results are asyncpg's own
    ``Record`` objects; asyncpg's exceptions reach the caller unchanged.

    :param dsn: ``postgresql://user:password@host:port/dbname`` (asyncpg's URL syntax, multi-host and
        query options included). Default: ``$LOOPBRIDGE_DSN``, then ``$DATABASE_URL``.
    :param bridge: the bridge the pool lives on; default :func:`~loopbridge.default_bridge`.
    :param min_size: connections opened when the pool is created and kept open.
    :param max_size: most connections open at once.
    :param pool_timeout: seconds a call may wait for a free connection before
        :class:`~loopbridge.PoolTimeoutError`; None waits forever.
    :param pool_options: passed to ``asyncpg.create_pool`` / ``asyncpg.connect`` (``command_timeout``,
        ``statement_cache_size``, ``ssl``, ``server_settings``, ``init``, ``setup``, ``connect``, ...).
    :raises ConfigurationError: for a malformed DSN, no DSN at all, bad sizes or an unknown option.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        bridge: Bridge | None = None,
        min_size: int = 1,
        max_size: int = 10,
        pool_timeout: float | None = 30.0,
        **pool_options: Any,
    ) -> None:
        self._info: DsnInfo = parse_dsn(resolve_dsn(dsn))
        _check_sizes(min_size, max_size, pool_timeout)
        _check_options(pool_options)
        self._bridge = bridge if bridge is not None else default_bridge()
        self._min_size = min_size
        self._max_size = max_size
        self._pool_timeout = pool_timeout
        self._user_connect: Callable[..., Awaitable[asyncpg.Connection]] = pool_options.pop(
            "connect", asyncpg.connect
        )
        self._pool_options = pool_options
        password = pool_options.get("password")
        self._secrets = (self._info.password, password if isinstance(password, str) else None)
        # Closed is set from any thread and read everywhere; the rest is bridge-loop state, touched only
        # on the bridge loop.
        self._closed = False
        self._pool: asyncpg.Pool | None = None
        self._opening: asyncio.Task[asyncpg.Pool] | None = None
        self._leased = 0  # connections held or being acquired through this Database
        self._releasing: set[asyncio.Task[None]] = set()  # connections being reset after their call

    # -- properties ---------------------------------------------------------------------------------

    @property
    def bridge(self) -> Bridge:
        """The bridge whose loop owns the pool."""
        return self._bridge

    @property
    def dsn(self) -> str:
        """The DSN with its password replaced by ``***``."""
        return self._info.redacted

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._pool is not None else "not opened yet"
        return f"<Database {self._info.redacted!r} on bridge {self._bridge.name!r}, {state}>"

    # -- queries: each written once, as the coroutine that runs on the bridge loop -----------------

    async def _fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[asyncpg.Record]:
        """Run *query* with *args* (``$1``, ``$2``, ...) and return every row as an asyncpg Record.

        :param timeout: seconds for the whole call (waiting for a connection included); on expiry the
            query is cancelled and :class:`~loopbridge.CallTimeoutError` raised.
        """
        async with _Lease(self) as con:
            return await con.fetch(query, *args)

    async def _fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> asyncpg.Record | None:
        """Run *query* and return its first row, or None if it returned none."""
        async with _Lease(self) as con:
            return await con.fetchrow(query, *args)

    async def _fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        """Run *query* and return the value of *column* in its first row, or None if no row."""
        async with _Lease(self) as con:
            return await con.fetchval(query, *args, column=column)

    async def _execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        """Run a command and return its status (``'INSERT 0 1'``). Without *args*, *query* may hold
        several statements separated by semicolons."""
        async with _Lease(self) as con:
            return await con.execute(query, *args)

    async def _executemany(
        self, command: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        """Run *command* once per argument tuple in *args*, atomically (one implicit transaction)."""
        async with _Lease(self) as con:
            await con.executemany(command, args)

    async def _run(self, fn: Callable[..., Awaitable[R]], *args: Any, timeout: float | None = None) -> R:
        """Call ``await fn(connection, *args)`` with a pooled asyncpg connection, on the bridge loop.

        The escape hatch for anything asyncpg can do (transactions, cursors, COPY, listeners, type
        codecs). The connection is only valid inside *fn*: do not keep it or pass it to another thread.
        """
        _check_callable(fn)
        async with _Lease(self) as con:
            result = fn(con, *args)
            if not inspect.isawaitable(result):
                raise TypeError(
                    f"Database.run() runs async functions, but {getattr(fn, '__qualname__', fn)!r} returned "
                    f"{type(result).__name__}; define it with 'async def'"
                )
            return await result

    async def _open(self) -> None:
        """Create the pool now (with its ``min_size`` connections) instead of on first use.

        :raises ConnectError: if the server cannot be reached or refuses the login.
        """
        await self._get_pool()

    fetch, afetch = twins(_fetch)
    fetchrow, afetchrow = twins(_fetchrow)
    fetchval, afetchval = twins(_fetchval)
    execute, aexecute = twins(_execute)
    executemany, aexecutemany = twins(_executemany)
    run, arun = twins(_run)
    open, aopen = twins(_open)

    # -- closing ------------------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Close the pool on the bridge loop: calls in flight may finish within *timeout* seconds, then
        their connections are terminated. Later calls raise :class:`DatabaseClosedError`. Safe to call
        twice. The bridge keeps running (other Databases may share it)."""
        if self._mark_closed():
            try:
                self._bridge._run(
                    self._aclose_on_bridge, (timeout,), None, timeout + _CLOSE_MARGIN, "Database.close()"
                )
            except BridgeClosedError:  # the bridge closed meanwhile, and closed the pool with it
                pass

    async def aclose(self, timeout: float = 10.0) -> None:
        """:meth:`close` for async code, from any loop."""
        if self._mark_closed():
            try:
                await self._bridge._arun(
                    self._aclose_on_bridge, (timeout,), None, timeout + _CLOSE_MARGIN, "Database.aclose()"
                )
            except BridgeClosedError:  # the bridge closed meanwhile, and closed the pool with it
                pass

    def _mark_closed(self) -> bool:
        """Mark closed; True if a pool may exist on a running bridge and must be closed there."""
        was_closed, self._closed = self._closed, True
        return (
            not was_closed
            and (self._pool is not None or self._opening is not None)
            and (self._bridge.running)
        )

    async def _aclose_on_bridge(self, timeout: float) -> None:
        self._closed = True
        pool, opening = self._pool, self._opening
        self._pool = self._opening = None
        self._bridge._unregister(self)
        if pool is None and opening is not None:  # closed while the pool was being created
            try:
                pool = await asyncio.shield(opening)
            except Exception:  # it failed to open: nothing to close
                return
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            logger.warning("%r: connections still in use after %g s; terminating them", self, timeout)
            pool.terminate()

    def _forget_after_fork(self) -> list[object]:
        dropped: list[object] = [obj for obj in (self._pool, self._opening) if obj is not None]
        dropped.extend(self._releasing)
        self._pool = self._opening = None
        self._releasing = set()
        self._leased = 0
        return dropped

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        await self.aopen()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- the pool, on the bridge loop ---------------------------------------------------------------

    async def _get_pool(self) -> asyncpg.Pool:
        pool = self._pool
        if pool is not None:
            return pool
        if self._closed:
            raise DatabaseClosedError(f"{self!r} is closed; create a new Database to keep querying")
        opening = self._opening
        if opening is None:
            # A task of its own, so that a caller cancelled while waiting does not abort the opening for
            # the others; registered at once, so that bridge close and fork know about it.
            opening = self._opening = asyncio.get_running_loop().create_task(self._create_pool())
            opening.add_done_callback(_retrieve)
            self._bridge._register(self)
        return await asyncio.shield(opening)

    async def _create_pool(self) -> asyncpg.Pool:
        try:
            pool: asyncpg.Pool = await asyncpg.create_pool(
                self._info.dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                connect=self._connect,
                **self._pool_options,
            )
        except BaseException:
            self._opening = None  # the next call tries again: a failed open is never cached
            raise
        if self._closed:  # closed while opening
            await pool.close()
            raise DatabaseClosedError(f"{self!r} was closed while its pool was being opened")
        self._pool = pool
        logger.debug("%r: pool open", self)
        return pool

    async def _connect(self, *args: Any, **kwargs: Any) -> asyncpg.Connection:
        """Every new pooled connection: asyncpg's connect, with failures made to say where and who."""
        try:
            return await self._user_connect(*args, **kwargs)
        except Exception as exc:
            raise ConnectError(self._connect_failure(exc)) from exc

    def _connect_failure(self, exc: Exception) -> str:
        if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
            hint = "check the user name and password in the DSN (LOOPBRIDGE_DSN / DATABASE_URL / dsn=)"
        elif isinstance(exc, asyncpg.InvalidCatalogNameError):
            hint = "the database does not exist: create it (createdb NAME) or fix the name in the DSN"
        elif isinstance(exc, asyncpg.CannotConnectNowError):
            hint = "the server is starting up or shutting down; try again in a moment"
        elif isinstance(exc, asyncpg.TooManyConnectionsError):
            hint = "the server has no connection slots left: lower max_size or raise max_connections"
        elif isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            hint = "the server did not answer in time: check host, port and network (or raise timeout=)"
        elif isinstance(exc, OSError):
            hint = "is PostgreSQL running there and accepting connections? check host and port in the DSN"
        else:
            hint = "check the DSN and the server's log"
        detail = redact(str(exc) or type(exc).__name__, *self._secrets)
        return f"could not connect to {self._info.describe()}: {type(exc).__name__}: {detail}. {hint}"

    async def _acquire(self) -> tuple[asyncpg.Pool, PoolConnectionProxy]:
        pool = self._pool or await self._get_pool()
        if self._closed:
            raise DatabaseClosedError(f"{self!r} is closed; create a new Database to keep querying")
        self._leased += 1
        try:
            if self._leased <= self._max_size:  # a connection is free or can be opened: no waiting
                con: PoolConnectionProxy = await pool.acquire()
            else:
                con = await self._acquire_waiting(pool)
        except BaseException:
            self._leased -= 1
            raise
        return pool, con

    async def _acquire_waiting(self, pool: asyncpg.Pool) -> PoolConnectionProxy:
        try:
            con: PoolConnectionProxy = await pool.acquire(timeout=self._pool_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            waiting = self._leased - self._max_size
            raise PoolTimeoutError(
                f"no connection became free within pool_timeout={self._pool_timeout:g} s: all "
                f"{self._max_size} connections of {self!r} were in use and {waiting} caller(s) waiting. "
                "Raise max_size, keep transactions short, or raise pool_timeout"
            ) from None
        return con

    async def _release(self, pool: asyncpg.Pool, con: PoolConnectionProxy) -> None:
        self._leased -= 1
        await pool.release(con)  # asyncpg shields the release: cancellation cannot leak the connection

    def _release_in_background(self, pool: asyncpg.Pool, con: PoolConnectionProxy) -> None:
        """Give *con* back without making the caller wait for it (called when another one is idle).

        asyncpg resets a connection on release with a query of its own (``RESET ALL``, ``UNLISTEN *``,
        ...): a second round trip to the server after the caller's statement. Once that statement
        succeeded, its result is final, so the caller gets it at once and the reset runs on the bridge
        loop meanwhile. The connection is not reused before its reset is done (it is back in the pool
        only then), a closing pool waits for it, and a failed reset is logged (asyncpg terminates that
        connection; the pool replaces it). Measured with ``SELECT 1`` at N=1 on a 2-core machine: the
        caller's latency drops by one round trip (see benchmarks/NOTES.md).
        """
        self._leased -= 1
        task = asyncio.get_running_loop().create_task(pool.release(con))
        self._releasing.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning(
                "%r: resetting a connection on its return to the pool failed; asyncpg closed it and the "
                "pool will open a new one",
                self,
                exc_info=task.exception(),
            )


class _Lease:
    """``async with _Lease(db) as con``: a pooled connection for the length of the block."""

    __slots__ = ("_con", "_db", "_pool")

    def __init__(self, db: Database) -> None:
        self._db = db

    async def __aenter__(self) -> PoolConnectionProxy:
        self._pool, self._con = await self._db._acquire()
        return self._con

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        # After an error the connection may be mid-cancellation or broken: hand it back before the
        # caller hears of it. Without another idle connection, the next call would have to open one
        # while this one resets: a sequential caller keeps reusing one connection instead.
        if exc_type is None and self._pool.get_idle_size():
            self._db._release_in_background(self._pool, self._con)
        else:
            await self._db._release(self._pool, self._con)


def _check_callable(fn: object) -> None:
    if not callable(fn):
        if inspect.iscoroutine(fn):
            fn.close()
        raise TypeError(
            f"Database.run() needs an async function that takes the connection first, not "
            f"{type(fn).__name__}; incorrect: db.run(work(conn)); correct: db.run(work, 42) with "
            "async def work(conn, n): ..."
        )


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Every waiter sees the error; this only keeps asyncio from logging "exception never retrieved"
    # when all of them were cancelled.
    if not task.cancelled():
        task.exception()


def _check_sizes(min_size: int, max_size: int, pool_timeout: float | None) -> None:
    if not isinstance(max_size, int) or max_size < 1:
        raise ConfigurationError(f"max_size must be a positive integer, not {max_size!r}")
    if not isinstance(min_size, int) or not 0 <= min_size <= max_size:
        raise ConfigurationError(
            f"min_size must be an integer from 0 to max_size={max_size}, not {min_size!r}"
        )
    if pool_timeout is not None and not pool_timeout > 0:
        raise ConfigurationError(
            f"pool_timeout must be a positive number of seconds or None, not {pool_timeout!r}"
        )


def _check_options(options: dict[str, Any]) -> None:
    for name in options:
        if name in _RESERVED_OPTIONS:
            raise ConfigurationError(
                f"Database does not take {name!r}: the pool always lives on the bridge loop"
                if name == "loop"
                else f"pass {name!r} as a keyword of Database itself"
            )
        if name not in _POOL_OPTIONS:
            close = difflib.get_close_matches(name, _POOL_OPTIONS, n=1)
            suggestion = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(
                f"unknown pool option {name!r}: Database passes options to asyncpg.create_pool and "
                f"asyncpg.connect{suggestion}"
            )
