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

**Every wait on the server is bounded here.** An acquire waits at most ``pool_timeout`` (for a free
connection, or for a new one to be made). The bounds cost the hot path nothing measurable: each wait
only enters itself, with its deadline, in a dict, and one check every :data:`TICK` seconds (only while
something waits) enforces them all (see :meth:`PoolSource._check_deadlines`), where a timer per wait
cost about 10 µs of CPU per call. A release waits at most ``round_trip_timeout`` for what asyncpg
does then, a cancellation still on its way to the server and the reset query: a connection that does not
answer in time (a half-open one: a NAT, firewall or load balancer that forgot it, a partition) is
terminated and its slot freed at once (:meth:`PoolSource.discard`, counted in ``stats().discarded``); the
pool opens a new one when it is needed. The first such connection of an episode replaces the pool's idle
connections too: whatever silenced one (a NAT, a load balancer, a partition) silenced them all. A slot
counts as in use until its connection is back in the pool or terminated, never as neither. New sockets
get TCP keepalive (``loopbridge._keepalive``).

Everything here runs on the bridge loop, except what says otherwise (``closed``, :meth:`stats` and the
repr, read from callers' threads).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import weakref
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from . import _asyncpg
from ._dead import DEAD_CONNECTION_RETRIES, died_in_acquire, discard, lost_connection
from ._dsn import DsnInfo, redact
from ._keepalive import Keepalive
from ._loop import (
    GRACE,
    ClosedWhenUnreachable,
    ForkSafeLock,
    Resource,
    closing_log_level,
    stranded_log_level,
)
from ._session_state import reset_always, reset_when_changed, unchanged
from ._within import within
from .errors import ConnectError, ConnectionLostError, DatabaseClosedError, PoolTimeoutError

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = [
    "DEFAULT_ROUND_TRIP_TIMEOUT",
    "ClosedSource",
    "Held",
    "Lease",
    "PoolSource",
    "Source",
    "connect_failure",
]

logger = logging.getLogger("loopbridge")

#: Seconds loopbridge waits for the server to answer a round trip of its own (the reset on release,
#: BEGIN, COMMIT, ROLLBACK, LISTEN, a heartbeat) before it takes the connection for dead.
DEFAULT_ROUND_TRIP_TIMEOUT = 5.0
#: Seconds between two checks of the deadlines of the acquires and releases in flight: how late, at
#: most, a bound is enforced.
TICK = 0.1
#: asyncpg's own reconnection to ``min_size`` (no caller waits for it) gets this many round trips'
#: worth of ``round_trip_timeout`` per connection attempt.
BACKGROUND_CONNECT_ROUND_TRIPS = 2


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

    def discard(self, why: str | None = None) -> None:
        """The session's state is unknown (a BEGIN or ROLLBACK interrupted), or (*why*) the server did
        not answer that in time: never pool it again."""

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

    @property
    def round_trip_timeout(self) -> float:
        """Seconds a round trip of loopbridge's own may go unanswered before the connection is taken for
        dead (see the module docstring)."""

    @property
    def transaction_timeout(self) -> float | None:
        """The default ``timeout=`` of a transaction block (None: unbounded)."""

    def lease(self) -> Lease: ...

    async def hold(self) -> Held: ...

    async def hold_apart(self) -> Held: ...

    def keep(self, resource: Resource) -> None:
        """Close *resource* (on the bridge loop) before the source closes; it holds a connection until
        then (a subscription)."""

    def forget(self, resource: Resource) -> None: ...

    def discard(self, con: PoolConnectionProxy, why: str | None = None) -> None:
        """Terminate *con* rather than pool it again (the server rolls back what it was in); *why*: it
        did not answer that in time (logged). Its slot is free at once."""

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
        round_trip_timeout: float = DEFAULT_ROUND_TRIP_TIMEOUT,
        transaction_timeout: float | None = None,
        keepalive: Keepalive | None = None,
        session_reset: str = "when_changed",
    ) -> None:
        self.info = info
        self._bridge = bridge
        self.min_size = min_size
        self.max_size = max_size
        self.pool_timeout = pool_timeout
        self._round_trip_timeout = round_trip_timeout
        self._transaction_timeout = transaction_timeout
        self._keepalive = keepalive
        self._session_reset = session_reset
        self._user_connect: Callable[..., Awaitable[asyncpg.Connection]] = pool_options.pop(
            "connect", asyncpg.connect
        )
        if keepalive is not None and self._user_connect is not asyncpg.connect:
            keepalive = keepalive.client_only()  # a connect of the caller's may not take settings
        self._pool_options = pool_options
        # The in-line release's test that a connection needs no reset; None (every release asyncpg's)
        # unless the reset is ours and only for connections whose session state may have changed.
        ours = "reset" not in pool_options and session_reset == "when_changed"
        self._clean: Callable[[Any], bool] | None = unchanged if ours else None
        self._secrets = secrets
        # Read from callers' threads (closed, stats(), repr): each a single attribute, written only on
        # the bridge loop, except closed, which close() sets first in the caller's thread.
        self.closed_flag = False
        self.pool: asyncpg.Pool | None = None
        self.leased = 0  # connections held, being acquired, or being given back (reset)
        self.discarded = 0  # connections terminated rather than pooled again (see discard)
        # Bridge-loop state.
        self._opening: asyncio.Task[asyncpg.Pool] | None = None
        self._releasing: dict[asyncio.Task[None], PoolConnectionProxy] = {}  # releases under way
        self._kept: set[Resource] = set()  # they hold a connection until closed: closed first
        # Connection attempts whose caller gave up, and the closes of the connections they made.
        self._orphans: set[asyncio.Future[Any]] = set()
        self._silent = False  # a connection went unanswered since a connection was last made
        # The bounded waits in flight, with the loop time each must end by (see _check_deadlines); and
        # those the check ended, for the wait itself to tell its caller why.
        self._acquiring: dict[asyncio.Task[Any], float] = {}
        self._giving_back: dict[PoolConnectionProxy, float] = {}
        self._overdue: set[object] = set()
        self._checking: asyncio.TimerHandle | None = None
        self._floor_failing = False  # asyncpg's background reconnection to min_size is failing

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
        round_trip_timeout: float = DEFAULT_ROUND_TRIP_TIMEOUT,
        transaction_timeout: float | None = None,
        keepalive: Keepalive | None = None,
        session_reset: str = "when_changed",
        **extra: Any,
    ) -> Self:
        """The open source of this class and configuration on *bridge*, or a new one; *user* (a facade)
        uses it until :meth:`let_go`. *extra*: a subclass's own options (a Database's replicas), part
        of its configuration too (:meth:`_sharing_key`).

        Databases of the same bridge and configuration share one pool: a notebook cell that makes its
        Database again (and whose previous result IPython's output history keeps alive) does not pile up
        pools, nor does code that makes a Database per request by mistake. Options are compared by
        value; functions and other unhashable values (``init=``, an ``ssl`` context) by identity.
        """
        key = (
            cls,
            info.dsn,
            min_size,
            max_size,
            pool_timeout,
            round_trip_timeout,
            transaction_timeout,
            keepalive,
            session_reset,
            _frozen(pool_options),
            cls._sharing_key(**extra),
        )
        with _shared_lock:
            sources = _shared.setdefault(bridge, weakref.WeakValueDictionary())
            source = sources.get(key)
            if not isinstance(source, cls) or source.closed_flag:
                source = cls(
                    info,
                    bridge,
                    min_size=min_size,
                    max_size=max_size,
                    pool_timeout=pool_timeout,
                    pool_options=dict(pool_options),
                    secrets=secrets,
                    round_trip_timeout=round_trip_timeout,
                    transaction_timeout=transaction_timeout,
                    keepalive=keepalive,
                    session_reset=session_reset,
                    **extra,
                )
                sources[key] = source
            source._users.add(user)
        return source

    @classmethod
    def _sharing_key(cls, **extra: Any) -> tuple[Any, ...]:
        """What of a subclass's own options (see :meth:`shared`) tells one configuration from another:
        nothing here, where there are none."""
        return ()

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

    @property
    def round_trip_timeout(self) -> float:
        return self._round_trip_timeout

    @property
    def transaction_timeout(self) -> float | None:
        return self._transaction_timeout

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

    def discard(self, con: PoolConnectionProxy, why: str | None = None) -> None:
        self.discarded += 1
        discard(con)
        if why is None:
            return
        if self._silent:  # the episode was said, and its idle connections replaced, already
            logger.debug("%r: the server did not answer %s either; terminated", self, why)
            return
        # The first silent connection of an episode (until a connection is made again). A NAT, firewall
        # or load balancer that forgets its flows, or a partition, silences every connection at once,
        # the idle ones too, which cannot tell until a call uses them (and waits for its timeout, or
        # for ever without one): replace them now. Cheap when the network is fine: they reconnect.
        self._silent = True
        idle = _asyncpg.idle_connections(self.pool) if self.pool is not None else []
        for connection in idle:
            connection.terminate()
        self.discarded += len(idle)
        logger.warning(
            "%r: the server did not answer %s within round_trip_timeout=%g s: the connection was terminated "
            "and its slot freed%s. A network that drops traffic, or a stuck server? (Said once, until a "
            "connection is made again.)",
            self,
            why,
            self._round_trip_timeout,
            f", and the {len(idle)} idle one(s) replaced too" if idle else "",
        )

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
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            if opening.cancelled() and self.closed_flag:  # the Database closed while it opened
                raise DatabaseClosedError(f"{self!r} was closed while its pool was being opened") from None
            raise

    async def _create_pool(self) -> asyncpg.Pool:
        try:
            pool: asyncpg.Pool = await asyncpg.create_pool(
                self.info.dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                # Not self._connect: the pool is reachable from the loop (its idle connections' timers),
                # and must not keep the source alive, or a source nobody holds would never be closed.
                connect=functools.partial(_connect_weakly, weakref.ref(self)),
                **self._reset_option(),
                **self._pool_options,
            )
            _asyncpg.check(pool)
            _asyncpg.quiet_floor_warnings()
        except BaseException:
            self._opening = None  # the next call tries again: a failed open is never cached
            raise
        if self.closed_flag:  # closed while opening
            await _close_pool(pool, self._round_trip_timeout)
            raise DatabaseClosedError(f"{self!r} was closed while its pool was being opened")
        self.pool = pool
        logger.debug("%r: pool open", self)
        return pool

    def _reset_option(self) -> dict[str, Any]:
        """asyncpg's ``reset=`` for the pool: a full reset only for a connection whose session state may
        have changed (``loopbridge._session_state``), or on every release; none of ours when the options
        name a reset of their own (``pgbouncer=True``'s, or the caller's)."""
        if "reset" in self._pool_options:
            return {}
        always = self._session_reset == "always"
        return {"reset": reset_always if always else reset_when_changed}

    async def _connect(self, *args: Any, **kwargs: Any) -> asyncpg.Connection:
        """Every new pooled connection: asyncpg's connect, never abandoned halfway.

        Cancelling ``asyncpg.connect()`` while its socket is being set up leaves a future whose error
        nobody retrieves (asyncio logs "Future exception was never retrieved: unexpected
        connection_lost() call"; found by the stress suite's short timeouts). So a caller that gives up
        leaves the attempt to finish on its own, and a connection it still makes is closed at once.
        """
        attempt = asyncio.ensure_future(self._connect_now(*args, **kwargs))
        # No caller waits for asyncpg's own reconnection to min_size, so no pool_timeout bounds it; it
        # holds a slot while it connects, and into a silent network it would hold it for asyncpg's
        # whole connect timeout (60 s), well after the network is back. Two round trips' worth.
        background = self.pool is not None and _asyncpg.restoring_floor(self.pool)
        bound = BACKGROUND_CONNECT_ROUND_TRIPS * self._round_trip_timeout if background else None
        try:
            async with within(bound) as limit:
                connection = await asyncio.shield(attempt)
        except asyncio.CancelledError:
            self._orphan(attempt)
            raise
        except (asyncio.TimeoutError, TimeoutError) as exc:
            if not limit.expired():
                raise
            self._orphan(attempt)
            error = ConnectError(connect_failure(self.info, exc, *self._secrets))
            self._floor_failed(error)
            raise error from None
        except ConnectError as exc:
            if background:
                self._floor_failed(exc)
            raise
        self._silent = False
        if self._floor_failing:
            self._floor_failing = False
            logger.info("%r: connecting works again", self)
        return connection

    def _orphan(self, attempt: asyncio.Future[asyncpg.Connection]) -> None:
        """Leave a connection attempt nobody waits for any more to finish on its own, and close what it
        makes (see :meth:`_connect`)."""
        self._orphans.add(attempt)
        attempt.add_done_callback(self._orphans.discard)
        attempt.add_done_callback(functools.partial(_close_made, weakref.ref(self)))

    def _floor_failed(self, exc: ConnectError) -> None:
        """asyncpg could not reconnect to keep ``min_size`` connections open, in the background (no call
        waits for it). It logs that with a traceback at every retry; this says it once per episode, in
        a line, and ``loopbridge._asyncpg`` keeps asyncpg's own quiet."""
        level = logging.DEBUG if self._floor_failing else logging.WARNING
        self._floor_failing = True
        logger.log(
            level,
            "%r: could not reopen min_size=%d connections in the background: %s. asyncpg retries with a "
            "growing delay; calls meanwhile connect on their own (said once, until connecting works again)",
            self,
            self.min_size,
            exc,
        )

    async def _connect_now(self, *args: Any, **kwargs: Any) -> asyncpg.Connection:
        """asyncpg's connect, with failures made to say where and who, and TCP keepalive on both sides
        of the new connection (see ``loopbridge._keepalive``)."""
        keepalive = self._keepalive
        attempt = kwargs
        if keepalive is not None and keepalive.on_server:  # the caller's own settings win
            attempt = {
                **kwargs,
                "server_settings": {**keepalive.server_settings(), **(kwargs.get("server_settings") or {})},
            }
        try:
            connection = await self._user_connect(*args, **attempt)
        except Exception as exc:
            if keepalive is not None and keepalive.refused(exc):
                self._keepalive = keepalive.client_only()
                logger.info(
                    "%r: the server (a pooler?) refuses keepalive settings at login; connecting without "
                    "them (the server's own keepalive settings apply)",
                    self,
                )
                return await self._connect_now(*args, **kwargs)
            raise ConnectError(connect_failure(self.info, exc, *self._secrets)) from exc
        if keepalive is not None:
            keepalive.apply(_asyncpg.socket_of(connection))
        return connection

    # -- connections --------------------------------------------------------------------------------

    async def acquire(self) -> tuple[asyncpg.Pool, PoolConnectionProxy]:
        """A connection of the pool, and the pool to give it back to.

        :raises PoolTimeoutError: if none became free, or could be made, within ``pool_timeout``.
        :raises ConnectionLostError: if connections kept dying as they were handed out.
        """
        pool = self.pool or await self.open()
        if self.closed_flag:
            raise DatabaseClosedError(f"{self!r} is closed; create a new Database to keep querying")
        for retry in range(DEAD_CONNECTION_RETRIES + 1):
            self.leased += 1
            try:
                con = await self._acquire_within(pool)
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

    async def _acquire_within(self, pool: asyncpg.Pool) -> PoolConnectionProxy:
        """``pool.acquire()`` within ``pool_timeout``, whatever it waits for: a connection to become
        free, or a new one to be made (and the pool's ``setup``). Bounded by :meth:`_check_deadlines`,
        which cancels the acquire when it is overdue, rather than with asyncpg's own ``timeout=`` (a
        task of its own, Python < 3.12) or a timer of its own (see the module docstring)."""
        if self.pool_timeout is None:
            con: PoolConnectionProxy = await pool.acquire()
            return con
        task = asyncio.current_task()
        assert task is not None
        self._acquiring[task] = asyncio.get_running_loop().time() + self.pool_timeout
        if self._checking is None:
            self._check_soon()
        try:
            return await pool.acquire()
        except asyncio.CancelledError:
            if task not in self._overdue or not _only_ours(task):
                raise
        finally:
            del self._acquiring[task]
            if self._overdue:
                self._overdue.discard(task)
        waiting = self.leased - self.max_size
        if waiting > 0:
            raise PoolTimeoutError(
                f"no connection became free within pool_timeout={self.pool_timeout:g} s: all "
                f"{self.max_size} connections of {self!r} were in use and {waiting} caller(s) waiting. "
                "Raise max_size, keep transactions short, or raise pool_timeout"
            )
        raise PoolTimeoutError(
            f"no connection to {self.info.describe()} could be made within pool_timeout="
            f"{self.pool_timeout:g} s: the server did not answer in time. Check the network between here "
            "and the server (or raise pool_timeout)"
        )

    async def release(self, pool: asyncpg.Pool, con: PoolConnectionProxy, bound: float | None = None) -> None:
        """Give *con* back to *pool* and wait until it is back (see :meth:`_start_release`). Never
        raises: a failed reset is logged (asyncpg has terminated that connection, and the pool replaces
        it). The release runs to its end even if the caller is cancelled meanwhile (it stops waiting)."""
        if self._give_back_at_once(con):
            return
        release = self._start_release(pool, con, bound)
        try:
            await asyncio.shield(release)
        except asyncio.CancelledError:
            raise
        except Exception:  # said by _released, which also retrieved it
            pass

    def _start_release(
        self, pool: asyncpg.Pool, con: PoolConnectionProxy, bound: float | None
    ) -> asyncio.Task[None]:
        """The one place a connection goes back to its pool: asyncpg's release (it waits for a
        cancellation still on its way to the server, then resets the connection), as a task of its own
        with a deadline, *bound* seconds away (default ``round_trip_timeout``).

        A task of its own: asyncpg shields its release, so cancellation cannot leak the connection, but
        an error it met alone, once its caller was cancelled, would be reported as never retrieved:
        :func:`_released` retrieves it, and frees the slot. Bounded by terminating the connection when
        it is overdue (:meth:`_check_deadlines`), never by cancelling asyncpg's release, for the same
        reason: terminated, the connection fails whatever asyncpg waits for at once, and the slot is
        free.
        """
        loop = asyncio.get_running_loop()
        self._giving_back[con] = loop.time() + (self._round_trip_timeout if bound is None else bound)
        if self._checking is None:
            self._check_soon()
        task = loop.create_task(pool.release(con))
        self._releasing[task] = con
        # Through a weak reference: the task is reachable from the loop, and a source nobody holds
        # any more must not stay alive until its last reset is done (see loopbridge._loop.Resources).
        task.add_done_callback(functools.partial(_released, weakref.ref(self)))
        return task

    def _check_soon(self) -> None:
        loop = asyncio.get_running_loop()
        self._checking = loop.call_at(loop.time() + TICK, self._check_deadlines)

    def _check_deadlines(self) -> None:
        """End the acquires and releases in flight that are past their deadline: an acquire is
        cancelled (it raises :class:`PoolTimeoutError`), a release's connection terminated (its slot is
        free). Runs every :data:`TICK` seconds while any is in flight, on the bridge loop."""
        self._checking = None
        now = asyncio.get_running_loop().time()
        for task, deadline in list(self._acquiring.items()):
            if deadline <= now and task not in self._overdue:
                self._overdue.add(task)
                task.cancel()
        for con, deadline in list(self._giving_back.items()):
            if deadline <= now and con not in self._overdue:
                self._overdue.add(con)
                self.discard(con, "the reset of a connection given back to the pool")
        if self._acquiring or self._giving_back:
            self._check_soon()

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
        if self._give_back_at_once(con):
            return True
        if pool.get_idle_size() == 0:
            return False
        self._start_release(pool, con, None)
        return True

    def _give_back_at_once(self, con: PoolConnectionProxy) -> bool:
        """Give *con* back in line, if it needs no reset: True if done.

        Most connections need none (``session_reset="when_changed"``: nothing sent on them could have
        changed their session state). asyncpg's release would still run as a task of its own, shielded,
        under a timeout, with no I/O to do: on a busy bridge loop that machinery cost more CPU than the
        query itself (profiled with py-spy, see docs/performance.md). Nothing to wait for, so no
        deadline either.
        """
        if self._clean is None or not _asyncpg.release_at_once(con, self._clean):
            return False
        self.leased -= 1
        return True

    def _released(self, task: asyncio.Task[None]) -> None:
        """A release is over: the connection is back in the pool, or terminated; either way its slot is
        free."""
        con = self._releasing.pop(task)
        del self._giving_back[con]
        self.leased -= 1
        overdue = bool(self._overdue) and con in self._overdue
        if overdue:
            self._overdue.discard(con)
        if not task.cancelled() and task.exception() is not None and not overdue:
            # The connection could not be reset for the next caller (it died, or asyncpg's protocol was
            # still unwinding a server error): asyncpg has terminated it and returned its slot, so
            # nothing leaks and the pool opens a new one. The call's own outcome stands. (An overdue
            # one failed because it was terminated under it: said when it was.)
            logger.debug(
                "%r: a connection failed its reset on release and was closed: %r", self, task.exception()
            )

    @property
    def releasing(self) -> int:
        """Connections being given back (reset), in the background after their call or not."""
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
        finish within *timeout* seconds, then their connections are terminated. The whole close takes
        *timeout* seconds at most, and a little more (GRACE) only to unwind what it cancelled, whatever
        the server does: silent, half-open, refusing, or still answering the pool's opening."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def left() -> float:
            return max(0.0, deadline - loop.time())

        self.closed_flag = True
        pool, opening = self.pool, self._opening
        self.pool = self._opening = None
        self._bridge._unregister(self)
        # The deadlines go on being checked while the close waits for calls in flight; they stop with
        # the last wait (_check_deadlines re-arms only while one is in flight).
        for resource in list(self._kept):  # subscriptions never end on their own
            await resource._aclose_on_bridge(left())
        if pool is None and opening is not None:  # closed while the pool was being created
            pool = await _stop_opening(opening, left())
        # Connection attempts still finishing, closed as soon as they are made: waited for a moment, then
        # cancelled (a silent server would keep them for asyncpg's whole connect timeout).
        await _end_tasks(self._orphans, min(left(), GRACE))
        if pool is None:
            return
        closing = asyncio.ensure_future(pool.close())
        level = stranded_log_level.get()
        if level is not None:  # the bridge is closing and serves nobody any more: see stranded_log_level
            # Once close() has begun, a connection ended below is not replaced to keep min_size: a
            # replacement still connecting when the loop stops would be left unclosed.
            await asyncio.sleep(0)
            await self._end_stranded_connections(pool, level, left())
        try:
            await asyncio.wait_for(closing, left())
        except (asyncio.TimeoutError, TimeoutError):
            # Calls still holding connections, or connections that do not answer their Terminate (a
            # graceful close waits for the server to hang up: a silent one never does). At interpreter
            # exit nobody can act on it any more: said at debug level, as for stranded connections.
            what = "still in use" if _asyncpg.held_connections(pool) else "not answering their close"
            logger.log(
                closing_log_level.get(),
                "%r: connections %s after %g s; terminating them",
                self,
                what,
                timeout,
            )
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
        if self._checking is not None:
            dropped.append(self._checking)
        self.pool = self._opening = None
        self._releasing = {}
        self._kept = set()
        self._acquiring, self._giving_back, self._overdue, self._checking = {}, {}, set(), None
        self.leased = 0
        return dropped

    # -- figures ------------------------------------------------------------------------------------

    def figures(self) -> tuple[int, int, int, int]:
        """``(size, idle, leased, discarded)`` now, from any thread."""
        pool = self.pool
        if pool is None:
            return 0, 0, self.leased, self.discarded
        return pool.get_size(), pool.get_idle_size(), self.leased, self.discarded


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

    def figures(self) -> tuple[int, int, int, int]:
        return 0, 0, 0, 0

    @property
    def round_trip_timeout(self) -> float:
        return self.was.round_trip_timeout

    @property
    def transaction_timeout(self) -> float | None:
        return self.was.transaction_timeout

    def discard(self, con: PoolConnectionProxy, why: str | None = None) -> None:
        self.was.discard(con, why)

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
            source.discard(con)
        # After an error the connection may be mid-cancellation or broken: hand it back before the
        # caller hears of it.
        if exc is None and source.release_in_background(self._pool, con):
            return
        # A failed reset never replaces the call's own outcome, whether a result already received (a
        # committed write must not be reported as failed) or the error that ended the call, which says
        # more than the failed reset (found by the stress suite: "InternalClientError: cannot switch to
        # state 15" replacing a timeout). release() logs it and does not raise.
        await source.release(self._pool, con)
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

    def discard(self, why: str | None = None) -> None:
        self._source.discard(self.con, why)

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


