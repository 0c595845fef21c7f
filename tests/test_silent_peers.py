"""A silent peer (half-open connections) never hangs a caller, eats a pool slot or hides lost notifications.

A peer that silently discards traffic (a NAT, firewall or load balancer that dropped its state, a
partitioned network) never closes a connection: writes "succeed" and nothing comes back. These tests put
the fault-injecting proxy (``tests/faultproxy.py``) between the Database and the real server and
``silence()`` it; what the server really has is checked over a direct connection. The proxy is a
userspace program, so TCP keepalive cannot notice the silence through it: only loopbridge's own bounds
(``round_trip_timeout``, a call's ``timeout=``, ``pool_timeout``, a subscription's heartbeat) can, which
is what these tests pin. The proxy keeps the server's side of a silenced connection open (as a real
partition does until the server's own keepalive notices), and resets it when the test ends.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from loopbridge import (
    Bridge,
    CallTimeoutError,
    ConnectionLostError,
    Database,
    Gap,
    Notification,
    PoolTimeoutError,
    Subscription,
    TransactionTimeoutError,
)
from loopbridge._asyncpg import sent_so_far
from tests.boundary import Driver, sessions, wait_until
from tests.faultproxy import FaultProxy
from tests.support import WAIT, Caller, independent, with_query

#: round_trip_timeout in these tests: how long a connection may stay silent in loopbridge's own round
#: trips before it is terminated.
ROUND_TRIP = 1.0
#: Slack for a loaded 2-core machine on top of a bound.
SLACK = 2.5


@pytest.fixture
def target_dsn(request: pytest.FixtureRequest, admin_dsn: str) -> str:
    """The test server's DSN, or the private cluster's where the test server is not on TCP (the embedded
    server listens on a unix socket, which the proxy cannot forward)."""
    try:
        FaultProxy.in_front_of(admin_dsn)
    except ValueError:
        cluster = request.getfixturevalue("cluster")
        dsn: str = cluster.dsn()
        return dsn
    return admin_dsn


@pytest.fixture
def proxy(target_dsn: str) -> Iterator[FaultProxy]:
    with FaultProxy.in_front_of(target_dsn) as started:
        yield started


@pytest.fixture
def app() -> str:
    """The application_name of this test's sessions, to find them on the server."""
    return f"lbt_silent_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def through(proxy: FaultProxy, target_dsn: str, app: str) -> str:
    """A DSN that reaches the server through the proxy, its sessions named *app*."""
    return with_query(proxy.dsn_for(target_dsn), application_name=app)


@pytest.fixture
def silent_db(through: str, bridge: Bridge) -> Iterator[Database]:
    """A pool of two through the proxy, quick to give up on silence: round_trip_timeout=1, pool_timeout=3."""
    db = Database(
        through, bridge=bridge, min_size=0, max_size=2, pool_timeout=3, round_trip_timeout=ROUND_TRIP
    )
    yield db
    db.close(timeout=2)


