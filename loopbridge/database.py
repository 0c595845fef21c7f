"""Database: an asyncpg pool that lives only on the bridge loop, usable from every kind of caller.

The pool is created on the bridge loop, used there and closed there; callers never touch it. Sync code
calls ``db.fetch(...)`` and blocks; async code on any loop awaits ``db.afetch(...)``. Both are derived
from one implementation (see ``loopbridge._twins``), so they cannot drift apart.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ._call import invoke
from ._copy import CopyMethods
from ._dead import (
    DEAD_CONNECTION_RETRIES,
    died_in_acquire,
    discard,
    lost_connection,
    protocol_of,
    sent_so_far,
)
from ._dsn import DsnInfo, parse_dsn, redact, resolve_dsn
from ._loop import ClosedWhenUnreachable, Resource, stranded_log_level
from ._pgbouncer import transaction_pooling_options
from ._stream import StreamMethods
from ._twins import OpenClose, twins
from .bridge import Bridge, default_bridge
from .errors import (
    BridgeClosedError,
    CallTimeoutError,
    ConfigurationError,
    ConnectError,
    ConnectionLostError,
    DatabaseClosedError,
    LoopBridgeError,
    PoolTimeoutError,
)
from .listen import DEFAULT_QUEUE_SIZE, Subscription
from .stats import DatabaseStats
from .transaction import Transaction

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
# Database's own keywords, for "did you mean" when one is misspelled.
_OWN_OPTIONS = frozenset({"bridge", "min_size", "max_size", "pool_timeout"})


class Database(ClosedWhenUnreachable, OpenClose, CopyMethods, StreamMethods):
    """A PostgreSQL connection pool on a bridge, for sync and async callers alike.

    ::

        db = Database("postgresql://app@db:5432/app")
        rows = db.fetch("SELECT * FROM users WHERE id = $1", 42)          # sync code
        rows = await db.afetch("SELECT * FROM users WHERE id = $1", 42)   # async code, any loop

    The pool is created on the bridge loop on first use (or by :meth:`open`); results are asyncpg's own
    ``Record`` objects; asyncpg's exceptions reach the caller unchanged. Beyond single statements:
    :meth:`transaction`, streaming with :meth:`iterate`, COPY (:meth:`copy_records_to_table`,
    :meth:`copy_to_table`, :meth:`copy_from_query`, :meth:`copy_from_table`), :meth:`listen` and
    :meth:`stats`.

    :param dsn: ``postgresql://user:password@host:port/dbname`` (asyncpg's URL syntax, multi-host and
        query options included). Default: ``$LOOPBRIDGE_DSN``, then ``$DATABASE_URL``.
    :param bridge: the bridge the pool lives on; default :func:`~loopbridge.default_bridge`.
    :param min_size: connections opened when the pool is created and kept open.
    :param max_size: most connections open at once.
    :param pool_timeout: seconds a call may wait for a free connection before
        :class:`~loopbridge.PoolTimeoutError`; None waits forever.
    :param pgbouncer: the server is reached through PgBouncer (or another pooler) in transaction or
        statement pooling mode: no named prepared statements (``statement_cache_size=0``) and no
        session reset query on release. See ``loopbridge._pgbouncer`` for what stays unsupported there.
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
        pgbouncer: bool = False,
        **pool_options: Any,
    ) -> None:
        self._info: DsnInfo = parse_dsn(resolve_dsn(dsn))
        _check_sizes(min_size, max_size, pool_timeout)
        _check_options(pool_options)
        if pgbouncer:
            pool_options = transaction_pooling_options(pool_options)
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
        self._pinned: _Pin | None = None  # see _pin(): every call on one connection, for test fixtures
        # LISTEN subscriptions hold a connection until closed, so closing the Database ends them first.
        self._subscriptions: set[Resource] = set()
        self._orphans: set[asyncio.Task[None]] = set()  # connection attempts whose caller gave up

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
        :raises ConnectionLostError: if the connection died during the call.
        """
        result: list[asyncpg.Record] = await self._statement("fetch", query, args)
        return result

    async def _fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> asyncpg.Record | None:
        """Run *query* and return its first row, or None if it returned none."""
        result: asyncpg.Record | None = await self._statement("fetchrow", query, args)
        return result

    async def _fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        """Run *query* and return the value of *column* in its first row, or None if no row."""
        return await self._statement("fetchval", query, args, column=column)

    async def _execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        """Run a command and return its status (``'INSERT 0 1'``). Without *args*, *query* may hold
        several statements separated by semicolons."""
        result: str = await self._statement("execute", query, args)
        return result

    async def _executemany(
        self, command: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        """Run *command* once per argument tuple in *args*, atomically (one implicit transaction)."""
        await self._statement("executemany", command, (args,))

    async def _statement(self, method: str, query: str, args: tuple[Any, ...], **options: Any) -> Any:
        """``con.<method>(query, *args)`` on a pooled connection.

        A pooled connection can be dead before it is used: its backend was terminated while it sat idle
        and asyncpg has not seen the socket close yet. When the call fails that way before anything that
        could change data was sent (asyncpg counts what it sends), it is safe to run it again, on a fresh
        connection; otherwise the failure is the caller's :class:`ConnectionLostError`.
        """
        if not isinstance(query, str):
            raise TypeError(
                f"Database.{method}() takes the SQL as a str with $1, $2, ... placeholders, not "
                f"{type(query).__name__}; pass values as arguments: db.{method}('SELECT * FROM t WHERE id = "
                "$1', 42)"
            )
        for retry in range(DEAD_CONNECTION_RETRIES + 1):
            lease = _Lease(self)
            try:
                async with lease as con:
                    return await getattr(con, method)(query, *args, **options)
            except ConnectionLostError:
                if not lease.unsent or retry == DEAD_CONNECTION_RETRIES:
                    raise
                logger.debug("%r: a pooled connection was dead before use; retrying on another", self)
            except (asyncio.TimeoutError, TimeoutError) as exc:
                if isinstance(exc, LoopBridgeError):
                    raise
                # asyncpg's command_timeout: a bare TimeoutError without a word. Say what expired.
                raise CallTimeoutError(
                    f"Database.{method}(): the statement did not finish within command_timeout="
                    f"{self._pool_options.get('command_timeout')!r} s; asyncpg cancelled it on the server"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _run(self, fn: Callable[..., Awaitable[R]], *args: Any, timeout: float | None = None) -> R:
        """Call ``await fn(connection, *args)`` with a pooled asyncpg connection, on the bridge loop.

        The escape hatch for anything asyncpg can do (transactions, cursors, COPY, listeners, type
        codecs). The connection is only valid inside *fn*: do not keep it or pass it to another thread.
        """
        _check_callable(fn)
        async with _Lease(self) as con:
            result: R = await invoke("Database.run()", fn, (con, *args))
            return result

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

    # -- beyond single statements: transactions, LISTEN, stats (streams and COPY: the mixins) --------

    def transaction(
        self, *, isolation: str | None = None, readonly: bool = False, deferrable: bool = False
    ) -> Transaction:
        """A transaction for a ``with`` block: ``with db.transaction() as tx: tx.execute(...)``.

        It pins one connection on the bridge loop for the block, commits when the block ends normally
        and rolls back when it raises. See :class:`~loopbridge.Transaction`.

        :param isolation: ``'read_committed'``, ``'repeatable_read'``, ``'serializable'`` (or
            ``'read_uncommitted'``); None: the server's default.
        :raises ConfigurationError: for an unknown isolation level.
        """
        return Transaction(self, isolation=isolation, readonly=readonly, deferrable=deferrable)

    def atransaction(
        self, *, isolation: str | None = None, readonly: bool = False, deferrable: bool = False
    ) -> Transaction:
        """:meth:`transaction`, named for async code: ``async with db.atransaction() as tx:``, on any loop."""
        return Transaction(self, isolation=isolation, readonly=readonly, deferrable=deferrable)

    def listen(self, *channels: str, queue_size: int = DEFAULT_QUEUE_SIZE) -> Subscription:
        """LISTEN on *channels*; returns once LISTEN is in effect. See :class:`~loopbridge.Subscription`.

        :param queue_size: notifications held for a consumer that is behind; beyond it they are
            dropped, and a :class:`~loopbridge.Gap` marks where.
        :raises ConfigurationError: for no channel, or a bad *queue_size*.
        :raises ConnectError: if no connection could be made.
        """
        subscription = Subscription(self, channels, queue_size)
        subscription.__enter__()
        return subscription

    def alisten(self, *channels: str, queue_size: int = DEFAULT_QUEUE_SIZE) -> Subscription:
        """LISTEN for async code: ``async with db.alisten("jobs") as sub:`` (or ``async for``), on any
        loop. LISTEN begins when the block is entered (or at the first item asked for)."""
        return Subscription(self, channels, queue_size)

    def stats(self) -> DatabaseStats:
        """Pool and call figures, and the bridge loop's lag, now. Never blocks."""
        pool = self._pool
        size = pool.get_size() if pool is not None else 0
        idle = pool.get_idle_size() if pool is not None else 0
        leased = self._leased
        waiting = max(0, leased - self._max_size)
        bridge = self._bridge.stats()
        return DatabaseStats(
            max_size=self._max_size,
            size=size,
            idle=idle,
            in_use=leased - waiting,
            waiting=waiting,
            calls_submitted=bridge.calls_submitted,
            calls_completed=bridge.calls_succeeded + bridge.calls_failed,
            calls_failed=bridge.calls_failed,
            calls_in_flight=bridge.calls_in_flight,
            loop_lag=bridge.loop_lag,
            max_loop_lag=bridge.max_loop_lag,
        )

    def _lease(self) -> _Lease:
        return _Lease(self)

    def _streaming_transaction(self) -> tuple[Transaction, bool]:
        return Transaction(self), True

    # -- closing ------------------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Close the pool on the bridge loop: calls in flight may finish within *timeout* seconds, then
        their connections are terminated. Later calls raise :class:`DatabaseClosedError`. Safe to call
        twice. The bridge keeps running (other Databases may share it).

        :raises DeadlockError: if called on the bridge thread (await :meth:`aclose` there); the Database
            stays open, so a later close() still closes it.
        """
        # Before marking it closed: a close() that cannot run must not leave a pool nobody closes.
        self._bridge._refuse_blocking_call("Database.close()")
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
        for subscription in list(self._subscriptions):  # they never end on their own
            await subscription._aclose_on_bridge(timeout)
        if self._pinned is not None:  # give the pinned connection back first, or pool.close() waits for it
            await self._unpin(timeout)
        if self._orphans:  # connection attempts still finishing, to be closed as soon as they are made
            await asyncio.wait(set(self._orphans), timeout=timeout)
        if pool is None and opening is not None:  # closed while the pool was being created
            try:
                pool = await asyncio.shield(opening)
            except Exception:  # it failed to open: nothing to close
                return
        if pool is None:
            return
        closing = asyncio.ensure_future(pool.close())
        level = stranded_log_level.get()
        if level is not None:  # the bridge is closing and serves nobody any more: see stranded_log_level
            # Once close() has begun, a connection ended below is not replaced to keep min_size: a
            # replacement still connecting when the loop stops would be left unclosed.
            await asyncio.sleep(0)
            await self._end_stranded_connections(pool, level, timeout)
        try:
            await asyncio.wait_for(closing, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            logger.warning("%r: connections still in use after %g s; terminating them", self, timeout)
            pool.terminate()

    async def _end_stranded_connections(self, pool: asyncpg.Pool, level: int, timeout: float) -> None:
        """Terminate the connections still leased while the bridge closes with no call left running.

        Their holders (an open transaction or row stream) can never give them back: the bridge no longer
        takes the calls that would. Waiting for them would only delay the close by its whole timeout.
        Connections being reset after a finished call are back in a moment: those are waited for.
        """
        if self._releasing:
            await asyncio.wait(set(self._releasing), timeout=timeout)
        holders: list[Any] = getattr(pool, "_holders", [])  # asyncpg's own list; not in its stubs
        stranded = [
            holder._con
            for holder in holders
            if holder._in_use is not None and holder._con is not None and not holder._con.is_closed()
        ]
        if not stranded:
            return
        # A statement the shutdown cancelled may still have its cancel request on the way to the server.
        # Terminating the connection would cancel that request too, and the server, which notices a
        # closed socket only between statements, would run the statement to its end (pg_sleep(30)).
        cancelling = {task for con in stranded for task in con._cancellations}
        if cancelling:
            await asyncio.wait(cancelling, timeout=timeout)
        logger.log(
            level,
            "%r: %d connection(s) still held across calls (an open transaction or row stream) by callers "
            "the closing bridge no longer serves; terminating them (the server rolls their work back)",
            self,
            len(stranded),
        )
        for con in stranded:
            con.terminate()

    def _forget_after_fork(self) -> list[object]:
        dropped: list[object] = [obj for obj in (self._pool, self._opening, self._pinned) if obj is not None]
        dropped.extend(self._releasing)
        for subscription in self._subscriptions:
            dropped.extend(subscription._forget_after_fork())
        self._pool = self._opening = self._pinned = None
        self._releasing = set()
        self._subscriptions = set()
        self._leased = 0
        return dropped

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
                # Not self._connect: the pool is reachable from the loop (its idle connections' timers),
                # and must not keep the Database alive, or a Database nobody holds would never be closed.
                connect=functools.partial(_connect_weakly, weakref.ref(self)),
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
        """Every new pooled connection: asyncpg's connect, never abandoned halfway.

        Cancelling ``asyncpg.connect()`` while its socket is being set up leaves a future whose error
        nobody retrieves (asyncio logs "Future exception was never retrieved: unexpected
        connection_lost() call"; found by the stress suite's short timeouts). So a caller that gives up
        leaves the attempt to finish on its own, and a connection it still makes is closed at once.
        """
        attempt = asyncio.ensure_future(self._connect_now(*args, **kwargs))
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            orphan = asyncio.ensure_future(_close_when_made(attempt))
            self._orphans.add(orphan)
            orphan.add_done_callback(self._orphans.discard)
            raise

    async def _connect_now(self, *args: Any, **kwargs: Any) -> asyncpg.Connection:
        """asyncpg's connect, with failures made to say where and who."""
        try:
            return await self._user_connect(*args, **kwargs)
        except Exception as exc:
            raise ConnectError(connect_failure(self._info, exc, *self._secrets)) from exc

    def _connection_lost(self, exc: BaseException) -> str:
        detail = redact(str(exc) or type(exc).__name__, *self._secrets)
        return (
            f"the connection to {self._info.describe()} was lost during the call: {type(exc).__name__}: "
            f"{detail}. A transaction that had not committed was rolled back; a single statement may "
            "have committed just before. The pool opens a new connection: retry (with unique keys for "
            "writes)"
        )

    async def _acquire(self) -> tuple[asyncpg.Pool, PoolConnectionProxy]:
        pinned = self._pinned
        if pinned is not None and await self._enter_pin(pinned):
            return pinned.pool, pinned.con
        pool = self._pool or await self._get_pool()
        if self._closed:
            raise DatabaseClosedError(f"{self!r} is closed; create a new Database to keep querying")
        for retry in range(DEAD_CONNECTION_RETRIES + 1):
            self._leased += 1
            try:
                if self._leased <= self._max_size:  # a connection is free or can be opened: no waiting
                    con: PoolConnectionProxy = await pool.acquire()
                else:
                    con = await self._acquire_waiting(pool)
            except BaseException as exc:
                self._leased -= 1
                # A connection that died before it was handed out (its backend terminated as it was
                # being set up: "connection was closed during pool initialization", found by the stress
                # suite): nothing of the call was sent, so another connection may serve it.
                if not died_in_acquire(exc):
                    raise
                if retry == DEAD_CONNECTION_RETRIES:
                    raise ConnectionLostError(self._connection_lost(exc)) from exc
                logger.debug("%r: a connection died while being acquired; acquiring another", self)
                continue
            return pool, con
        raise AssertionError("unreachable")  # pragma: no cover

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
        pinned = self._pinned
        if pinned is not None and con is pinned.con:  # not the pool's to take back: pass the turn on
            if not pinned.leave():
                return
            self._pinned = None  # the last holder of a connection that _unpin gave up returns it
        self._leased -= 1
        # asyncpg shields the release, so cancellation cannot leak the connection; but a release it had
        # to finish alone, once its caller was cancelled, fails unseen ("Task exception was never
        # retrieved") if the connection died meanwhile. Hold the release ourselves and retrieve that.
        release = asyncio.ensure_future(pool.release(con))
        try:
            await asyncio.shield(release)
        except asyncio.CancelledError:
            release.add_done_callback(_retrieve)
            raise

    def _release_in_background(self, pool: asyncpg.Pool, con: PoolConnectionProxy) -> None:
        """Give *con* back without making the caller wait for it (called when another one is idle).

        asyncpg resets a connection on release with a query of its own (``RESET ALL``, ``UNLISTEN *``,
        ...): a second round trip to the server after the caller's statement. Once that statement
        succeeded, its result is final, so the caller gets it at once and the reset runs on the bridge
        loop meanwhile. The connection is not reused before its reset is done (it is back in the pool
        only then), a closing pool waits for it, and a failed reset is logged at debug level (asyncpg
        terminates that connection; the pool replaces it). Measured with ``SELECT 1`` at N=1 on a 2-core
        machine: the caller's latency drops by one round trip (see benchmarks/NOTES.md).
        """
        self._leased -= 1
        task = asyncio.get_running_loop().create_task(pool.release(con))
        self._releasing.add(task)
        # Through a weak reference: the task is reachable from the loop, and a Database nobody holds
        # any more must not stay alive until its last reset is done (see loopbridge._loop.Resources).
        task.add_done_callback(functools.partial(_released, weakref.ref(self)))

    def _may_release_in_background(self, pool: asyncpg.Pool, con: PoolConnectionProxy) -> bool:
        pinned = self._pinned
        if pinned is not None and con is pinned.con:  # not the pool's: _release passes the turn on
            return False
        return pool.get_idle_size() > 0

    def _released(self, task: asyncio.Task[None]) -> None:
        """A background release is done (see :meth:`_release_in_background`)."""
        self._releasing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # As in _Lease.__aexit__: asyncpg has terminated the connection and the pool opens a new one.
            logger.debug(
                "%r: a connection failed its reset on release and was closed: %r", self, task.exception()
            )

    # -- pinning: every call on one connection, for test fixtures -----------------------------------
    #
    # A test wrapped in a transaction that is rolled back at its end needs the code under test, which
    # uses the plain Database, to run on the connection holding that transaction. While pinned,
    # _acquire() hands that one connection to one task at a time, and _release() passes the turn on
    # instead of returning it to the pool. Everything that acquires through _acquire() follows, later
    # transactions included: asyncpg makes a transaction begun on a connection already in one a
    # savepoint. Private: loopbridge.contrib.pytest_plugin is the one user.

    async def _pin(self) -> PoolConnectionProxy:
        """From now on, until :meth:`_unpin`, every call uses one connection, taken from the pool now.

        Calls take turns on it (an ``asyncio.Lock`` on the bridge loop). The task whose turn it is may
        acquire again without waiting: ``db.arun(fn)`` whose *fn* awaits ``db.afetch(...)`` runs both on
        the connection, in one task (``arun`` on the bridge loop is a plain await).

        :raises RuntimeError: if the Database is already pinned.
        """
        self._check_not_pinned()
        pool, con = await self._acquire()
        try:
            self._check_not_pinned()  # pinned by another task while we waited for the connection?
        except RuntimeError:
            await self._release(pool, con)
            raise
        self._pinned = _Pin(pool, con)
        return con

    def _check_not_pinned(self) -> None:
        if self._pinned is not None:
            raise RuntimeError(f"{self!r} is already pinned to a connection; unpin it first")

    async def _unpin(self, timeout: float = 10.0) -> None:
        """Wait for the call holding the pinned connection, if any, then return it to the pool (which
        rolls back a transaction left open on it); calls waiting for a turn go to the pool instead.

        After *timeout* seconds the connection is terminated: whatever holds it fails, the server rolls
        its transaction back, and the holder returns it to the pool when it lets go. Safe to call twice.
        """
        pinned = self._pinned
        if pinned is None or pinned.gone:
            return
        pinned.gone = True  # no new turns
        try:
            await asyncio.wait_for(pinned.lock.acquire(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            logger.warning(
                "%r: the pinned connection is still in use after %g s; terminating it", self, timeout
            )
            pinned.orphaned = True
            pinned.con.terminate()
            return
        self._pinned = None
        pinned.lock.release()  # wakes the callers waiting for a turn: they see `gone`
        await self._release(pinned.pool, pinned.con)

    async def _enter_pin(self, pinned: _Pin) -> bool:
        """Take the pinned connection's turn; False if the Database is being unpinned."""
        task = asyncio.current_task()
        if task is not None and pinned.owner is task:  # re-entry by the task whose turn it is
            pinned.depth += 1
            return True
        if pinned.gone:
            return False
        try:
            await asyncio.wait_for(pinned.lock.acquire(), self._pool_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise PoolTimeoutError(
                f"{self!r} is pinned to one connection (a test's rolled-back transaction) and another "
                f"call held it for pool_timeout={self._pool_timeout:g} s. Calls on a pinned Database take "
                "turns: do not start concurrent calls from inside one (asyncio.gather inside db.run)"
            ) from None
        return pinned.begin(task)


class _Pin:
    """The one connection a pinned Database uses, and whose turn it is (see ``Database._pin``)."""

    __slots__ = ("con", "depth", "gone", "lock", "orphaned", "owner", "pool")

    def __init__(self, pool: asyncpg.Pool, con: PoolConnectionProxy) -> None:
        self.pool = pool
        self.con = con
        self.lock = asyncio.Lock()
        self.owner: asyncio.Task[Any] | None = None
        self.depth = 0  # acquisitions by the owner not yet released
        self.gone = False  # being unpinned: no new turns, callers use the pool
        self.orphaned = False  # _unpin gave up waiting: the last holder returns the connection

    def begin(self, task: asyncio.Task[Any] | None) -> bool:
        """With the lock just acquired: start *task*'s turn, or (if being unpinned) give the lock back
        and return False."""
        if self.gone:
            self.lock.release()
            return False
        self.owner, self.depth = task, 1
        return True

    def leave(self) -> bool:
        """End one acquisition; True if the caller must now return the connection to the pool."""
        # Not checked against the current task: a lease may end in another call than it began in (a
        # transaction held across calls), so turns are counted rather than owned.
        self.depth -= 1
        if self.depth > 0:
            return False
        self.owner = None
        self.lock.release()
        return self.orphaned


class _Lease:
    """``async with _Lease(db) as con``: a pooled connection for the length of the block.

    If the block fails because the connection died, the caller gets :class:`ConnectionLostError`
    (asyncpg's error as its cause), and :attr:`unsent` says whether nothing that could change data had
    been sent on it yet.
    """

    __slots__ = ("_con", "_db", "_pool", "_protocol", "_sent", "unsent")

    def __init__(self, db: Database) -> None:
        self._db = db
        self.unsent = False

    async def __aenter__(self) -> PoolConnectionProxy:
        self._pool, self._con = await self._db._acquire()
        # Kept for __aexit__: the proxy is detached from a connection that closed. See loopbridge._dead.
        self._protocol = protocol_of(self._con)
        self._sent = sent_so_far(self._con)
        return self._con

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        lost = exc is not None and lost_connection(exc, self._protocol)
        sent = sent_so_far(self._protocol)
        if not lost and _left_in_transaction(self._db, self._con):
            # The call ended inside a transaction it had begun: its ROLLBACK failed or was cancelled (a
            # timeout), or it began one by hand and returned. Discard the connection instead of pooling
            # it: the server rolls back with the session (asyncpg's own reset would log an error).
            if exc is None:
                logger.warning(
                    "%r: a call returned with a transaction still open on its connection; the connection "
                    "was discarded and the transaction rolled back. Use conn.transaction() (or "
                    "db.transaction()) so that it ends with the call",
                    self._db,
                )
            discard(self._con)
        # After an error the connection may be mid-cancellation or broken: hand it back before the
        # caller hears of it. Without another idle connection, the next call would have to open one
        # while this one resets: a sequential caller keeps reusing one connection instead.
        if exc is None and self._db._may_release_in_background(self._pool, self._con):
            self._db._release_in_background(self._pool, self._con)
            return
        try:
            await self._db._release(self._pool, self._con)
        except Exception as error:
            # The connection could not be reset for the next caller (it died, or asyncpg's protocol was
            # still unwinding a server error): asyncpg has terminated it and returned its slot, so
            # nothing leaks and the pool opens a new one. The call's own outcome stands, whether a
            # result already received (a committed write must not be reported as failed) or the error
            # that ended the call, which says more than the failed reset (found by the stress suite:
            # "InternalClientError: cannot switch to state 15" replacing a timeout).
            logger.debug("%r: a connection failed its reset on release and was closed: %r", self._db, error)
        if lost:
            assert exc is not None
            self.unsent = sent is not None and sent == self._sent
            raise ConnectionLostError(self._db._connection_lost(exc)) from exc


def _left_in_transaction(db: Database, con: PoolConnectionProxy) -> bool:
    """Is *con* (open, and not a pinned connection, which stays in its transaction on purpose) inside
    a transaction?"""
    pinned = db._pinned
    if pinned is not None and con is pinned.con:
        return False
    try:
        return not con.is_closed() and con.is_in_transaction()
    except (asyncpg.InterfaceError, AttributeError):  # released or aborted meanwhile
        return False


def connect_failure(info: DsnInfo, exc: Exception, *secrets: str | None) -> str:
    """What a :class:`ConnectError` says when asyncpg could not connect: where, as whom, why, and what
    to do. No password: *secrets* are scrubbed from asyncpg's message (the SQLAlchemy engine uses it too).
    """
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        hint = "check the user name and password in the DSN (LOOPBRIDGE_DSN / DATABASE_URL / dsn=)"
    elif isinstance(exc, asyncpg.InvalidCatalogNameError):
        hint = "the database does not exist: create it (createdb NAME) or fix the name in the DSN"
    elif isinstance(exc, asyncpg.CannotConnectNowError):
        hint = "the server is starting up or shutting down; try again in a moment"
    elif "unsupported startup parameter" in str(exc):
        hint = (
            "PgBouncer refuses this setting at login: drop it from the DSN and server_settings (set it "
            "per role: ALTER ROLE ... SET), or list it in PgBouncer's ignore_startup_parameters"
        )
    elif isinstance(exc, asyncpg.TooManyConnectionsError):
        hint = (
            "the server has no connection slots left: lower max_size (pool_size for an Engine) or raise "
            "max_connections"
        )
    elif isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        hint = "the server did not answer in time: check host, port and network (or raise timeout=)"
    elif isinstance(exc, OSError):
        hint = "is PostgreSQL running there and accepting connections? check host and port in the DSN"
    else:
        hint = "check the DSN and the server's log"
    detail = redact(str(exc) or type(exc).__name__, *secrets)
    return f"could not connect to {info.describe()}: {type(exc).__name__}: {detail}. {hint}"


def _check_callable(fn: object) -> None:
    if not callable(fn):
        if inspect.iscoroutine(fn):
            fn.close()
        raise TypeError(
            f"Database.run() needs an async function that takes the connection first, not "
            f"{type(fn).__name__}; incorrect: db.run(work(conn)); correct: db.run(work, 42) with "
            "async def work(conn, n): ..."
        )


def _released(database: weakref.ref[Database], task: asyncio.Task[None]) -> None:
    db = database()
    if db is not None:
        db._released(task)
    elif not task.cancelled():
        task.exception()  # retrieved: the Database, and whoever would have cared, are gone


async def _connect_weakly(database: weakref.ref[Database], *args: Any, **kwargs: Any) -> asyncpg.Connection:
    """``Database._connect`` for its pool, through a weak reference (see ``_create_pool``)."""
    db = database()
    if db is None:  # pragma: no cover - a pool outliving its Database is being closed
        raise DatabaseClosedError("the Database of this pool was garbage collected")
    return await db._connect(*args, **kwargs)


async def _close_when_made(attempt: asyncio.Future[asyncpg.Connection]) -> None:
    """Wait for a connection attempt nobody waits for any more, and close what it made."""
    try:
        connection = await attempt
    except BaseException:  # it failed: the error was its caller's, who has gone
        return
    try:
        await connection.close(timeout=5)
    except BaseException:  # closing failed or was cancelled: close() has aborted the connection
        connection.terminate()


def _retrieve(task: asyncio.Future[Any]) -> None:
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
    if pool_timeout is not None and (
        isinstance(pool_timeout, bool) or not isinstance(pool_timeout, (int, float)) or not pool_timeout > 0
    ):
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
            close = difflib.get_close_matches(name, _POOL_OPTIONS | _OWN_OPTIONS, n=1)
            suggestion = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(
                f"unknown pool option {name!r}: Database passes options to asyncpg.create_pool and "
                f"asyncpg.connect{suggestion}"
            )
