"""Database: the facade over a connection source on the bridge, for every kind of caller.

The pool is created on the bridge loop, used there and closed there (``loopbridge._source``); callers
never touch it. Sync code calls ``db.fetch(...)`` and blocks; async code on any loop awaits
``db.afetch(...)``. Both are derived from one implementation (``loopbridge._queries``, through
``loopbridge._twins``), which the Transaction shares, so they cannot drift apart.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any

import asyncpg

from ._closing import Closing
from ._copy import CopyMethods
from ._dsn import DsnInfo, parse_dsn, resolve_dsn
from ._keepalive import DEFAULT_IDLE as DEFAULT_KEEPALIVE
from ._keepalive import keepalive as check_keepalive
from ._limits import check_pool_options, pool_size, seconds
from ._pgbouncer import transaction_pooling_options
from ._pin import PinnedSource
from ._queries import Queries
from ._replicas import ReplicatedSource, check_replicas
from ._session_state import SESSION_RESETS
from ._source import DEFAULT_ROUND_TRIP_TIMEOUT, ClosedSource, Lease, PoolSource
from ._stream import StreamMethods
from ._twins import OpenClose, twins
from .bridge import Bridge, default_bridge
from .errors import ConfigurationError
from .listen import DEFAULT_HEARTBEAT, DEFAULT_QUEUE_SIZE, Subscription
from .read import Reader
from .stats import DatabaseStats
from .transaction import Transaction, _Core

__all__ = ["Database"]

logger = logging.getLogger("loopbridge")

# Options Database manages itself, and may not be passed through to asyncpg.
_RESERVED_OPTIONS = {"dsn", "loop", "min_size", "max_size"}


def _pass_through_options() -> frozenset[str]:
    names = set(inspect.signature(asyncpg.create_pool).parameters)
    names |= set(inspect.signature(asyncpg.connect).parameters)
    return frozenset(names - _RESERVED_OPTIONS - {"connect_kwargs"})


_POOL_OPTIONS = _pass_through_options()
# Database's own keywords, for "did you mean" when one is misspelled.
_OWN_OPTIONS = frozenset(
    {
        "bridge",
        "min_size",
        "max_size",
        "pool_timeout",
        "pgbouncer",
        "round_trip_timeout",
        "transaction_timeout",
        "keepalive",
        "session_reset",
        "replicas",
        "consistency",
        "max_lag",
        "replica_wait",
    }
)


class Database(Queries, Closing, OpenClose, CopyMethods, StreamMethods):
    """A PostgreSQL connection pool on a bridge, for sync and async callers alike.

    ::

        db = Database("postgresql://app@db:5432/app")
        rows = db.fetch("SELECT * FROM users WHERE id = $1", 42)          # sync code
        rows = await db.afetch("SELECT * FROM users WHERE id = $1", 42)   # async code, any loop

    The pool is created on the bridge loop on first use (or by :meth:`open`); results are asyncpg's own
    ``Record`` objects; asyncpg's exceptions reach the caller unchanged. Beyond single statements:
    :meth:`transaction`, streaming with :meth:`iterate`, COPY (:meth:`copy_records_to_table`,
    :meth:`copy_to_table`, :meth:`copy_from_query`, :meth:`copy_from_table`), :meth:`listen` and
    :meth:`stats`. ``with db:`` / ``async with db:`` open it and close it at the end of the block.

    :param dsn: ``postgresql://user:password@host:port/dbname`` (asyncpg's URL syntax, multi-host and
        query options included). Default: ``$LOOPBRIDGE_DSN``, then ``$DATABASE_URL``.
    :param bridge: the bridge the pool lives on; default :func:`~loopbridge.default_bridge`.
    :param min_size: connections opened when the pool is created and kept open.
    :param max_size: most connections open at once.
    :param pool_timeout: seconds a call may wait for a free connection before
        :class:`~loopbridge.PoolTimeoutError`; None waits forever.
    :param pgbouncer: the server is reached through PgBouncer (or another pooler) in transaction or
        statement pooling mode: no named prepared statements (``statement_cache_size=0``) and no
        session reset query on release. Session state (``SET``, ``LISTEN``, advisory locks) stays
        unavailable there.
    :param round_trip_timeout: seconds a round trip loopbridge makes on its own (the reset when a
        connection goes back to the pool, BEGIN, COMMIT, ROLLBACK, LISTEN, a subscription's
        heartbeat) may go unanswered: then the connection is terminated and its slot freed (counted in
        ``stats().discarded``).
    :param transaction_timeout: the default ``timeout=`` of :meth:`transaction` blocks (None: none).
    :param keepalive: seconds of silence before the kernel probes a connection (TCP keepalive, and
        ``TCP_USER_TIMEOUT`` at three times that; the server probes its side too); None: off.
    :param session_reset: ``'when_changed'``: a connection given back to the pool is reset only if its
        session state may have changed (a ``SET``, ``LISTEN``, a temporary table, ``db.run(fn)``...: see
        "What is reset" in the documentation), else it costs nothing; ``'always'``: the full reset on
        every release, a round trip each.
    :param replicas: DSNs of hot standbys of the primary, which serve :attr:`read` (each with a pool of
        its own, of the same sizes and options); ``db`` itself always uses the primary. See "Several
        hosts and replicas" in the documentation.
    :param consistency: what a read through :attr:`read` sees: ``'caller'``, every write its caller
        (thread, task, request) made through ``db`` before it; ``'database'``, every write anybody made
        through ``db`` before it.
    :param max_lag: seconds a replica may be behind the primary and still serve reads.
    :param replica_wait: seconds a read waits for a replica to replay the writes it must see before the
        primary serves it instead.
    :param pool_options: passed to ``asyncpg.create_pool`` / ``asyncpg.connect`` (``command_timeout``,
        ``statement_cache_size``, ``ssl``, ``server_settings``, ``init``, ``setup``, ``connect``, ...).
    :raises ConfigurationError: for a malformed DSN, no DSN at all, bad sizes or timeouts, an unknown
        or invalid option, or a replica DSN that is malformed or names the primary.
    """

    __slots__ = ("__weakref__", "_closing", "_info", "_source")

    def __init__(
        self,
        dsn: str | None = None,
        *,
        bridge: Bridge | None = None,
        min_size: int = 1,
        max_size: int = 10,
        pool_timeout: float | None = 30.0,
        pgbouncer: bool = False,
        round_trip_timeout: float = DEFAULT_ROUND_TRIP_TIMEOUT,
        transaction_timeout: float | None = None,
        keepalive: float | None = DEFAULT_KEEPALIVE,
        session_reset: str = "when_changed",
        replicas: Sequence[str] = (),
        consistency: str = "caller",
        max_lag: float = 5.0,
        replica_wait: float = 1.0,
        **pool_options: Any,
    ) -> None:
        info: DsnInfo = parse_dsn(resolve_dsn(dsn))
        min_size, max_size, pool_timeout = _check_sizes(min_size, max_size, pool_timeout)
        round_trip = seconds("round_trip_timeout", round_trip_timeout, allow_none=False)
        assert round_trip is not None
        probing = check_keepalive(keepalive)
        _check_options(pool_options)
        pool_options = check_pool_options(pool_options, min_size, max_size)
        standbys = check_replicas(info, replicas, consistency, max_lag, replica_wait)
        if pgbouncer:
            pool_options = transaction_pooling_options(pool_options)
            if probing is not None:  # PgBouncer refuses unknown startup parameters: its own apply
                probing = probing.client_only()
        password = pool_options.get("password")
        self._info = info
        settings: dict[str, Any] = {
            "min_size": min_size,
            "max_size": max_size,
            "pool_timeout": pool_timeout,
            "round_trip_timeout": round_trip,
            "transaction_timeout": seconds("transaction_timeout", transaction_timeout),
            "keepalive": probing,
            "session_reset": _check_session_reset(session_reset),
        }
        secrets = (*info.secrets, password if isinstance(password, str) else None)
        # Every call goes through the source; the pytest plugin swaps a pinned one in (loopbridge._pin),
        # and close() a closed one. With replicas, the primary's source also counts writes and routes
        # db.read (loopbridge._replicas).
        self._source: PoolSource | PinnedSource | ClosedSource
        if standbys:
            self._source = ReplicatedSource.shared(
                self,
                info,
                bridge if bridge is not None else default_bridge(),
                replicas=standbys,
                consistency=consistency,
                max_lag=max_lag,
                replica_wait=replica_wait,
                pool_options=pool_options,
                secrets=secrets,
                **settings,
            )
        else:
            self._source = PoolSource.shared(
                self,
                info,
                bridge if bridge is not None else default_bridge(),
                pool_options=pool_options,
                secrets=secrets,
                **settings,
            )

    # -- properties ---------------------------------------------------------------------------------

    @property
    def bridge(self) -> Bridge:
        """The bridge whose loop owns the pool."""
        return self._source.bridge

    @property
    def dsn(self) -> str:
        """The DSN with its password replaced by ``***``."""
        return self._info.redacted

    @property
    def closed(self) -> bool:
        return self._source.closed

    def __repr__(self) -> str:
        return repr(self._source)

    @property
    def read(self) -> Reader:
        """The read surface, served by the replicas: ``db.read.fetch(...)``, ``await
        db.read.afetch(...)``, ``db.read.iterate(...)``, ``db.read.transaction()`` (read-only). A read
        sees its caller's earlier writes through ``db`` (see ``consistency``); ``db.read.stale`` does
        not wait for them. Without replicas, the primary serves these reads. See
        :class:`~loopbridge.Reader`."""
        return Reader(self)

    # -- statements: one implementation each (loopbridge._queries), on a pooled connection ---------

    def _lease(self, *, callers_code: bool = False) -> Lease:
        return self._source.lease()

    @property
    def _command_timeout(self) -> float | None:
        return self._source.command_timeout

    async def _open(self) -> None:
        """Create the pool now (with its ``min_size`` connections) instead of on first use.

        :raises ConnectError: if the server cannot be reached or refuses the login.
        """
        await self._source.open()

    fetch, afetch = twins(Queries._fetch, owner="Database")
    fetchrow, afetchrow = twins(Queries._fetchrow, owner="Database")
    fetchval, afetchval = twins(Queries._fetchval, owner="Database")
    execute, aexecute = twins(Queries._execute, owner="Database")
    executemany, aexecutemany = twins(Queries._executemany, owner="Database")
    run, arun = twins(Queries._run, owner="Database")
    open, aopen = twins(_open)

    # -- beyond single statements: transactions, LISTEN, stats (streams and COPY: the mixins) --------

    def transaction(
        self,
        *,
        isolation: str | None = None,
        readonly: bool = False,
        deferrable: bool = False,
        timeout: float | None = None,
    ) -> Transaction:
        """A transaction for a block: ``with db.transaction() as tx: tx.execute(...)`` in sync code,
        ``async with db.transaction() as tx: await tx.aexecute(...)`` in async code, on any loop.

        It pins one connection on the bridge loop for the block, commits when the block ends normally
        and rolls back when it raises. See :class:`~loopbridge.Transaction`.

        :param isolation: ``'read_committed'``, ``'repeatable_read'``, ``'serializable'`` (or
            ``'read_uncommitted'``); None: the server's default.
        :param timeout: seconds for the whole block, from waiting for a connection to COMMIT; on expiry
            it is rolled back at once and :class:`~loopbridge.TransactionTimeoutError` raised. None: the
            Database's ``transaction_timeout``; ``float('inf')``: none.
        :raises ConfigurationError: for an unknown isolation level or a bad timeout.
        """
        return Transaction(
            self._source, isolation=isolation, readonly=readonly, deferrable=deferrable, timeout=timeout
        )

    def listen(
        self,
        *channels: str,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        heartbeat: float | None = DEFAULT_HEARTBEAT,
    ) -> Subscription:
        """LISTEN on *channels*: ``with db.listen("jobs") as sub:`` in sync code, ``async with
        db.listen("jobs") as sub:`` in async code, on any loop. LISTEN is in effect once the block is
        entered (or, without a block, at the first item asked for). See :class:`~loopbridge.Subscription`.

        :param queue_size: notifications held for a consumer that is behind; beyond it they are
            dropped, and a :class:`~loopbridge.Gap` marks where.
        :param heartbeat: seconds between round trips checking that the connection still answers; a
            silent one is noticed within ``heartbeat + round_trip_timeout`` and replaced (with a Gap).
            None: no heartbeat.
        :raises ConfigurationError: for no channel, or a bad *queue_size* or *heartbeat*.
        """
        return Subscription(self._source, channels, queue_size, heartbeat)

    def stats(self) -> DatabaseStats:
        """Pool and call figures, and the bridge loop's lag, now. Never blocks."""
        size, idle, leased, discarded = self._source.figures()
        max_size = self._source.max_size
        waiting = max(0, leased - max_size)
        bridge = self.bridge.stats()
        return DatabaseStats(
            max_size=max_size,
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
            discarded=discarded,
            **_replica_figures(self._source),
        )

    def _streaming_transaction(self) -> tuple[_Core, bool]:
        # A stream of the Database declares its cursor in a transaction of its own, with no block
        # timeout (its reader's timeout= bounds each wait for rows).
        return Transaction(self._source, timeout=math.inf)._core, True

    # -- closing: close() and aclose() come from Closing -----------------------------------------------

    def _mark_closed(self) -> bool:
        """Refuse calls from now on; True if the pool must be closed on the bridge: no other Database
        shares it (see ``PoolSource.shared``)."""
        source = self._source
        if isinstance(source, ClosedSource):
            return False
        pool = source.inner if isinstance(source, PinnedSource) else source
        self._source = ClosedSource(pool)
        if not pool.let_go(self):
            return False
        self._closing = source
        return source.mark_closed()

    async def _aclose_on_bridge(self, timeout: float) -> None:
        await self._closing._aclose_on_bridge(timeout)