def warm(db: Database, count: int) -> set[int]:
    """Open *count* connections at once (each held for a moment), and return their backends' pids."""
    pids: set[int] = set()
    lock = threading.Lock()

    def hold() -> None:
        pid = db.fetchval("SELECT pg_backend_pid() FROM pg_sleep(0.3)", timeout=WAIT)
        with lock:
            pids.add(pid)

    threads = [threading.Thread(target=hold) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    return pids


def elapsed_since(started: float) -> float:
    return time.monotonic() - started


class TestPoolSlots:
    def test_calls_on_silent_connections_fail_in_time_and_every_slot_comes_back(
        self, silent_db: Database, proxy: FaultProxy, caller: Caller
    ) -> None:
        """A call with timeout=2 failed after about 3 s, but its connection's release then waited for
        ever on asyncpg's cancel and reset: two such connections, and a pool of two was dead for good,
        with stats() counting them neither idle nor in use. Now the release is bounded: past it the
        connection is terminated, its slot counted in use until then, and the pool serves its full
        size again once the network is back."""
        db = silent_db
        assert len(warm(db, 2)) == 2
        proxy.silence()
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(CallTimeoutError):
                caller.call(db, "fetchval", "SELECT 1", timeout=1)
            assert elapsed_since(started) < 1 + SLACK
        stats = db.stats()
        # Never neither idle nor in use (the slot of a connection whose release hung counted as neither):
        # a slot counts as in use until its release is over, which may be a moment after its connection
        # was terminated (and left the pool's size).
        assert stats.size <= stats.idle + stats.in_use
        wait_until(lambda: db.stats().in_use == 0, timeout=1 + ROUND_TRIP + SLACK, what="both slots free")
        assert db.stats().discarded == 2
        proxy.heal()
        started = time.monotonic()
        assert len(warm(db, 2)) == 2  # the full size, on fresh connections
        assert elapsed_since(started) < SLACK

    def test_a_call_without_timeout_waits_no_longer_than_pool_timeout_for_a_slot(
        self, through: str, bridge: Bridge, proxy: FaultProxy, caller: Caller
    ) -> None:
        """A call without timeout= waited past pool_timeout: the acquire skipped the pool timeout while
        the lease count was within max_size, and the slot of a connection whose release hung counted
        as free."""
        db = Database(through, bridge=bridge, min_size=0, max_size=1, pool_timeout=1, round_trip_timeout=5)
        try:
            assert db.fetchval("SELECT 1") == 1
            proxy.silence()
            with pytest.raises(CallTimeoutError):
                db.fetchval("SELECT 1", timeout=0.5)  # its release now waits up to 5 s for an answer
            assert db.stats().in_use == 1
            started = time.monotonic()
            with pytest.raises(PoolTimeoutError, match="pool_timeout=1 s"):
                caller.call(db, "fetchval", "SELECT 1")
            assert elapsed_since(started) < 1 + SLACK
        finally:
            db.close(timeout=2)

    def test_a_new_connection_into_silence_fails_within_pool_timeout(
        self, silent_db: Database, proxy: FaultProxy, caller: Caller
    ) -> None:
        proxy.silence()
        started = time.monotonic()
        with pytest.raises(PoolTimeoutError, match="the server did not answer in time"):
            caller.call(silent_db, "fetchval", "SELECT 1")
        assert elapsed_since(started) < 3 + SLACK
        proxy.heal()
        assert caller.call(silent_db, "fetchval", "SELECT 1", timeout=WAIT) == 1

    def test_reconnecting_to_min_size_into_a_silent_network_holds_no_slot_for_long(
        self, through: str, bridge: Bridge, proxy: FaultProxy
    ) -> None:
        """asyncpg reconnects in the background to keep min_size connections open; an attempt into a
        silent network held a pool slot for asyncpg's whole connect timeout (60 s), so the pool served
        one connection short well after the network healed. Such an attempt now gets two round trips'
        worth (round_trip_timeout) before it is given up."""
        db = Database(through, bridge=bridge, min_size=2, max_size=2, pool_timeout=3, round_trip_timeout=1)
        try:
            db.open()
            proxy.silence()
            proxy.reset()  # the pool's connections die: asyncpg reconnects into the silence
            time.sleep(0.5)
            proxy.heal()
            # The attempt started into the silence gives its slot back within two round trips' worth.
            wait_until(
                lambda: len(warm(db, 2)) == 2, timeout=2 * ROUND_TRIP + SLACK, what="both slots at once"
            )
        finally:
            db.close(timeout=2)


class TestTransactions:
    def test_begin_on_a_silent_connection_is_given_up_in_time(
        self, silent_db: Database, proxy: FaultProxy, driver: Driver
    ) -> None:
        """with db.transaction() waited for ever at BEGIN on a silent connection."""
        db = silent_db
        warm(db, 1)
        proxy.silence()
        started = time.monotonic()
        with pytest.raises((ConnectionLostError, PoolTimeoutError)):
            driver.enter(db.transaction())
        # BEGIN on the idle connection (1 s), then a new one, into the silence (pool_timeout, 3 s).
        assert elapsed_since(started) < ROUND_TRIP + 3 + SLACK
        wait_until(lambda: db.stats().in_use == 0, timeout=SLACK, what="the slot free")
        assert db.stats().discarded >= 1

    def test_commit_on_a_silent_connection_is_given_up_in_time_and_says_the_outcome_is_unknown(
        self, silent_db: Database, proxy: FaultProxy, driver: Driver
    ) -> None:
        """The COMMIT at the end of a block waited for ever on a silent connection."""
        db = silent_db
        tx = db.transaction()
        driver.enter(tx)
        assert driver.call(tx, "fetchval", "SELECT 1") == 1
        proxy.silence()
        started = time.monotonic()
        with pytest.raises(ConnectionLostError, match="the outcome is unknown"):
            driver.exit(tx)
        assert elapsed_since(started) < ROUND_TRIP + SLACK
        assert tx.state == "lost"
        wait_until(lambda: db.stats().in_use == 0, timeout=SLACK, what="the slot free")

    def test_a_block_timeout_ends_a_silent_transaction_on_both_sides(
        self, silent_db: Database, proxy: FaultProxy, driver: Driver, admin_dsn: str, app: str
    ) -> None:
        """Under load, blocks on silent connections stayed stuck 65-71 s and counting, their server
        sessions idle in transaction holding locks. A block with timeout= ends at its timeout, its
        connection terminated (our ROLLBACK cannot get through), and the server ends its side too:
        the transaction told it to (idle_in_transaction_session_timeout), since nothing else can."""
        db = silent_db
        tx = db.transaction(timeout=2)
        driver.enter(tx)
        driver.call(tx, "execute", "SELECT 1")
        proxy.silence()
        started = time.monotonic()
        with pytest.raises(TransactionTimeoutError, match="timeout=2 s"):
            driver.call(tx, "execute", "SELECT 2")  # no timeout of its own: the block's bounds it
        assert elapsed_since(started) < 2 + SLACK
        driver.exit(tx, TransactionTimeoutError("the block ended with the error"))
        wait_until(lambda: db.stats().in_use == 0, timeout=ROUND_TRIP + SLACK, what="the slot free")
        # The server's session, kept open by the proxy, ends by itself after the block's time plus a
        # second: nothing stays idle in transaction.
        wait_until(
            lambda: sessions(admin_dsn, app, "idle in transaction") == 0,
            timeout=2 + 1 + SLACK,
            what="no session idle in transaction",
        )


class TestListen:
    def test_a_silent_subscription_is_noticed_and_a_gap_marks_what_it_missed(
        self, through: str, bridge: Bridge, proxy: FaultProxy, driver: Driver, target_dsn: str
    ) -> None:
        """LISTEN over a half-open connection missed 431 of 479 notifications, without a Gap: idle LISTEN
        connections are what NAT and load-balancer idle timeouts drop. A heartbeat notices the silence
        within heartbeat + round_trip_timeout, and the subscription reconnects as for a killed
        backend."""
        db = Database(through, bridge=bridge, min_size=0, max_size=3, pool_timeout=3, round_trip_timeout=1)
        try:
            sub = db.listen("silent_peer", heartbeat=0.5)
            driver.enter(sub)
            independent(target_dsn, "SELECT pg_notify('silent_peer', 'before')")
            first = driver.call(sub, "get", timeout=WAIT)
            assert isinstance(first, Notification)
            assert first.payload == "before"
            proxy.silence()
            independent(target_dsn, "SELECT pg_notify('silent_peer', 'lost')")
            time.sleep(0.5 + 1 + 0.5)  # the heartbeat has noticed: reconnection attempts are under way
            proxy.heal()
            started = time.monotonic()
            gap = driver.call(sub, "get", timeout=WAIT)
            assert isinstance(gap, Gap)
            assert gap.reason == "reconnected"
            # Reconnecting: an attempt made into the silence is given up after 2 round trips' worth.
            assert elapsed_since(started) < 2 * 1 + SLACK
            independent(target_dsn, "SELECT pg_notify('silent_peer', 'after')")
            after = driver.call(sub, "get", timeout=WAIT)
            assert isinstance(after, Notification)
            assert after.payload == "after"
            driver.exit(sub)
            assert db.stats().discarded >= 1
        finally:
            db.close(timeout=2)

    def test_the_heartbeat_costs_one_round_trip_per_period_and_can_be_turned_off(self, db: Database) -> None:
        def heartbeats(sub: Subscription) -> int:
            before = db.bridge.run(_sent, sub)
            assert sub.get(timeout=1.1) is None  # about five heartbeat periods of 0.2 s
            return int(db.bridge.run(_sent, sub)) - before

        with db.listen("beats", heartbeat=0.2) as sub:
            beating = heartbeats(sub)
        with db.listen("quiet", heartbeat=None) as sub:
            quiet = heartbeats(sub)
        assert 3 <= beating <= 7
        assert quiet == 0


async def _sent(sub: Subscription) -> int:
    """Statements asyncpg has sent on the subscription's connection so far."""
    held = sub._core.held
    assert held is not None
    sent = sent_so_far(held.con)
    assert sent is not None
    return sent
