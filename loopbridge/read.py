"""``db.read``: the read surface of a Database, routed to its replicas.

::

    db = Database("postgresql://app@primary/app", replicas=["postgresql://app@standby1/app"])
    db.execute("UPDATE users SET name = $1 WHERE id = $2", "Ada", 42)      # the primary
    db.read.fetchrow("SELECT name FROM users WHERE id = $1", 42)           # a replica: sees 'Ada'
    await db.read.afetch("SELECT * FROM users")                            # async code, any loop
    with db.read.transaction() as tx: ...                                  # read-only, on a replica
    for row in db.read.iterate("SELECT * FROM events"): ...                # streamed from a replica
    db.read.stale.fetch("SELECT count(*) FROM events")                     # any healthy replica

A read sees every write its caller made through ``db`` before it (the caller: the contextvars context
loopbridge carries into the bridge loop, i.e. a thread, an asyncio task, a request), or with
``Database(consistency="database")`` every write anybody made through it. ``db.read.stale`` drops that
promise for reads that accept data a little old (at most ``max_lag`` seconds). Where no healthy replica
has replayed the caller's writes within ``replica_wait`` seconds the primary serves the read. The routing
itself lives in ``loopbridge._replicas``; a Database without replicas reads on its primary.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from asyncpg.pool import PoolConnectionProxy

from ._queries import Queries
from ._replica_health import Replica
from ._replicas import ReplicatedSource
from ._source import Held, Lease, PoolSource, Source
from ._stream import StreamMethods
from ._twins import twins
from ._written import callers_writes
from .errors import ConnectError, ConnectionLostError, PoolTimeoutError
from .transaction import Transaction, _Core

if TYPE_CHECKING:
    from ._loop import Resource
    from ._pin import PinnedSource
    from ._source import ClosedSource
    from .bridge import Bridge

__all__ = ["Reader"]

# What the Database has and db.read has not: statements that write (or may: run's function).
_WRITES = frozenset(
    {"execute", "executemany", "run", "copy_records_to_table", "copy_to_table", "copy_from_query"}
    | {"copy_from_table", "listen"}
)


class _Primary(Protocol):
    """What ``db.read`` needs of its Database: the source its calls go through now (it may be swapped
    for a pinned or a closed one), and its bridge."""

    _source: PoolSource | PinnedSource | ClosedSource

    @property
    def bridge(self) -> Bridge: ...


class Reader(Queries, StreamMethods):
    """The read surface of a :class:`~loopbridge.Database`, served by its replicas: ``db.read``.

    ``fetch``, ``fetchrow``, ``fetchval`` (and their ``a``-twins), :meth:`iterate` and
    :meth:`transaction` (read-only), for sync callers and async callers on any loop, as on the Database
    itself. Without replicas the primary serves them. Only reads belong here: on a replica a write
    fails with asyncpg's ``ReadOnlySQLTransactionError``, and a write the primary serves in a replica's
    place is not counted for read-your-writes.

    A read on a replica that fails because the replica did (it went down, refused the connection, lost
    it mid-statement) runs again on another replica or the primary; a transaction or a stream already
    under way cannot move, and fails with :class:`~loopbridge.ConnectionLostError`.
    """

    __slots__ = ("_db", "_stale")

    def __init__(self, db: _Primary, *, stale: bool = False) -> None:
        self._db = db
        self._stale = stale
        if not stale and isinstance(db._source, ReplicatedSource):
            # On the caller's side, before any read crosses to the bridge: the caller's context gets
            # the object its writes will be counted in (see loopbridge._written).
            callers_writes()

    @property
    def bridge(self) -> Bridge:
        return self._db.bridge

    @property
    def stale(self) -> Reader:
        """The same reads, served by any healthy replica without waiting for the caller's writes: for
        reads that accept data up to ``max_lag`` seconds old (dashboards, counts, search)."""
        return Reader(self._db, stale=True)

    def __repr__(self) -> str:
        kind = "stale reads" if self._stale else "reads"
        return f"<{kind} of {self._db!r}>"

    def __getattr__(self, name: str) -> Any:
        # Only for names that do not exist: a write says where writes go.
        if name.lstrip("a") in _WRITES:
            raise AttributeError(
                f"db.read has no {name}(): it serves reads on a replica, which refuses writes. Write through "
                f"the Database itself: db.{name}(...) runs on the primary, and the reads after it see it",
                name=name,
                obj=self,
            )
        return super().__getattr__(name)

    def _source(self) -> Source:
        source = self._db._source
        if isinstance(source, ReplicatedSource):
            return ReadSource(source, self._stale)
        # No replicas, or pinned by the pytest plugin (a test's rolled-back transaction, which a replica
        # cannot see): the primary's own connection.
        return source

    # -- statements: one implementation each (loopbridge._queries), on a replica ---------------------

    def _lease(self, *, callers_code: bool = False) -> Lease:
        source = self._db._source
        if isinstance(source, ReplicatedSource):
            return ReadLease(source, self._stale)
        return source.lease()

    @property
    def _command_timeout(self) -> float | None:
        return self._db._source.command_timeout

    fetch, afetch = twins(Queries._fetch, owner="Reader")
    fetchrow, afetchrow = twins(Queries._fetchrow, owner="Reader")
    fetchval, afetchval = twins(Queries._fetchval, owner="Reader")

    def transaction(self, *, isolation: str | None = None, deferrable: bool = False) -> Transaction:
        """A read-only transaction on one replica for a block: ``with db.read.transaction() as tx:`` (or
        ``async with``), every statement of it seeing one snapshot. It begins on a replica that has
        replayed the caller's writes (else the primary), like a single read.

        :param isolation: ``'read_committed'`` or ``'repeatable_read'`` (a standby refuses
            ``'serializable'``); None: the server's default.
        :raises ConfigurationError: for an unknown isolation level.
        """
        return Transaction(self._source(), isolation=isolation, readonly=True, deferrable=deferrable)

    def _streaming_transaction(self) -> tuple[_Core, bool]:
        # A stream declares its cursor in a read-only transaction of its own, on a replica.
        return Transaction(self._source(), readonly=True)._core, True


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

    @property
    def round_trip_timeout(self) -> float:
        return self.primary.round_trip_timeout

    @property
    def transaction_timeout(self) -> float | None:
        return self.primary.transaction_timeout

    def discard(self, con: PoolConnectionProxy, why: str | None = None) -> None:
        # A connection of a replica's pool or of the primary's: each pool terminates its own, and the
        # primary's discard is the one that counts it and says so.
        self.primary.discard(con, why)

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
