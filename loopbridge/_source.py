"""The connection source: an asyncpg pool on the bridge loop, and the one way anything gets a connection.

:class:`PoolSource` owns the pool: it opens it on first use, hands out connections, takes them back,
retries a connection that died before anything was sent, keeps the secrets out of every message, and
closes the pool (and what holds connections of it) on the bridge loop. Everything above it, the
:class:`~loopbridge.Database` facade, transactions, row streams, LISTEN and COPY, depends only on the
:class:`Source` protocol below, never on the Database:

* :meth:`Source.lease` — a connection for one call (``async with source.lease() as con``);
* :meth:`Source.hold` — a connection held across calls (a transaction), used one step at a time;
* :meth:`Source.hold_apart` — a connection of its own, outside any transaction (a LISTEN).

The pytest plugin swaps a second implementation in, :class:`loopbridge._pin.PinnedSource`, which serves
every one of them from the connection holding a test's transaction; this one has no branch for it.

Everything here runs on the bridge loop, except what says otherwise (``closed``, :meth:`stats` and the
repr, read from callers' threads).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from . import _asyncpg
from ._dead import DEAD_CONNECTION_RETRIES, died_in_acquire, discard, lost_connection
from ._dsn import DsnInfo, redact
from ._loop import ClosedWhenUnreachable, Resource, stranded_log_level
from .errors import ConnectError, ConnectionLostError, DatabaseClosedError, PoolTimeoutError

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["ClosedSource", "Held", "Lease", "PoolSource", "Source", "connect_failure"]

logger = logging.getLogger("loopbridge")


class Lease(Protocol):
    """``async with lease as con``: a connection for one call.

    After the block failed with :class:`ConnectionLostError`, :attr:`unsent` says whether nothing that
    could change data had been sent on the connection, so that the call may run again on another one.
    """

    unsent: bool

    async def __aenter__(self) -> PoolConnectionProxy: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None: ...


class Held(Protocol):
    """A connection held across calls. Steps on it (a statement, BEGIN, COMMIT) take turns."""

    #: A BEGIN that finds the connection dead may take another one (False: there is no other).
    replaceable: bool

    @property
    def con(self) -> PoolConnectionProxy: ...

    def turn(self) -> Any:
        """``async with held.turn():`` the connection to ourselves for one step."""

    def gone(self) -> bool:
        """True once the connection is closed, or no longer ours."""

    def discard(self) -> None:
        """The session's state is unknown (a BEGIN or ROLLBACK interrupted): never pool it again."""

    async def release(self) -> None:
        """Give the connection back."""


class Source(Protocol):
    """Where transactions, streams, LISTEN and COPY get their connections."""

    @property
    def bridge(self) -> Bridge: ...

    @property
    def closed(self) -> bool: ...

    @property
    def command_timeout(self) -> float | None: ...

    def lease(self) -> Lease: ...

    async def hold(self) -> Held: ...

    async def hold_apart(self) -> Held: ...

    def keep(self, resource: Resource) -> None:
        """Close *resource* (on the bridge loop) before the source closes; it holds a connection until
        then (a subscription)."""

    def forget(self, resource: Resource) -> None: ...

    def redact(self, text: str) -> str:
        """*text* with every secret of the source's DSN and options replaced by ``***``."""

    def lost_message(self, exc: BaseException) -> str:
        """What :class:`ConnectionLostError` says when a plain call's connection died under it."""


