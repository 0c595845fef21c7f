"""Point-in-time figures about a bridge and a database, for dashboards, health checks and tests."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BridgeStats", "DatabaseStats", "ReplicaStats"]


@dataclass(frozen=True)
class BridgeStats:
    """A snapshot of :meth:`Bridge.stats() <loopbridge.Bridge.stats>`.

    Counters cover the bridge's current thread: they start again from zero in a forked child.
    """

    name: str
    running: bool
    calls_started: int
    """Calls that began running on the bridge loop."""
    calls_succeeded: int
    calls_failed: int
    """Calls that ended with an exception (timeouts and cancellations included)."""
    calls_in_flight: int
    loop_lag: float
    """Seconds: how late the bridge loop runs a scheduled callback right now (0 when idle and healthy)."""
    max_loop_lag: float
    """Seconds: the worst lag seen since the thread started."""
    blocked_episodes: int
    """Times the watchdog saw the loop blocked for longer than its threshold."""
    calls_submitted: int = 0
    """Calls handed to the bridge, whether they have started yet or still wait in its queue."""


@dataclass(frozen=True)
class DatabaseStats:
    """A snapshot of :meth:`Database.stats() <loopbridge.Database.stats>`.

    Read without crossing to the bridge loop (so it answers even when that loop is stuck): the figures
    are each current, not necessarily consistent with one another.
    """

    max_size: int
    """The pool's size: the most connections it opens."""
    size: int
    """Connections open now."""
    idle: int
    """Open connections that nobody holds."""
    in_use: int
    """Connections held by calls, transactions, streams and subscriptions (or being opened for them)."""
    waiting: int
    """Callers waiting for a connection because all ``max_size`` are in use."""
    calls_submitted: int
    """Calls handed to the bridge, whether they have started yet or still wait in its queue. This and
    the other ``calls_`` figures count every call on the Database's bridge, which other Databases may
    share."""
    calls_completed: int
    """Calls that finished, successfully or not."""
    calls_failed: int
    """Calls that ended with an exception (timeouts and cancellations included)."""
    calls_in_flight: int
    loop_lag: float
    """Seconds: how late the bridge loop runs a scheduled callback right now."""
    max_loop_lag: float
    """Seconds: the worst lag seen since the thread started."""
    discarded: int = 0
    """Connections loopbridge terminated instead of returning them to the pool: the server did not answer
    a round trip of its own within ``round_trip_timeout`` (a silent network), or the session's state
    was unknown (a BEGIN or ROLLBACK interrupted). Each slot was freed at once; the pool opens a new
    connection when one is needed."""
    replicas: tuple[ReplicaStats, ...] = ()
    """One entry per replica (``Database(replicas=...)``), in the order given; empty without replicas."""
    reads_on_primary: int = 0
    """Reads through ``db.read`` that the primary served: no replica had replayed the caller's writes in
    time, or none was healthy."""


@dataclass(frozen=True)
class ReplicaStats:
    """One replica in :attr:`DatabaseStats.replicas`: whether it serves reads, and why not."""

    dsn: str
    """Its DSN, the password replaced by ``***``."""
    state: str
    """``'healthy'`` (in the rotation), ``'unchecked'`` (not checked yet: no read has asked), ``'lagging'``
    (more than ``max_lag`` behind), ``'down'`` (unreachable, refusing connections, or a read failed on
    it), ``'not a standby'`` (promoted, or a primary), ``'other cluster'`` (another system identifier)
    or ``'not following'`` (it does not follow the current primary since a failover)."""
    reason: str
    """Why it is out of the rotation (empty when healthy)."""
    lag: float | None
    """Seconds it is behind the primary, to within half a second (None until measured, or while down)."""
    replay_lsn: str | None
    """How far it had replayed at its last check (``pg_last_wal_replay_lsn()``), or None."""
    reads: int
    """Reads through ``db.read`` it was chosen for."""
    size: int
    """Connections of its pool open now."""
    idle: int
    in_use: int