_shared_lock = ForkSafeLock()  # taken by any thread making or closing a Database
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


def _close_made(source: weakref.ref[PoolSource], attempt: asyncio.Future[asyncpg.Connection]) -> None:
    """An orphaned connection attempt is over: close the connection it made, if any.

    A callback rather than a task that awaits the attempt: a bridge that stops cancels every task, and
    a task cancelled just as the attempt succeeded (or before it first ran) would let go of a connection
    nobody closes, its socket left open when the loop closes. While the source is open the close is
    graceful (the server is told, and logs nothing), in a task its close waits for; the connection is
    terminated if that task fails, and at once once the source is closed (nothing waits any more)."""
    if attempt.cancelled() or attempt.exception() is not None:  # the error was its caller's, who has gone
        return
    connection = attempt.result()
    alive = source()
    if alive is None or alive.closed_flag:
        connection.terminate()
        return
    closing = asyncio.ensure_future(connection.close(timeout=GRACE))
    closing.add_done_callback(functools.partial(_terminate_unless_closed, connection))
    alive._orphans.add(closing)
    closing.add_done_callback(alive._orphans.discard)


def _terminate_unless_closed(connection: asyncpg.Connection, closing: asyncio.Future[None]) -> None:
    if closing.cancelled() or closing.exception() is not None:
        connection.terminate()