class PoolSource(ClosedWhenUnreachable):
    """An asyncpg pool on the bridge loop, opened on first use.

    It is the resource the bridge closes (:class:`~loopbridge._loop.Resources`): when nothing refers to
    it any more (the Database facade and every transaction, stream and subscription of it are gone) it
    is closed on the bridge loop.
    """

    def __init__(
        self,
        info: DsnInfo,
        bridge: Bridge,
        *,
        min_size: int,
        max_size: int,
        pool_timeout: float | None,
        pool_options: dict[str, Any],
        secrets: tuple[str | None, ...],
    ) -> None:
        self.info = info
        self._bridge = bridge
        self.min_size = min_size
        self.max_size = max_size
        self.pool_timeout = pool_timeout
        self._user_connect: Callable[..., Awaitable[asyncpg.Connection]] = pool_options.pop(
            "connect", asyncpg.connect
        )
        self._pool_options = pool_options
        self._secrets = secrets
        # Read from callers' threads (closed, stats(), repr): each a single attribute, written only on
        # the bridge loop, except closed, which close() sets first in the caller's thread.
        self.closed_flag = False
        self.pool: asyncpg.Pool | None = None
        self.leased = 0  # connections held or being acquired
        # Bridge-loop state.
        self._opening: asyncio.Task[asyncpg.Pool] | None = None
        self._releasing: set[asyncio.Task[None]] = set()  # connections being reset after their call
        self._kept: set[Resource] = set()  # they hold a connection until closed: closed first
        self._orphans: set[asyncio.Task[None]] = set()  # connection attempts whose caller gave up

        self._users: weakref.WeakSet[object] = weakref.WeakSet()  # the facades using it, not closed

    @classmethod
    def shared(
        cls,
        user: object,
        info: DsnInfo,
        bridge: Bridge,
        *,
        min_size: int,
        max_size: int,
        pool_timeout: float | None,
        pool_options: dict[str, Any],
        secrets: tuple[str | None, ...],
    ) -> PoolSource:
        """The open source of this configuration on *bridge*, or a new one; *user* (a facade) uses it
        until :meth:`let_go`.

        Databases of the same bridge and configuration share one pool: a notebook cell that makes its
        Database again (and whose previous result IPython's output history keeps alive) does not pile up
        pools, nor does code that makes a Database per request by mistake. Options are compared by
        value; functions and other unhashable values (``init=``, an ``ssl`` context) by identity.
        """
        key = (info.dsn, min_size, max_size, pool_timeout, _frozen(pool_options))
        with _shared_lock:
            sources = _shared.setdefault(bridge, weakref.WeakValueDictionary())
            source = sources.get(key)
            if source is None or source.closed_flag:
                source = sources[key] = cls(
                    info,
                    bridge,
                    min_size=min_size,
                    max_size=max_size,
                    pool_timeout=pool_timeout,
                    pool_options=dict(pool_options),
                    secrets=secrets,
                )
            source._users.add(user)
        return source

    def let_go(self, user: object) -> bool:
        """*user* is done with the source; True if nobody uses it any more (close it then)."""
        with _shared_lock:
            self._users.discard(user)
            return len(self._users) == 0

    # -- Source -------------------------------------------------------------------------------------

    @property
    def bridge(self) -> Bridge:
        return self._bridge

    @property
    def closed(self) -> bool:
        return self.closed_flag

    @property
    def command_timeout(self) -> float | None:
        timeout: float | None = self._pool_options.get("command_timeout")
        return timeout

    def lease(self) -> _PoolLease:
        return _PoolLease(self)

    async def hold(self) -> _PoolHeld:
        pool, con = await self.acquire()
        return _PoolHeld(self, pool, con)

    hold_apart = hold

    def keep(self, resource: Resource) -> None:
        self._kept.add(resource)

    def forget(self, resource: Resource) -> None:
        self._kept.discard(resource)

    def redact(self, text: str) -> str:
        return redact(text, *self._secrets)

    def lost_message(self, exc: BaseException) -> str:
        detail = self.redact(str(exc) or type(exc).__name__)
        return (
            f"the connection to {self.info.describe()} was lost during the call: {type(exc).__name__}: "
            f"{detail}. A transaction that had not committed was rolled back; a single statement may "
            "have committed just before. The pool opens a new connection: retry (with unique keys for "
            "writes)"
        )

    def __repr__(self) -> str:
        state = "closed" if self.closed_flag else "open" if self.pool is not None else "not opened yet"
        return f"<Database {self.info.redacted!r} on bridge {self._bridge.name!r}, {state}>"

    # -- the pool -----------------------------------------------------------------------------------

    async def open(self) -> asyncpg.Pool:
        """The pool, created now if it is not open yet (every caller waits for one opening)."""
        pool = self.pool
        if pool is not None:
            return pool
        if self.closed_flag:
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
                self.info.dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                # Not self._connect: the pool is reachable from the loop (its idle connections' timers),
                # and must not keep the source alive, or a source nobody holds would never be closed.
                connect=functools.partial(_connect_weakly, weakref.ref(self)),
                **self._pool_options,
            )
            _asyncpg.check(pool)
        except BaseException:
            self._opening = None  # the next call tries again: a failed open is never cached
            raise
        if self.closed_flag:  # closed while opening
            await pool.close()
            raise DatabaseClosedError(f"{self!r} was closed while its pool was being opened")
        self.pool = pool
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
            raise ConnectError(connect_failure(self.info, exc, *self._secrets)) from exc

    # -- connections --------------------------------------------------------------------------------

    async def acquire(self) -> tuple[asyncpg.Pool, PoolConnectionProxy]:
        """A connection of the pool, and the pool to give it back to.

        :raises PoolTimeoutError: if none became free within ``pool_timeout``.
        :raises ConnectionLostError: if connections kept dying as they were handed out.
        """
        pool = self.pool or await self.open()
        if self.closed_flag:
            raise DatabaseClosedError(f"{self!r} is closed; create a new Database to keep querying")
        for retry in range(DEAD_CONNECTION_RETRIES + 1):
            self.leased += 1
            try:
                if self.leased <= self.max_size:  # a connection is free or can be opened: no waiting
                    con: PoolConnectionProxy = await pool.acquire()
                else:
                    con = await self._acquire_waiting(pool)
            except BaseException as exc:
                self.leased -= 1
                # A connection that died before it was handed out (its backend terminated as it was
                # being set up: "connection was closed during pool initialization", found by the stress
                # suite): nothing of the call was sent, so another connection may serve it.
                if not died_in_acquire(exc):
                    raise
                if retry == DEAD_CONNECTION_RETRIES:
                    raise ConnectionLostError(self.lost_message(exc)) from exc
                logger.debug("%r: a connection died while being acquired; acquiring another", self)
                continue
            return pool, con
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acquire_waiting(self, pool: asyncpg.Pool) -> PoolConnectionProxy:
        try:
            con: PoolConnectionProxy = await pool.acquire(timeout=self.pool_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            waiting = self.leased - self.max_size
            raise PoolTimeoutError(
                f"no connection became free within pool_timeout={self.pool_timeout:g} s: all "
                f"{self.max_size} connections of {self!r} were in use and {waiting} caller(s) waiting. "
                "Raise max_size, keep transactions short, or raise pool_timeout"
            ) from None
        return con

    async def release(self, pool: asyncpg.Pool, con: PoolConnectionProxy) -> None:
        """Give *con* back to *pool* (asyncpg resets it first)."""
        self.leased -= 1
        # asyncpg shields the release, so cancellation cannot leak the connection; but a release it had
        # to finish alone, once its caller was cancelled, fails unseen ("Task exception was never
        # retrieved") if the connection died meanwhile. Hold the release ourselves and retrieve that.
        release = asyncio.ensure_future(pool.release(con))
        try:
            await asyncio.shield(release)
        except asyncio.CancelledError:
            release.add_done_callback(_retrieve)
            raise

    def release_in_background(self, pool: asyncpg.Pool, con: PoolConnectionProxy) -> bool:
        """Give *con* back without making the caller wait for it, if another connection is idle; False
        (nothing done) otherwise.

        asyncpg resets a connection on release with a query of its own (``RESET ALL``, ``UNLISTEN *``,
        ...): a second round trip to the server after the caller's statement. Once that statement
        succeeded, its result is final, so the caller gets it at once and the reset runs on the bridge
        loop meanwhile. The connection is not reused before its reset is done (it is back in the pool
        only then), a closing pool waits for it, and a failed reset is logged at debug level (asyncpg
        terminates that connection; the pool replaces it). Without another idle connection the next
        call would have to open one while this one resets: a sequential caller keeps reusing one
        connection instead. Measured with ``SELECT 1`` at N=1 on a 2-core machine: the caller's latency
        drops by one round trip (see benchmarks/NOTES.md).
        """
        if pool.get_idle_size() == 0:
            return False
        self.leased -= 1
        task = asyncio.get_running_loop().create_task(pool.release(con))
        self._releasing.add(task)
        # Through a weak reference: the task is reachable from the loop, and a source nobody holds
        # any more must not stay alive until its last reset is done (see loopbridge._loop.Resources).
        task.add_done_callback(functools.partial(_released, weakref.ref(self)))
        return True

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # As in _PoolLease.__aexit__: asyncpg has terminated the connection and the pool opens a new
            # one.
            logger.debug(
                "%r: a connection failed its reset on release and was closed: %r", self, task.exception()
            )

    @property
    def releasing(self) -> int:
        """Connections being reset in the background after their call."""
        return len(self._releasing)

    # -- closing ------------------------------------------------------------------------------------

    def mark_closed(self) -> bool:
        """From any thread: refuse new calls from now on. True if a pool may exist on a running bridge
        and must be closed there."""
        was_closed, self.closed_flag = self.closed_flag, True
        return (
            not was_closed and (self.pool is not None or self._opening is not None) and self._bridge.running
        )

    async def _aclose_on_bridge(self, timeout: float) -> None:
        """Close the pool: what holds a connection until it is closed goes first, calls in flight may
        finish within *timeout* seconds, then their connections are terminated."""
        self.closed_flag = True
        pool, opening = self.pool, self._opening
        self.pool = self._opening = None
        self._bridge._unregister(self)
        for resource in list(self._kept):  # subscriptions never end on their own
            await resource._aclose_on_bridge(timeout)
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
        stranded = _asyncpg.held_connections(pool)
        if not stranded:
            return
        # A statement the shutdown cancelled may still have its cancel request on the way to the server.
        # Terminating the connection would cancel that request too, and the server, which notices a
        # closed socket only between statements, would run the statement to its end (pg_sleep(30)).
        cancelling = set().union(*(_asyncpg.pending_cancellations(con) for con in stranded))
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
        dropped: list[object] = [obj for obj in (self.pool, self._opening) if obj is not None]
        dropped.extend(self._releasing)
        for resource in self._kept:
            dropped.extend(resource._forget_after_fork())
        self.pool = self._opening = None
        self._releasing = set()
        self._kept = set()
        self.leased = 0
        return dropped

    # -- figures ------------------------------------------------------------------------------------

    def figures(self) -> tuple[int, int, int]:
        """``(size, idle, leased)`` now, from any thread."""
        pool = self.pool
        if pool is None:
            return 0, 0, self.leased
        return pool.get_size(), pool.get_idle_size(), self.leased


class ClosedSource:
    """The source of a Database facade that was closed while others share its pool: every call says it
    is closed, with no check on the hot path of the open ones."""

    def __init__(self, was: PoolSource) -> None:
        self.was = was

    @property
    def bridge(self) -> Bridge:
        return self.was.bridge

    @property
    def closed(self) -> bool:
        return True

    @property
    def command_timeout(self) -> float | None:
        return self.was.command_timeout

    @property
    def max_size(self) -> int:
        return self.was.max_size

    def _refuse(self) -> DatabaseClosedError:
        return DatabaseClosedError(f"{self!r} is closed; create a new Database to keep querying")

    def lease(self) -> Lease:
        raise self._refuse()

    async def hold(self) -> Held:
        raise self._refuse()

    hold_apart = hold

    async def open(self) -> asyncpg.Pool:
        raise self._refuse()

    def keep(self, resource: Resource) -> None:
        raise self._refuse()

    def forget(self, resource: Resource) -> None:
        pass

    def redact(self, text: str) -> str:
        return self.was.redact(text)

    def lost_message(self, exc: BaseException) -> str:
        return self.was.lost_message(exc)

    def figures(self) -> tuple[int, int, int]:
        return 0, 0, 0

    def mark_closed(self) -> bool:
        return False

    async def _aclose_on_bridge(self, timeout: float) -> None:
        pass

    def __repr__(self) -> str:
        return f"<Database {self.was.info.redacted!r} on bridge {self.bridge.name!r}, closed>"


class _PoolLease:
    """``async with source.lease() as con``: a pooled connection for the length of the block.

    If the block fails because the connection died, the caller gets :class:`ConnectionLostError`
    (asyncpg's error as its cause), and :attr:`unsent` says whether nothing that could change data had
    been sent on it yet.
    """

    __slots__ = ("_con", "_pool", "_protocol", "_sent", "_source", "unsent")

    def __init__(self, source: PoolSource) -> None:
        self._source = source
        self.unsent = False

    async def __aenter__(self) -> PoolConnectionProxy:
        self._pool, self._con = await self._source.acquire()
        # Kept for __aexit__: the proxy is detached from a connection that closed. See loopbridge._dead.
        self._protocol = _asyncpg.protocol_of(self._con)
        self._sent = _asyncpg.sent_so_far(self._protocol)
        return self._con

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        source, con = self._source, self._con
        lost = exc is not None and lost_connection(exc, self._protocol)
        sent = _asyncpg.sent_so_far(self._protocol)
        if not lost and _in_transaction(con):
            # The call ended inside a transaction it had begun: its ROLLBACK failed or was cancelled (a
            # timeout), or it began one by hand and returned. Discard the connection instead of pooling
            # it: the server rolls back with the session (asyncpg's own reset would log an error).
            if exc is None:
                logger.warning(
                    "%r: a call returned with a transaction still open on its connection; the connection "
                    "was discarded and the transaction rolled back. Use conn.transaction() (or "
                    "db.transaction()) so that it ends with the call",
                    source,
                )
            discard(con)
        # After an error the connection may be mid-cancellation or broken: hand it back before the
        # caller hears of it.
        if exc is None and source.release_in_background(self._pool, con):
            return
        try:
            await source.release(self._pool, con)
        except Exception as error:
            # The connection could not be reset for the next caller (it died, or asyncpg's protocol was
            # still unwinding a server error): asyncpg has terminated it and returned its slot, so
            # nothing leaks and the pool opens a new one. The call's own outcome stands, whether a
            # result already received (a committed write must not be reported as failed) or the error
            # that ended the call, which says more than the failed reset (found by the stress suite:
            # "InternalClientError: cannot switch to state 15" replacing a timeout).
            logger.debug("%r: a connection failed its reset on release and was closed: %r", source, error)
        if lost:
            assert exc is not None
            self.unsent = sent is not None and sent == self._sent
            raise ConnectionLostError(source.lost_message(exc)) from exc


class _PoolHeld:
    """A pooled connection held across calls; one step at a time (asyncpg refuses concurrent operations
    on a connection, and a caller may share a transaction between tasks or threads)."""

    __slots__ = ("_lock", "_pool", "_source", "con")

    replaceable = True

    def __init__(self, source: PoolSource, pool: asyncpg.Pool, con: PoolConnectionProxy) -> None:
        self._source = source
        self._pool = pool
        self.con = con
        self._lock = asyncio.Lock()

    def turn(self) -> asyncio.Lock:
        return self._lock

    def gone(self) -> bool:
        try:
            return self.con.is_closed()
        except asyncpg.InterfaceError:  # asyncpg hands a connection that closed back to its pool at once
            return True

    def discard(self) -> None:
        discard(self.con)

    async def release(self) -> None:
        await self._source.release(self._pool, self.con)


def _in_transaction(con: PoolConnectionProxy) -> bool:
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


_shared_lock = threading.Lock()
#: The sources of each bridge by configuration, held weakly: a source nobody uses is closed and goes.
_shared: weakref.WeakKeyDictionary[Bridge, weakref.WeakValueDictionary[tuple[Any, ...], PoolSource]] = (
    weakref.WeakKeyDictionary()
)


def _frozen(value: Any) -> Any:
    """*value* as a hashable key: containers by value, anything else unhashable by identity."""
    if isinstance(value, dict):
        return tuple(sorted((key, _frozen(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    try:
        hash(value)
    except TypeError:
        return _Identity(value)
    return value


class _Identity:
    """An unhashable option, compared by identity (and kept alive by the key that holds it)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


def _released(source: weakref.ref[PoolSource], task: asyncio.Task[None]) -> None:
    alive = source()
    if alive is not None:
        alive._released(task)
    elif not task.cancelled():
        task.exception()  # retrieved: the source, and whoever would have cared, are gone


async def _connect_weakly(source: weakref.ref[PoolSource], *args: Any, **kwargs: Any) -> asyncpg.Connection:
    """``PoolSource._connect`` for its pool, through a weak reference (see ``_create_pool``)."""
    alive = source()
    if alive is None:  # pragma: no cover - a pool outliving its source is being closed
        raise DatabaseClosedError("the Database of this pool was garbage collected")
    return await alive._connect(*args, **kwargs)


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