def _replica_figures(source: PoolSource | PinnedSource | ClosedSource) -> dict[str, Any]:
    if isinstance(source, PinnedSource):
        source = source.inner
    if not isinstance(source, ReplicatedSource):
        return {}
    return {"replicas": source.replica_stats(), "reads_on_primary": source.reads_on_primary}


def _check_sizes(min_size: object, max_size: object, pool_timeout: object) -> tuple[int, int, float | None]:
    high = pool_size("max_size", max_size, low=1)
    low = pool_size("min_size", min_size, low=0, high=high)
    return low, high, seconds("pool_timeout", pool_timeout)


def _check_session_reset(value: object) -> str:
    if value not in SESSION_RESETS:
        raise ConfigurationError(
            "session_reset must be 'when_changed' (reset a connection given back to the pool only when its "
            f"session state may have changed) or 'always', not {value!r}"
        )
    return str(value)


def _check_options(options: dict[str, Any]) -> None:
    for name in options:
        if name == "loop":  # the other reserved names are Database's own keywords: never in **options
            raise ConfigurationError(
                "Database does not take 'loop': the pool always lives on the bridge loop"
            )
        if name not in _POOL_OPTIONS:
            close = difflib.get_close_matches(name, _POOL_OPTIONS | _OWN_OPTIONS, n=1)
            suggestion = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(
                f"unknown pool option {name!r}: Database passes options to asyncpg.create_pool and "
                f"asyncpg.connect{suggestion}"
            )
