"""The health of a Database's replicas: a watcher per server on the bridge loop, and what it decides.

Part of :class:`loopbridge._replicas.ReplicatedSource` (which routes the reads; this is the mixin that
watches). On the bridge loop, once the first read asks:

* a **primary watcher** asks the primary for its WAL position (``pg_current_wal_lsn()``) every
  :data:`INTERVAL`: the samples that measure each replica's lag in seconds, and the primary's timeline,
  whose change says that a standby was promoted in its place (a failover);
* a **replica watcher** per replica, on a connection of its own, checks that the server is a standby of
  this primary (``pg_control_system()``'s system identifier, ``pg_is_in_recovery()``) and how far it
  has replayed (``pg_last_wal_replay_lsn()``), every :data:`INTERVAL`, or every :data:`FAST_POLL` while
  a read waits for it. A replica that is down, refuses connections, lags by more than ``max_lag``, was
  promoted, belongs to another cluster or does not follow the current primary leaves the rotation (a
  warning says why) and returns when it is healthy again (an info line).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import asyncpg

from ._dsn import DsnInfo
from ._source import Lease, PoolSource, connect_failure
from ._written import ticket
from .errors import ConnectError, DatabaseClosedError
from .stats import ReplicaStats

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = [
    "FAST_POLL",
    "INTERVAL",
    "PROBE_TIMEOUT",
    "Position",
    "Replica",
    "ReplicaHealth",
    "ReplicaState",
    "format_lsn",
    "parse_lsn",
    "watch_primary",
    "watch_replica",
]

logger = logging.getLogger("loopbridge")

#: Seconds between two health checks of the primary and of each replica.
INTERVAL = 0.5
#: Seconds between two checks of a replica's replay position while a read waits for it.
FAST_POLL = 0.001
#: Seconds a watcher's connection attempt, and each of its queries, may take.
PROBE_TIMEOUT = 5.0

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
        size, idle, leased, _ = self.source.figures()
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


class ReplicaHealth:
    """The watching half of a :class:`~loopbridge._replicas.ReplicatedSource` (a mixin: the routing
    half owns the state declared here, and provides what the watchers need of it)."""

    # The routing half's state, which the watchers read and update.
    replicas: list[Replica]
    max_lag: float
    closed_flag: bool
    _bridge: Bridge
    _started: bool
    _tasks: list[asyncio.Task[None]]
    _checked: asyncio.Event | None
    _samples: collections.deque[tuple[float, int]]
    _timeline: int | None
    _epoch: int
    _epoch_lsn: int
    _identifier: int | None
    _primary_problem: str | None
    _waiters: list[tuple[Any, asyncio.Future[Replica | None]]]

    def redact(self, text: str) -> str:
        raise NotImplementedError

    async def _fetch_position(self, stamp: int, *, sample: bool = False) -> Position:
        raise NotImplementedError

    def _serve_waiters(self) -> None:
        raise NotImplementedError

    def unrecorded_lease(self) -> Lease:
        """A connection of the primary for a question of loopbridge's own, not counted as a write."""
        raise NotImplementedError

    # -- watching -----------------------------------------------------------------------------------

    async def check_primary(self) -> None:
        """One health check of the primary: its identifier (once), its position (a lag sample)."""
        try:
            if self._identifier is None:
                async with self.unrecorded_lease() as con:
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

    def replica_stats(self) -> tuple[ReplicaStats, ...]:
        return tuple(replica.stats() for replica in self.replicas)


async def watch_primary(ref: weakref.ref[ReplicaHealth]) -> None:
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


async def watch_replica(ref: weakref.ref[ReplicaHealth], replica: Replica) -> None:
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