def _only_ours(task: asyncio.Task[Any]) -> bool:
    """Whether *task*'s cancellation was ours alone, and consume it (Python 3.11+ can tell: another
    cancellation at the same moment, the caller's, is then left to propagate)."""
    uncancel = getattr(task, "uncancel", None)
    return uncancel is None or uncancel() == 0


async def _close_pool(pool: asyncpg.Pool, timeout: float) -> None:
    """Close *pool* gracefully within *timeout* seconds, else terminate it: a graceful close waits for
    the server to hang up, which a silent one never does."""
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        pool.terminate()


async def _stop_opening(opening: asyncio.Task[asyncpg.Pool], timeout: float) -> asyncpg.Pool | None:
    """The pool an opening made within *timeout* seconds, or None: after that the opening is cancelled
    (asyncpg then terminates what it connected). Waited for, so that nothing of it is left to run, or
    to be destroyed pending, on a loop that stops."""
    await asyncio.wait((opening,), timeout=timeout)
    if not opening.done():
        opening.cancel()
        await asyncio.wait((opening,), timeout=GRACE)
    if not opening.done() or opening.cancelled() or opening.exception() is not None:
        return None  # it failed to open, or was closed while opening: nothing to close
    return opening.result()


async def _end_tasks(tasks: set[asyncio.Future[Any]], timeout: float) -> None:
    """Wait up to *timeout* seconds for *tasks*, then cancel what is left and let it unwind."""
    if not tasks:
        return
    await asyncio.wait(set(tasks), timeout=timeout)
    left = [task for task in tasks if not task.done()]
    for task in left:
        task.cancel()
    if left:
        await asyncio.wait(left, timeout=GRACE)


def _retrieve(task: asyncio.Future[Any]) -> None:
    # Every waiter sees the error; this only keeps asyncio from logging "exception never retrieved"
    # when all of them were cancelled.
    if not task.cancelled():
        task.exception()
