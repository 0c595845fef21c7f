"""Read replicas: the hot standbys behind ``db.read``, and where each read goes.

A Database given ``replicas=[...]`` gets a :class:`ReplicatedSource` for its primary (swapped in at
construction: a Database without replicas keeps the plain :class:`~loopbridge._source.PoolSource`, and
its calls do no more work than before). It counts every call it serves as a write (see
``loopbridge._written``), owns one pool per replica, and watches their health
(``loopbridge._replica_health``).

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
from typing import TYPE_CHECKING, Any

import asyncpg

from ._dsn import DsnInfo, parse_dsn
from ._keepalive import Keepalive
from ._replica_health import (
    _POSITION,
    INTERVAL,
    PROBE_TIMEOUT,
    Position,
    Replica,
    ReplicaHealth,
    format_lsn,
    parse_lsn,
    watch_primary,
    watch_replica,
)
from ._source import DEFAULT_ROUND_TRIP_TIMEOUT, Lease, PoolSource
from ._written import RecordingSource, current_writes, ticket
from .errors import ConfigurationError, DatabaseClosedError

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["CONSISTENCY", "ReplicatedSource", "check_replicas"]

logger = logging.getLogger("loopbridge")

#: ``consistency=``: what a read through ``db.read`` sees of the writes made through ``db``.
CONSISTENCY = ("caller", "database")

_CONNECT_OPTIONS = frozenset(inspect.signature(asyncpg.connect).parameters) - {"dsn", "loop"}


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


class ReplicatedSource(RecordingSource, ReplicaHealth):
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
        round_trip_timeout: float = DEFAULT_ROUND_TRIP_TIMEOUT,
        transaction_timeout: float | None = None,
        keepalive: Keepalive | None = None,
        session_reset: str = "when_changed",
    ) -> None:
        password = pool_options.get("password")
        everything = (*secrets, *(secret for each in replicas for secret in each.secrets))
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
                    secrets=(*each.secrets, password if isinstance(password, str) else None),
                    round_trip_timeout=round_trip_timeout,
                    keepalive=keepalive,
                    session_reset=session_reset,
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
            round_trip_timeout=round_trip_timeout,
            transaction_timeout=transaction_timeout,
            keepalive=keepalive,
            session_reset=session_reset,
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

    @classmethod
    def _sharing_key(cls, **extra: Any) -> tuple[Any, ...]:
        """Databases share a primary's source only with the same replicas and routing too (a notebook
        cell that makes its Database again does not pile up pools and watchers); *extra* is this
        class's own keyword arguments."""
        replicas: Sequence[DsnInfo] = extra["replicas"]
        return (
            tuple(each.dsn for each in replicas),
            extra["consistency"],
            float(extra["max_lag"]),
            float(extra["replica_wait"]),
        )

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
            async with self.unrecorded_lease() as con:
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

    def unrecorded_lease(self) -> Lease:
        return PoolSource.lease(self)

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._checked = asyncio.Event()
        # Closed with the bridge, or when nothing refers to it any more, even before its pool opens.
        self._bridge._register(self)
        loop = asyncio.get_running_loop()
        ref = weakref.ref[ReplicaHealth](self)
        self._tasks.append(loop.create_task(watch_primary(ref), name="loopbridge-primary-watcher"))
        self._tasks[-1].add_done_callback(_retrieve)
        for replica in self.replicas:
            replica.wake = asyncio.Event()
            name = f"loopbridge-replica-watcher-{replica.index}"
            self._tasks.append(loop.create_task(watch_replica(ref, replica), name=name))
            self._tasks[-1].add_done_callback(_retrieve)

    # -- stats, closing, fork -----------------------------------------------------------------------

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


def _retrieve(task: asyncio.Future[Any]) -> None:
    # Every read waiting for the position sees its error; this only keeps asyncio from logging "exception
    # never retrieved" when all of them were cancelled.
    if not task.cancelled():
        task.exception()
