"""Read replicas: the hot standbys behind ``db.read``, their health, and where each read goes.

A Database given ``replicas=[...]`` gets a :class:`ReplicatedSource` for its primary (swapped in at
construction: a Database without replicas keeps the plain :class:`~loopbridge._source.PoolSource`, and
its calls do no more work than before). It counts every call it serves as a write (see
``loopbridge._written``) and owns one pool per replica. On the bridge loop, once the first read asks:

* a **primary watcher** asks the primary for its WAL position (``pg_current_wal_lsn()``) every
  :data:`INTERVAL`: the samples that measure each replica's lag in seconds, and the primary's timeline,
  whose change says that a standby was promoted in its place (a failover);
* a **replica watcher** per replica, on a connection of its own, checks that the server is a standby of
  this primary (``pg_control_system()``'s system identifier, ``pg_is_in_recovery()``) and how far it
  has replayed (``pg_last_wal_replay_lsn()``), every :data:`INTERVAL`, or every :data:`FAST_POLL` while
  a read waits for it. A replica that is down, refuses connections, lags by more than ``max_lag``, was
  promoted, belongs to another cluster or does not follow the current primary leaves the rotation (a
  warning says why) and returns when it is healthy again (an info line).

Each read (:meth:`ReplicatedSource.route`) needs a WAL position: the primary's position as of the
caller's latest write (``consistency="caller"``), of anybody's (``"database"``), or none (a stale read).
The primary is asked only when a write newer than the position last asked for must be honoured, and
concurrent reads share one question. The read goes to a healthy replica that has replayed that far (the
one with fewest connections in use, in rotation), else waits up to ``replica_wait`` seconds for one to
get there, else goes to the primary. A replica that fails under a read is taken out at once and the read
runs again elsewhere: a statement on a standby cannot have changed anything.

Everything here runs on the bridge loop, except what says otherwise (stats and reprs).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import inspect
import logging
import time
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ._dsn import DsnInfo, parse_dsn
from ._source import Held, Lease, PoolSource, _frozen, _shared, _shared_lock, connect_failure
from ._written import RecordingSource, current_writes, ticket
from .errors import (
    ConfigurationError,
    ConnectError,
    ConnectionLostError,
    DatabaseClosedError,
    PoolTimeoutError,
)
from .stats import ReplicaStats

if TYPE_CHECKING:
    from ._loop import Resource
    from .bridge import Bridge

__all__ = [
    "CONSISTENCY",
    "Position",
    "ReadLease",
    "ReadSource",
    "Replica",
    "ReplicatedSource",
    "check_replicas",
    "format_lsn",
    "parse_lsn",
    "shared_replicated",
]

logger = logging.getLogger("loopbridge")

#: Seconds between two health checks of the primary and of each replica.
INTERVAL = 0.5
#: Seconds between two checks of a replica's replay position while a read waits for it.
FAST_POLL = 0.001
#: Seconds a watcher's connection attempt, and each of its queries, may take.
PROBE_TIMEOUT = 5.0

#: ``consistency=``: what a read through ``db.read`` sees of the writes made through ``db``.
CONSISTENCY = ("caller", "database")

ReplicaState = Literal[
    "unchecked", "healthy", "lagging", "down", "not a standby", "other cluster", "not following"
]

# The primary's write position, and its timeline (the first 8 hex digits of its WAL file's name).
_POSITION = "SELECT pg_current_wal_lsn()::text, pg_walfile_name(pg_current_wal_lsn())"
_IDENTITY = "SELECT system_identifier FROM pg_control_system()"
# received_tli: the timeline the standby streams (NULL unless the role may read pg_stat_wal_receiver
# in full, or while it does not stream).
_REPLAY = (
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, "
    "(SELECT received_tli FROM pg_stat_wal_receiver)"
)
_CONNECT_OPTIONS = frozenset(inspect.signature(asyncpg.connect).parameters) - {"dsn", "loop"}


class Position(NamedTuple):
    """A WAL position of the primary, and the epoch it belongs to: the epoch changes with the primary's
    timeline (a standby promoted in its place), and positions of two epochs do not compare."""

    epoch: int
    lsn: int


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` as an integer."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def check_replicas(
    primary: DsnInfo, replicas: object, consistency: object, max_lag: object, replica_wait: object
) -> list[DsnInfo]:
    """The replicas' DSNs, parsed.

    :raises ConfigurationError: for a malformed DSN, one that names the primary or another database,
        a duplicate, or a bad *consistency*, *max_lag* or *replica_wait*.
    """
    if isinstance(replicas, (str, bytes)) or not isinstance(replicas, Sequence):
        raise ConfigurationError(
            "replicas must be a list of DSNs, such as ['postgresql://app@standby1:5432/app'], not "
            f"{type(replicas).__name__}"
        )
    infos: list[DsnInfo] = []
    for index, dsn in enumerate(replicas):
        if not isinstance(dsn, str):
            raise ConfigurationError(f"replicas[{index}] must be a DSN string, not {type(dsn).__name__}")
        try:
            info = parse_dsn(dsn)
        except ConfigurationError as exc:
            raise ConfigurationError(f"replicas[{index}]: {exc}") from None
        places = set(zip(info.hosts, info.ports, strict=True))
        # A multi-host primary DSN lists the standbys it may fail over to, which may well be replicas
        # too (the one that is the primary now is taken out at run time); a single host is the primary.
        if len(primary.hosts) == 1 and places == set(zip(primary.hosts, primary.ports, strict=True)):
            raise ConfigurationError(
                f"replicas[{index}] ({info.redacted}) names the primary's server: a replica must be a hot "
                "standby of the primary; leave the primary out of replicas"
            )
        if info.database != primary.database:
            raise ConfigurationError(
                f"replicas[{index}] ({info.redacted}) is database {info.database!r}, the primary "
                f"{primary.database!r}: a replica serves the primary's database, from a standby of it"
            )
        for other in infos:
            if places & set(zip(other.hosts, other.ports, strict=True)):
                raise ConfigurationError(f"replicas[{index}] ({info.redacted}) is listed twice")
        infos.append(info)
    if consistency not in CONSISTENCY:
        raise ConfigurationError(
            f"consistency must be 'caller' (a read sees the writes its caller made before it) or "
            f"'database' (every write made before it), not {consistency!r}"
        )
    for name, value in (("max_lag", max_lag), ("replica_wait", replica_wait)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigurationError(f"{name} must be a number of seconds (0 or more), not {value!r}")
    return infos


def shared_replicated(
    user: object,
    info: DsnInfo,
    bridge: Bridge,
    *,
    replicas: Sequence[DsnInfo],
    consistency: str,
    max_lag: float,
    replica_wait: float,
    min_size: int,
    max_size: int,
    pool_timeout: float | None,
    pool_options: dict[str, Any],
    secrets: tuple[str | None, ...],
) -> ReplicatedSource:
    """The open :class:`ReplicatedSource` of this configuration on *bridge*, or a new one, as
    :meth:`PoolSource.shared <loopbridge._source.PoolSource.shared>` does for a Database without replicas
    (a notebook cell that makes its Database again does not pile up pools and watchers). Never the source
    of a Database without replicas, whose calls count nothing."""
    key = (
        "replicas",
        tuple(each.dsn for each in replicas),
        consistency,
        float(max_lag),
        float(replica_wait),
        info.dsn,
        min_size,
        max_size,
        pool_timeout,
        _frozen(pool_options),
    )
    with _shared_lock:
        sources = _shared.setdefault(bridge, weakref.WeakValueDictionary())
        source = sources.get(key)
        if not isinstance(source, ReplicatedSource) or source.closed_flag:
            source = ReplicatedSource(
                info,
                bridge,
                replicas=replicas,
                consistency=consistency,
                max_lag=max_lag,
                replica_wait=replica_wait,
                min_size=min_size,
                max_size=max_size,
                pool_timeout=pool_timeout,
                pool_options=dict(pool_options),
                secrets=secrets,
            )
            sources[key] = source
        source._users.add(user)
    return source


class Replica:
    """One standby: its pool, and what its watcher last saw. The figures are read from any thread."""

    def __init__(self, index: int, info: DsnInfo, source: PoolSource, options: dict[str, Any]) -> None:
        self.index = index
        self.info = info
        self.source = source
        self.name = ", ".join(f"{host}:{port}" for host, port in zip(info.hosts, info.ports, strict=True))
        self._options = options
        self.state: ReplicaState = "unchecked"
        self.reason = "not checked yet"
        self.replay = 0  # how far it had replayed at its last check
        self.lag: float | None = None
        self.reads = 0
        # Bridge-loop state.
        self.epoch = 0  # the primary's epoch it is known to follow (-1: one it does not follow)
        self.epoch_base = -1  # its replay position when the current epoch began
        self.timeline: int | None = None
        self.identified = False  # its system identifier was checked on the watcher's connection
        self.con: asyncpg.Connection | None = None
        self.wake: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<replica {self.name} {self.state}>"

    async def connect(self) -> asyncpg.Connection:
        """The watcher's own connection (not one of the pool's, which serve reads)."""
        options = {"timeout": PROBE_TIMEOUT, **self._options}
        try:
            return await asyncio.wait_for(
                self.source._user_connect(self.info.dsn, **options), PROBE_TIMEOUT + 1
            )
        except Exception as exc:
            raise ConnectError(connect_failure(self.info, exc, *self.source._secrets)) from exc

    async def disconnect(self) -> None:
        con, self.con, self.identified = self.con, None, False
        if con is not None:
            try:
                await asyncio.wait_for(con.close(), PROBE_TIMEOUT)
            except BaseException:  # closing failed or was cancelled: close() has aborted it
                con.terminate()

    def stats(self) -> ReplicaStats:
        size, idle, leased = self.source.figures()
        return ReplicaStats(
            dsn=self.info.redacted,
            state=self.state,
            reason=self.reason,
            lag=self.lag,
            replay_lsn=format_lsn(self.replay) if self.replay else None,
            reads=self.reads,
            size=size,
            idle=idle,
            in_use=leased,
        )


class ReplicatedSource(RecordingSource):
    """The primary of a Database with replicas: its pool, counting writes, and the replicas' routing."""

    def __init__(
        self,
        info: DsnInfo,
        bridge: Bridge,
        *,
        replicas: Sequence[DsnInfo],
        consistency: str,
        max_lag: float,
        replica_wait: float,
        min_size: int,
        max_size: int,
        pool_timeout: float | None,
        pool_options: dict[str, Any],
        secrets: tuple[str | None, ...],
    ) -> None:
        password = pool_options.get("password")
        everything = (*secrets, *(each.password for each in replicas))
        connect_options = {k: v for k, v in pool_options.items() if k in _CONNECT_OPTIONS and k != "connect"}
        self.replicas = [
            Replica(
                index,
                each,
                PoolSource(
                    each,
                    bridge,
                    min_size=min_size,
                    max_size=max_size,
                    pool_timeout=pool_timeout,
                    pool_options=dict(pool_options),
                    secrets=(each.password, password if isinstance(password, str) else None),
                ),
                connect_options,
            )
            for index, each in enumerate(replicas)
        ]
        super().__init__(
            info,
            bridge,
            min_size=min_size,
            max_size=max_size,
            pool_timeout=pool_timeout,
            pool_options=pool_options,
            secrets=everything,
        )
        self.consistency = consistency
        self.max_lag = float(max_lag)
        self.replica_wait = float(replica_wait)
        self.reads_on_primary = 0  # db.read calls served by the primary (read from any thread)
        # Bridge-loop state.
        self._started = False
        self._tasks: list[asyncio.Task[None]] = []
        self._checked: asyncio.Event | None = None  # set once every replica was checked once
        # Positions asked of the primary, oldest first: (the ticket each covers, the position). A read
        # that must honour writes up to ticket T takes the oldest one covering T.
        self._covered: collections.deque[tuple[int, Position]] = collections.deque(maxlen=64)
        self._asking: tuple[int, asyncio.Future[Position]] | None = None
        self._samples: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=int(2 * self.max_lag / INTERVAL) + 8
        )
        self._timeline: int | None = None
        self._epoch = 0
        self._epoch_lsn = 0
        self._identifier: int | None = None
        self._primary_problem: str | None = None
        self._waiters: list[tuple[Position | None, asyncio.Future[Replica | None]]] = []
        self._rotation = 0

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, {len(self.replicas)} replica(s)>"

    # -- routing a read -----------------------------------------------------------------------------

    async def route(self, stale: bool) -> Replica | None:
        """The replica to serve a read now, or None: the primary serves it.

        :param stale: any healthy replica will do (no read-your-writes).
        """
        if self.closed_flag:
            raise DatabaseClosedError(f"{self!r} is closed; create a new Database to keep querying")
        self._start()
        checked = self._checked
        assert checked is not None
        if not checked.is_set():
            # The very first reads give the watchers a moment to check the replicas, once: if the
            # primary cannot be reached yet, no replica can be verified, and later reads do not wait.
            try:
                await asyncio.wait_for(checked.wait(), self.replica_wait)
            except (asyncio.TimeoutError, TimeoutError):
                checked.set()
        target: Position | None = None
        if not stale:
            try:
                target = await self._target()
            except (asyncio.CancelledError, DatabaseClosedError):
                raise
            except Exception as exc:
                # Without the primary's position no replica can be proven recent enough: the primary
                # serves the read (or raises its own error, which says more than this one).
                logger.debug(
                    "%r: could not ask the primary for its WAL position (%s)", self, self.redact(repr(exc))
                )
                self._on_primary("the primary's WAL position is unknown")
                return None
        replica = self._pick(target)
        if replica is None and target is not None and self.replica_wait > 0 and self._any_serving():
            replica = await self._wait_for(target)
        if replica is None:
            if target is None or not self._any_serving():
                self._on_primary("no replica is healthy")
            else:
                self._on_primary(f"no healthy replica had replayed {format_lsn(target.lsn)} in time")
            return None
        replica.reads += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%r: read on replica %s (needs %s, replayed %s)",
                self,
                replica.name,
                "nothing" if target is None else format_lsn(target.lsn),
                format_lsn(replica.replay),
            )
        return replica

    def _on_primary(self, why: str) -> None:
        self.reads_on_primary += 1
        logger.debug("%r: read on the primary: %s", self, why)

    async def _target(self) -> Position:
        """The position a replica must have replayed for this read (in the call's context)."""
        needed = self.last_write
        if self.consistency == "caller":
            writes = current_writes()
            if writes is not None and writes.ticket < needed:
                needed = writes.ticket
        if needed == 0:  # nothing written through this Database yet
            return Position(self._epoch, 0)
        covered = self._covered
        if covered and covered[-1][0] >= needed:
            # The oldest position known to cover the write: a replica need not be more recent.
            index = bisect.bisect_left(covered, needed, key=lambda item: item[0])
            return covered[index][1]
        return await self._ask_position(needed)

    async def _ask_position(self, needed: int) -> Position:
        """The primary's position now, asked once for every read that needs one newer than *needed*."""
        asking = self._asking
        if asking is None or asking[0] < needed:
            stamp = ticket()  # every write with a smaller ticket completed before the question
            task = asyncio.get_running_loop().create_task(self._fetch_position(stamp))
            task.add_done_callback(_retrieve)
            asking = self._asking = (stamp, task)
        return await asyncio.shield(asking[1])

    async def _fetch_position(self, stamp: int, *, sample: bool = False) -> Position:
        try:
            async with PoolSource.lease(self) as con:  # not counted as a write
                row = await con.fetchrow(_POSITION, timeout=PROBE_TIMEOUT)
        finally:
            if self._asking is not None and self._asking[0] == stamp:
                self._asking = None
        assert row is not None
        lsn, timeline = parse_lsn(row[0]), int(row[1][:8], 16)
        if self._timeline is not None and timeline != self._timeline:
            self._new_epoch(timeline, lsn)
        self._timeline = timeline
        position = Position(self._epoch, lsn)
        if not self._covered or stamp > self._covered[-1][0]:
            self._covered.append((stamp, position))
        if sample:
            self._samples.append((time.monotonic(), lsn))
        return position

    def _new_epoch(self, timeline: int, lsn: int) -> None:
        """The primary's timeline changed: a standby was promoted in its place. A replica serves again
        once it is known to follow the new primary (see :meth:`_follows`)."""
        logger.warning(
            "%r: the primary is now on timeline %d (was %d): a standby was promoted. Replicas serve reads "
            "again once they follow the new primary",
            self,
            timeline,
            self._timeline,
        )
        self._epoch += 1
        self._epoch_lsn = lsn
        self._covered.clear()
        self._samples.clear()
        for replica in self.replicas:
            replica.epoch_base = replica.replay

    def _eligible(self, replica: Replica, target: Position | None) -> bool:
        if replica.state != "healthy" or replica.epoch != self._epoch:
            return False
        return target is None or (target.epoch == self._epoch and replica.replay >= target.lsn)

    def _pick(self, target: Position | None) -> Replica | None:
        eligible = [each for each in self.replicas if self._eligible(each, target)]
        if not eligible:
            return None
        count = len(self.replicas)
        rotation = self._rotation = (self._rotation + 1) % count
        return min(eligible, key=lambda each: (each.source.leased, (each.index - rotation) % count))

    def _any_serving(self) -> bool:
        return any(each.state == "healthy" and each.epoch == self._epoch for each in self.replicas)

    async def _wait_for(self, target: Position) -> Replica | None:
        """A replica once one has replayed up to *target*, or None after ``replica_wait`` seconds."""
        future: asyncio.Future[Replica | None] = asyncio.get_running_loop().create_future()
        waiter = (target, future)
        self._waiters.append(waiter)
        for replica in self.replicas:  # check now, and often until served
            if replica.wake is not None:
                replica.wake.set()
        try:
            return await asyncio.wait_for(future, self.replica_wait)
        except (asyncio.TimeoutError, TimeoutError):
            return None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _serve_waiters(self) -> None:
        for target, future in self._waiters:
            if not future.done():
                replica = self._pick(target)
                if replica is not None:
                    future.set_result(replica)

    def replica_failed(self, replica: Replica, exc: BaseException) -> None:
        """A read found *replica* failing: out of the rotation until its watcher sees it healthy."""
        self._set_state(replica, "down", f"a read failed on it: {type(exc).__name__}: {exc}")
        if replica.wake is not None:
            replica.wake.set()

    # -- watching -----------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._checked = asyncio.Event()
        # Closed with the bridge, or when nothing refers to it any more, even before its pool opens.
        self._bridge._register(self)
        loop = asyncio.get_running_loop()
        ref = weakref.ref(self)
        self._tasks.append(loop.create_task(_watch_primary(ref), name="loopbridge-primary-watcher"))
        self._tasks[-1].add_done_callback(_retrieve)
        for replica in self.replicas:
            replica.wake = asyncio.Event()
            name = f"loopbridge-replica-watcher-{replica.index}"
            self._tasks.append(loop.create_task(_watch_replica(ref, replica), name=name))
            self._tasks[-1].add_done_callback(_retrieve)

    async def check_primary(self) -> None:
        """One health check of the primary: its identifier (once), its position (a lag sample)."""
        try:
            if self._identifier is None:
                async with PoolSource.lease(self) as con:
                    self._identifier = await con.fetchval(_IDENTITY, timeout=PROBE_TIMEOUT)
            await self._fetch_position(ticket(), sample=True)
        except (asyncio.CancelledError, DatabaseClosedError):
            raise
        except Exception as exc:
            problem = self.redact(f"{type(exc).__name__}: {exc}")
            if problem != self._primary_problem:
                logger.debug("%r: checking the primary failed: %s", self, problem)
            self._primary_problem = problem
            return
        self._primary_problem = None
        for replica in self.replicas:
            if replica.state in ("healthy", "lagging", "not following"):
                self._assess(replica)
        self._serve_waiters()

    async def check_replica(self, replica: Replica) -> float:
        """One check of *replica*; returns how long to wait before the next."""
        try:
            if replica.con is None or replica.con.is_closed():
                replica.con = await replica.connect()
                replica.identified = False
            if not replica.identified:
                if self._identifier is None:
                    self._set_state(replica, "unchecked", "waiting to learn the primary's system identifier")
                    return INTERVAL
                identifier = await replica.con.fetchval(_IDENTITY, timeout=PROBE_TIMEOUT)
                if identifier != self._identifier:
                    self._set_state(
                        replica,
                        "other cluster",
                        f"its system identifier {identifier} differs from the primary's {self._identifier}: "
                        "it is not a standby of this primary. Fix the DSN in replicas",
                    )
                    return INTERVAL
                replica.identified = True
            row = await replica.con.fetchrow(_REPLAY, timeout=PROBE_TIMEOUT)
            assert row is not None
        except (asyncio.CancelledError, DatabaseClosedError):
            raise
        except Exception as exc:
            await replica.disconnect()
            detail = str(exc) if isinstance(exc, ConnectError) else f"{type(exc).__name__}: {exc}"
            self._set_state(replica, "down", detail)
            return INTERVAL
        in_recovery, replay, timeline = row
        if not in_recovery:
            was = replica.state in ("healthy", "lagging", "not following")
            why = (
                "it was promoted: it is a primary now"
                if was
                else "it is not a standby (pg_is_in_recovery() is false): the DSN names a primary"
            )
            self._set_state(replica, "not a standby", f"{why}; reads go to the other replicas")
            return INTERVAL
        replica.replay = parse_lsn(replay) if replay else 0
        replica.timeline = timeline
        self._assess(replica)
        self._serve_waiters()
        waiting = replica.state == "healthy" and any(not future.done() for _, future in self._waiters)
        return FAST_POLL if waiting else INTERVAL

    def _assess(self, replica: Replica) -> None:
        """Healthy, lagging or not following, from its last check and the primary's samples."""
        if not self._follows(replica):
            if replica.timeline is not None:
                why = f"it streams timeline {replica.timeline}, the primary is on {self._timeline}"
            else:
                why = (
                    "it has not replayed past the new primary's position "
                    f"{format_lsn(self._epoch_lsn)} since the failover"
                )
            self._set_state(replica, "not following", f"it does not follow the current primary: {why}")
            return
        lag = replica.lag = self._lag_of(replica.replay)
        if lag > self.max_lag:
            self._set_state(
                replica,
                "lagging",
                f"it is {lag:.1f} s behind the primary, more than max_lag={self.max_lag:g} s",
            )
        else:
            self._set_state(replica, "healthy", "")

    def _follows(self, replica: Replica) -> bool:
        """Whether *replica* holds the current primary's history (not a timeline that forked off it)."""
        if replica.timeline is not None and self._timeline is not None:
            follows = replica.timeline == self._timeline
        else:
            # Its timeline is not visible to this role: after a failover it must have replayed past the
            # position the new primary had when we saw it, and moved since (a standby left on a forked
            # timeline cannot move).
            follows = replica.epoch == self._epoch or (
                replica.replay >= self._epoch_lsn and replica.replay > replica.epoch_base
            )
        replica.epoch = self._epoch if follows else -1
        return follows

    def _lag_of(self, replay: int) -> float:
        """Seconds since the primary first had a position the replica has not replayed (0: none)."""
        now = time.monotonic()
        for at, lsn in self._samples:
            if lsn > replay:
                return max(0.0, now - at)
        return 0.0

    def _set_state(self, replica: Replica, state: ReplicaState, reason: str) -> None:
        reason = self.redact(reason)
        before = replica.state
        replica.state, replica.reason = state, reason
        if state == "healthy":
            if before != "healthy":
                level = logging.DEBUG if before == "unchecked" else logging.INFO
                logger.log(level, "%r: replica %s is back in the rotation", self, replica.name)
        elif state != before and state != "unchecked":
            replica.lag = None if state != "lagging" else replica.lag
            logger.warning("%r: replica %s left the rotation: %s", self, replica.name, reason)
        checked = self._checked
        if (
            checked is not None
            and not checked.is_set()
            and all(each.state != "unchecked" for each in self.replicas)
        ):
            checked.set()

    # -- stats, closing, fork -----------------------------------------------------------------------

    def replica_stats(self) -> tuple[ReplicaStats, ...]:
        return tuple(replica.stats() for replica in self.replicas)

    def mark_closed(self) -> bool:
        was_closed = self.closed_flag
        crossing = super().mark_closed()
        for replica in self.replicas:
            crossing = replica.source.mark_closed() or crossing
        return crossing or (not was_closed and self._started and self._bridge.running)

    async def _aclose_on_bridge(self, timeout: float) -> None:
        self.closed_flag = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for _, future in self._waiters:  # to the primary, which says it is closed
            if not future.done():
                future.set_result(None)
        for replica in self.replicas:
            await replica.disconnect()
        await asyncio.gather(
            super()._aclose_on_bridge(timeout),
            *(replica.source._aclose_on_bridge(timeout) for replica in self.replicas),
        )

    def _forget_after_fork(self) -> list[object]:
        dropped = super()._forget_after_fork()
        dropped.extend(self._tasks)
        dropped.extend(future for _, future in self._waiters)
        for replica in self.replicas:
            dropped.extend(replica.source._forget_after_fork())
            if replica.con is not None:
                dropped.append(replica.con)
            replica.con, replica.wake, replica.identified = None, None, False
            replica.state, replica.reason = "unchecked", "not checked yet"
        self._tasks, self._waiters, self._asking = [], [], None
        self._started, self._checked = False, None
        return dropped


async def _watch_primary(ref: weakref.ref[ReplicatedSource]) -> None:
    # Through a weak reference, dropped between checks: the task is reachable from the loop, and must
    # not keep a Database nobody holds any more alive (it is then closed, and this task with it).
    while True:
        source = ref()
        if source is None or source.closed_flag:
            return
        try:
            await source.check_primary()
        except DatabaseClosedError:  # closed during the check
            return
        del source
        await asyncio.sleep(INTERVAL)


async def _watch_replica(ref: weakref.ref[ReplicatedSource], replica: Replica) -> None:
    try:
        while True:
            source = ref()
            if source is None or source.closed_flag:
                return
            try:
                delay = await source.check_replica(replica)
            except DatabaseClosedError:  # closed during the check
                return
            del source
            wake = replica.wake
            if delay == FAST_POLL or wake is None:
                await asyncio.sleep(delay)
                continue
            try:
                await asyncio.wait_for(wake.wait(), delay)
            except (asyncio.TimeoutError, TimeoutError):
                pass
            wake.clear()
    finally:
        await replica.disconnect()


class ReadLease:
    """``async with lease as con``: a connection for one read, on the replica :meth:`route` chose or on
    the primary. A replica that fails to give a connection is taken out and another is chosen; one that
    fails during the read is taken out, and the read may run again elsewhere (:attr:`unsent`)."""

    __slots__ = ("_inner", "_primary", "_replica", "_stale", "unsent")

    def __init__(self, primary: ReplicatedSource, stale: bool) -> None:
        self._primary = primary
        self._stale = stale
        self._replica: Replica | None = None
        self._inner: Lease | None = None
        self.unsent = False

    async def __aenter__(self) -> PoolConnectionProxy:
        primary = self._primary
        for _ in range(len(primary.replicas) + 1):
            replica = await primary.route(self._stale)
            if replica is None:
                break
            inner = replica.source.lease()
            try:
                con = await inner.__aenter__()
            except (ConnectError, ConnectionLostError, PoolTimeoutError) as exc:
                primary.replica_failed(replica, exc)
                continue
            self._replica, self._inner = replica, inner
            return con
        self._replica, self._inner = None, PoolSource.lease(primary)  # not counted as a write
        return await self._inner.__aenter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        inner = self._inner
        assert inner is not None
        try:
            await inner.__aexit__(exc_type, exc, tb)
        except ConnectionLostError as lost:
            replica = self._replica
            if replica is None:
                self.unsent = inner.unsent
                raise
            # A standby refuses every write: whatever was sent changed nothing, so the read may run
            # again, on another replica or the primary.
            self._primary.replica_failed(replica, lost.__cause__ or lost)
            self.unsent = True
            raise


class ReadSource:
    """The :class:`~loopbridge._source.Source` of ``db.read``'s transactions and row streams: each one
    begins on the replica :meth:`ReplicatedSource.route` chose for it (or on the primary)."""

    def __init__(self, primary: ReplicatedSource, stale: bool) -> None:
        self.primary = primary
        self.stale = stale

    @property
    def bridge(self) -> Bridge:
        return self.primary.bridge

    @property
    def closed(self) -> bool:
        return self.primary.closed

    @property
    def command_timeout(self) -> float | None:
        return self.primary.command_timeout

    def lease(self) -> Lease:
        return ReadLease(self.primary, self.stale)

    async def hold(self) -> Held:
        primary = self.primary
        for _ in range(len(primary.replicas) + 1):
            replica = await primary.route(self.stale)
            if replica is None:
                break
            try:
                return await replica.source.hold()
            except (ConnectError, ConnectionLostError, PoolTimeoutError) as exc:
                primary.replica_failed(replica, exc)
        return await PoolSource.hold(primary)  # not counted as a write: a read-only transaction

    async def hold_apart(self) -> Held:
        return await self.primary.hold_apart()

    def keep(self, resource: Resource) -> None:
        self.primary.keep(resource)

    def forget(self, resource: Resource) -> None:
        self.primary.forget(resource)

    def redact(self, text: str) -> str:
        return self.primary.redact(text)

    def lost_message(self, exc: BaseException) -> str:
        return self.primary.lost_message(exc)

    def __repr__(self) -> str:
        return repr(self.primary)


def _retrieve(task: asyncio.Future[Any]) -> None:
    # Every read waiting for the position sees its error; this only keeps asyncio from logging "exception
    # never retrieved" when all of them were cancelled.
    if not task.cancelled():
        task.exception()
