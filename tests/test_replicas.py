"""Read replicas on real streaming replication: ``db.read`` on hot standbys, read-your-writes, health.

A primary with two hot standbys (``tests/pgcluster.py``: initdb, ``pg_basebackup -R``, ``pg_ctl``) is
shared by the module's tests that leave it as they found it; the tests that stop, promote or fail over a
server make clusters of their own. Which server served a read is what ``inet_server_port()`` says.

The Databases log in as ``app``, a role without the privileges that show a standby's timeline
(``pg_stat_wal_receiver``), so that the tests exercise what most applications have; the failover test
also runs as the superuser.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import asyncpg
import pytest

from loopbridge import Bridge, ConfigurationError, Database, Reader, ReplicaStats
from loopbridge._replicas import ReplicatedSource
from loopbridge._source import PoolSource
from tests.boundary import Driver, wait_until
from tests.pgcluster import PASSWORD, PrivateCluster, multi_host_dsn
from tests.support import Caller, in_thread, independent, run_loop, run_script
from tests.test_pin import _pin_and_begin, _rollback_and_unpin
from tests.test_process import ALLOW_FORK
from tests.test_stress import stress, summary

pytestmark = pytest.mark.slow

T = TypeVar("T")

APP = "app"
_tables = itertools.count()


def prepare(primary: PrivateCluster) -> None:
    """A role ``app`` (no special privileges) with a schema of its own, its first on the search path."""
    primary.sql(f"CREATE ROLE {APP} LOGIN PASSWORD '{PASSWORD}'")
    primary.sql(f"CREATE SCHEMA {APP} AUTHORIZATION {APP}")


def app_dsn(cluster: PrivateCluster) -> str:
    return cluster.dsn(user=APP)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[PrivateCluster, PrivateCluster, PrivateCluster]]:
    """A primary and two hot standbys, for the tests that leave them running and replaying."""
    with PrivateCluster() as primary:
        prepare(primary)
        first, second = primary.add_standby(), primary.add_standby()
        primary.wait_caught_up()
        yield primary, first, second


@pytest.fixture
def primary(servers: tuple[PrivateCluster, ...]) -> PrivateCluster:
    return servers[0]


@pytest.fixture
def standbys(servers: tuple[PrivateCluster, ...]) -> Iterator[tuple[PrivateCluster, PrivateCluster]]:
    first, second = servers[1], servers[2]
    yield first, second
    for standby in (first, second):  # as the next test expects them
        if standby.sql("SELECT pg_get_wal_replay_pause_state()") != "not paused":
            standby.resume_replay()


@pytest.fixture
def table(primary: PrivateCluster) -> str:
    """A table of the test's own, replicated to both standbys before the test begins."""
    name = f"{APP}.t{next(_tables)}"
    independent(app_dsn(primary), f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
    primary.wait_caught_up()
    return name


def replicated(
    primary: PrivateCluster, *standbys: PrivateCluster, bridge: Bridge, **options: object
) -> Database:
    return Database(
        app_dsn(primary),
        replicas=[app_dsn(standby) for standby in standbys],
        bridge=bridge,
        max_size=4,
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture
def db(primary: PrivateCluster, standbys: tuple[PrivateCluster, ...], bridge: Bridge) -> Iterator[Database]:
    database = replicated(primary, *standbys, bridge=bridge)
    yield database
    database.close(timeout=5)


def served_by(reader: Reader | Database) -> int:
    port: int = reader.fetchval("SELECT inet_server_port()")
    return port


def served_by_each(reader: Reader, ports: set[int]) -> None:
    """Reads through *reader* until each of *ports* has served one, and no other server has. A standby
    joins the rotation once the health check has seen it replay what the reads must see (the test's
    last write, for read-your-writes), which on a busy machine can take longer than a few reads."""
    seen: set[int] = set()

    def each_has_served() -> bool:
        seen.add(served_by(reader))
        return seen >= ports

    wait_until(each_has_served, what=f"reads served by each of {sorted(ports)}")
    assert seen == ports


def row(reader: Reader, query: str) -> tuple[Any, ...]:
    record = reader.fetchrow(query)
    assert record is not None
    return tuple(record)


def sync_only(driver: Driver, fn: Callable[[], T]) -> T:
    """*fn* in a sync-thread driver's thread (its context is the same from one call to the next)."""

    async def never() -> T:
        raise AssertionError("only for a sync-thread driver")

    return driver.do(fn, never)


def states(db: Database) -> list[str]:
    return [replica.state for replica in db.stats().replicas]


class TestRouting:
    def test_a_caught_up_standby_serves_reads_and_the_primary_everything_on_db(
        self, db: Database, primary: PrivateCluster, standbys: tuple[PrivateCluster, ...]
    ) -> None:
        assert isinstance(db._source, ReplicatedSource)
        ports = {served_by(db.read) for _ in range(20)}
        assert ports <= {standby.port for standby in standbys}
        assert served_by(db) == primary.port
        stats = db.stats()
        assert [replica.state for replica in stats.replicas] == ["healthy", "healthy"]
        assert sum(replica.reads for replica in stats.replicas) == 20
        assert stats.reads_on_primary == 0

    def test_reads_spread_over_the_healthy_replicas(
        self, db: Database, standbys: tuple[PrivateCluster, ...]
    ) -> None:
        ports = [served_by(db.read) for _ in range(20)]
        assert set(ports) == {standby.port for standby in standbys}
        reads = [replica.reads for replica in db.stats().replicas]
        assert min(reads) >= 5, reads

    def test_a_read_only_transaction_runs_on_a_replica_and_refuses_writes(
        self, db: Database, standbys: tuple[PrivateCluster, ...], table: str
    ) -> None:
        with db.read.transaction(isolation="repeatable_read") as tx:
            assert tx.fetchval("SELECT inet_server_port()") in {standby.port for standby in standbys}
            assert tx.fetchval("SHOW transaction_read_only") == "on"
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError), tx.transaction():
                tx.execute(f"INSERT INTO {table} VALUES (1, 'no')")

    def test_iterate_streams_the_rows_from_a_replica(
        self, db: Database, primary: PrivateCluster, standbys: tuple[PrivateCluster, ...], table: str
    ) -> None:
        db.executemany(f"INSERT INTO {table} VALUES ($1, 'row')", [(i,) for i in range(250)])
        rows = list(db.read.iterate(f"SELECT id, inet_server_port() AS port FROM {table}", prefetch=100))
        assert sorted(row["id"] for row in rows) == list(range(250))
        assert {row["port"] for row in rows} <= {standby.port for standby in standbys}

    def test_a_write_through_read_fails_on_the_replica(self, db: Database, table: str) -> None:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            db.read.fetch(f"INSERT INTO {table} VALUES (1, 'no') RETURNING id")

    @pytest.mark.parametrize("name", ["execute", "aexecutemany", "run", "copy_records_to_table"])
    def test_read_has_no_write_methods_and_says_where_writes_go(self, db: Database, name: str) -> None:
        with pytest.raises(
            AttributeError, match=rf"db.read has no {name}\(\).*db.{name}\(\.\.\.\) runs on the primary"
        ):
            getattr(db.read, name)
        with pytest.raises(AttributeError, match="did you mean 'fetchval'"):
            db.read.fetchvall  # noqa: B018

    def test_without_replicas_read_uses_the_primary_and_the_plain_pool(
        self, primary: PrivateCluster, bridge: Bridge
    ) -> None:
        with Database(app_dsn(primary), bridge=bridge, max_size=2) as plain:
            # No replicas: the plain source, whose calls count nothing (no cost for read-your-writes).
            assert type(plain._source) is PoolSource
            assert served_by(plain.read) == primary.port
            with plain.read.transaction() as tx:
                assert tx.fetchval("SHOW transaction_read_only") == "on"
            assert plain.stats().replicas == ()

    def test_databases_of_one_configuration_share_the_replicas_and_a_plain_one_never_does(
        self, primary: PrivateCluster, standbys: tuple[PrivateCluster, ...], bridge: Bridge
    ) -> None:
        first = replicated(primary, *standbys, bridge=bridge)
        second = replicated(primary, *standbys, bridge=bridge)
        plain = Database(app_dsn(primary), bridge=bridge, max_size=4)
        try:
            assert first._source is second._source
            assert type(plain._source) is PoolSource
            first.read.fetchval("SELECT 1")
            first.close()
            # The other Database keeps the pools and the watchers: they close with the last user.
            assert served_by(second.read) in {standby.port for standby in standbys}
            assert states(second) == ["healthy", "healthy"]
        finally:
            for each in (first, second, plain):
                each.close()

    def test_a_pinned_database_reads_on_the_pinned_connection_and_sees_the_tests_own_writes(
        self, db: Database, primary: PrivateCluster, table: str
    ) -> None:
        """The pytest plugin's rolled-back tests: a replica cannot see the test's transaction."""
        transaction = db.bridge.run(_pin_and_begin, db)
        try:
            db.execute(f"INSERT INTO {table} VALUES (1, 'uncommitted')")
            pid = db.fetchval("SELECT pg_backend_pid()")
            assert row(db.read, f"SELECT count(*), pg_backend_pid() FROM {table}") == (1, pid)
            with db.read.transaction() as tx:
                assert tx.fetchval("SELECT inet_server_port()") == primary.port
        finally:
            db.bridge.run(_rollback_and_unpin, db, transaction)
        assert independent(app_dsn(primary), f"SELECT count(*) FROM {table}")[0][0] == 0

    def test_reads_from_every_kind_of_caller_reach_a_replica(
        self, db: Database, standbys: tuple[PrivateCluster, ...], caller: Caller
    ) -> None:
        port = caller.call(db.read, "fetchval", "SELECT inet_server_port()")
        assert port in {standby.port for standby in standbys}


def write_then_read(driver: Driver, db: Database, table: str, key: int) -> tuple[int | None, int]:
    """In one caller context: insert row *key* through ``db``, then read it back through ``db.read``;
    returns what the read found and the port of the server that served it."""
    insert = f"INSERT INTO {table} VALUES ($1, 'written')"
    select = f"SELECT (SELECT id FROM {table} WHERE id = $1), inet_server_port()"

    def sync() -> tuple[int | None, int]:
        db.execute(insert, key)
        row = db.read.fetchrow(select, key)
        assert row is not None
        return row[0], row[1]

    async def async_() -> tuple[int | None, int]:
        await db.aexecute(insert, key)
        row = await db.read.afetchrow(select, key)
        assert row is not None
        return row[0], row[1]

    return driver.do(sync, async_)


class TestReadYourWrites:
    def test_a_read_after_a_write_sees_it_while_a_standbys_replay_is_paused(
        self,
        db: Database,
        driver: Driver,
        primary: PrivateCluster,
        standbys: tuple[PrivateCluster, PrivateCluster],
        table: str,
    ) -> None:
        paused, replaying = standbys
        paused.pause_replay()
        served: list[int] = []
        stale = 0
        for key in range(200):
            found, port = write_then_read(driver, db, table, key)
            stale += found != key
            served.append(port)
        assert stale == 0
        # The paused standby never served one of those reads: it had not replayed any of the writes.
        assert paused.port not in served
        assert set(served) <= {replaying.port, primary.port}

    def test_with_both_standbys_paused_the_primary_serves_the_read_after_a_bounded_wait(
        self,
        primary: PrivateCluster,
        standbys: tuple[PrivateCluster, PrivateCluster],
        bridge: Bridge,
        table: str,
    ) -> None:
        with replicated(primary, *standbys, bridge=bridge, replica_wait=0.2) as db:
            for standby in standbys:
                standby.pause_replay()
            db.execute(f"INSERT INTO {table} VALUES (1, 'written')")
            started = time.monotonic()
            assert row(db.read, f"SELECT id, inet_server_port() FROM {table}") == (1, primary.port)
            assert 0.15 < time.monotonic() - started < 5
            assert db.stats().reads_on_primary == 1
            # Reads that accept stale data still go to a replica, which has not replayed the insert.
            assert row(db.read.stale, f"SELECT count(*), inet_server_port() FROM {table}")[0] == 0

    def test_a_read_waits_for_a_replica_that_catches_up_within_replica_wait(
        self,
        primary: PrivateCluster,
        standbys: tuple[PrivateCluster, PrivateCluster],
        bridge: Bridge,
        table: str,
    ) -> None:
        standby = standbys[0]
        with replicated(primary, standby, bridge=bridge, replica_wait=10) as db:
            db.read.fetchval("SELECT 1")  # the replica is checked and in the rotation
            standby.pause_replay()
            db.execute(f"INSERT INTO {table} VALUES (1, 'written')")
            resume = threading.Timer(0.5, standby.resume_replay)
            resume.start()
            try:
                assert row(db.read, f"SELECT id, inet_server_port() FROM {table}") == (1, standby.port)
            finally:
                resume.join(30)
            assert db.stats().reads_on_primary == 0

    def test_a_committed_transaction_counts_as_a_write(
        self, db: Database, driver: Driver, standbys: tuple[PrivateCluster, PrivateCluster], table: str
    ) -> None:
        paused = standbys[0]
        paused.pause_replay()
        for key in range(20):

            def sync(key: int = key) -> object:
                with db.transaction() as tx:
                    tx.execute(f"INSERT INTO {table} VALUES ($1, 'in a transaction')", key)
                return db.read.fetchval(f"SELECT id FROM {table} WHERE id = $1", key)

            async def async_(key: int = key) -> object:
                async with db.transaction() as tx:
                    await tx.aexecute(f"INSERT INTO {table} VALUES ($1, 'in a transaction')", key)
                return await db.read.afetchval(f"SELECT id FROM {table} WHERE id = $1", key)

            assert driver.do(sync, async_) == key

    def test_a_fetch_on_the_primary_counts_as_a_write(
        self, db: Database, standbys: tuple[PrivateCluster, PrivateCluster], table: str
    ) -> None:
        standbys[0].pause_replay()
        standbys[1].pause_replay()

        def go() -> object:
            db.fetch(f"INSERT INTO {table} VALUES (7, 'returning') RETURNING id")
            return db.read.fetchval(f"SELECT id FROM {table} WHERE id = 7")

        assert in_thread(go) == 7

    def test_by_default_another_callers_write_may_not_be_seen_yet_and_with_database_it_is(
        self,
        primary: PrivateCluster,
        standbys: tuple[PrivateCluster, PrivateCluster],
        bridge: Bridge,
        table: str,
    ) -> None:
        standby = standbys[0]
        for consistency, expected in (("caller", 0), ("database", 1)):
            with replicated(primary, standby, bridge=bridge, consistency=consistency, replica_wait=0.2) as db:
                reader = Driver("sync-thread")

                def own_write(db: Database = db, key: int = 10 + expected) -> None:
                    db.execute(f"INSERT INTO {table} VALUES ($1, 'the reader')", key)
                    db.read.fetchval(f"SELECT count(*) FROM {table}")

                def others_write(db: Database = db) -> None:
                    db.execute(f"INSERT INTO {table} VALUES (1, 'another caller')")

                def count_theirs(db: Database = db) -> object:
                    return db.read.fetchval(f"SELECT count(*) FROM {table} WHERE id = 1")

                try:
                    # The reader writes and reads its write back: a position covering it is known.
                    sync_only(reader, own_write)
                    primary.wait_caught_up(standby)
                    standby.pause_replay()
                    in_thread(others_write)
                    count = sync_only(reader, count_theirs)
                finally:
                    reader.stop()
                    standby.resume_replay()
                    primary.wait_caught_up(standby)
                assert count == expected, consistency
                db.execute(f"DELETE FROM {table}")
                primary.wait_caught_up(standby)

    def test_a_caller_that_never_read_before_still_sees_its_earlier_writes(
        self, db: Database, standbys: tuple[PrivateCluster, PrivateCluster], table: str
    ) -> None:
        for standby in standbys:
            standby.pause_replay()

        async def fresh_task() -> object:
            # A new task: its context has never been through db.read, so what it wrote is unknown and
            # every write counts.
            await db.aexecute(f"INSERT INTO {table} VALUES (3, 'fresh')")
            return await asyncio.create_task(db.read.afetchval(f"SELECT id FROM {table} WHERE id = 3"))

        assert run_loop(fresh_task) == 3


class TestHealth:
    def test_stats_and_debug_logs_say_where_reads_went(
        self, db: Database, caplog: pytest.LogCaptureFixture, standbys: tuple[PrivateCluster, ...]
    ) -> None:
        with caplog.at_level(logging.DEBUG, logger="loopbridge"):
            db.read.fetchval("SELECT 1")
        assert any("read on replica" in record.getMessage() for record in caplog.records)
        stats = db.stats().replicas
        assert all(isinstance(each, ReplicaStats) for each in stats)
        assert [each.state for each in stats] == ["healthy", "healthy"]
        assert all(each.lag is not None and each.lag < 5 for each in stats)
        assert all(each.replay_lsn and "/" in each.replay_lsn for each in stats)
        assert all("***" in each.dsn and PASSWORD not in each.dsn for each in stats)

    def test_a_lagging_standby_leaves_the_rotation_and_returns(
        self,
        primary: PrivateCluster,
        standbys: tuple[PrivateCluster, PrivateCluster],
        bridge: Bridge,
        table: str,
    ) -> None:
        standby = standbys[0]
        with replicated(primary, standby, bridge=bridge, max_lag=1.0) as db:
            db.read.fetchval("SELECT 1")
            standby.pause_replay()
            db.execute(f"INSERT INTO {table} VALUES (1, 'lag')")
            wait_until(lambda: states(db) == ["lagging"], what="the standby counted as lagging")
            assert "max_lag=1" in db.stats().replicas[0].reason
            # Even a stale read does not go to a replica beyond max_lag.
            assert served_by(db.read.stale) == primary.port
            standby.resume_replay()
            wait_until(lambda: states(db) == ["healthy"], what="the standby back in the rotation")
            assert served_by(db.read.stale) == standby.port

    def test_a_replica_dsn_of_the_primary_under_another_name_is_taken_out_as_not_a_standby(
        self, primary: PrivateCluster, bridge: Bridge, caplog: pytest.LogCaptureFixture
    ) -> None:
        other_name = app_dsn(primary).replace("127.0.0.1", "localhost")
        with Database(app_dsn(primary), replicas=[other_name], bridge=bridge, max_size=2) as db:
            with caplog.at_level(logging.WARNING, logger="loopbridge"):
                assert served_by(db.read) == primary.port
                wait_until(lambda: states(db) == ["not a standby"], what="the replica refused")
            assert "DSN names a primary" in db.stats().replicas[0].reason
        assert any("left the rotation" in record.getMessage() for record in caplog.records)
        assert all(PASSWORD not in record.getMessage() for record in caplog.records)

    def test_a_standby_of_another_cluster_is_taken_out(self, primary: PrivateCluster, bridge: Bridge) -> None:
        with PrivateCluster() as stranger:
            foreign = stranger.add_standby()
            with Database(app_dsn(primary), replicas=[foreign.dsn()], bridge=bridge, max_size=2) as db:
                assert served_by(db.read) == primary.port
                wait_until(lambda: states(db) == ["other cluster"], what="the foreign standby refused")
                assert "system identifier" in db.stats().replicas[0].reason

    def test_a_replica_refusing_the_login_is_down_and_its_password_never_shown(
        self,
        primary: PrivateCluster,
        standbys: tuple[PrivateCluster, ...],
        bridge: Bridge,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        wrong = "Wr0ng-Secret-pw"
        bad = standbys[0].dsn(user=APP, password=wrong)
        with (
            Database(app_dsn(primary), replicas=[bad, app_dsn(standbys[1])], bridge=bridge, max_size=2) as db,
            caplog.at_level(logging.DEBUG, logger="loopbridge"),
        ):
            for _ in range(10):  # every read is served, by the other replica
                assert served_by(db.read) == standbys[1].port
            wait_until(lambda: states(db)[0] == "down", what="the replica counted as down")
            assert "password authentication failed" in db.stats().replicas[0].reason
            text = repr(db.stats()) + "".join(record.getMessage() for record in caplog.records) + repr(db)
        assert wrong not in text
        assert PASSWORD not in text


class TestBadInput:
    @pytest.mark.parametrize(
        ("replicas", "message"),
        [
            ("postgresql://a@h/db", "must be a list of DSNs"),
            (["host=standby user=app password=S3cr3t"], r"replicas\[0\]: invalid DSN"),
            (["postgresql://app:S3cr3t@standby:99999/postgres"], r"replicas\[0\]: invalid port"),
            (["postgresql://app:S3cr3t@127.0.0.1:5999/postgres"], "names the primary's server"),
            (["postgresql://app:S3cr3t@standby/other"], "is database 'other'"),
            (["postgresql://app:S3cr3t@s1/postgres", "postgresql://app:S3cr3t@s1/postgres"], "listed twice"),
            ([42], "must be a DSN string"),
        ],
    )
    def test_a_bad_replica_list_is_refused_without_showing_a_password(
        self, replicas: object, message: str
    ) -> None:
        with pytest.raises(ConfigurationError, match=message) as raised:
            Database("postgresql://app:S3cr3t@127.0.0.1:5999/postgres", replicas=replicas)  # type: ignore[arg-type]
        assert "S3cr3t" not in str(raised.value)

    @pytest.mark.parametrize(
        ("option", "value"),
        [("consistency", "eventual"), ("max_lag", -1), ("replica_wait", "1s"), ("max_lag", True)],
    )
    def test_bad_replica_options_are_refused(self, option: str, value: object) -> None:
        options: dict[str, Any] = {option: value}
        with pytest.raises(ConfigurationError, match=option if option != "consistency" else "'caller'"):
            Database(
                "postgresql://app@127.0.0.1:5999/postgres",
                replicas=["postgresql://app@s1/postgres"],
                **options,
            )

    def test_a_misspelled_replica_option_suggests_the_right_one(self) -> None:
        with pytest.raises(ConfigurationError, match="did you mean 'replicas'"):
            Database("postgresql://app@127.0.0.1:5999/postgres", replica=["postgresql://app@s1/postgres"])


@pytest.fixture
def own_primary() -> Iterator[PrivateCluster]:
    """A primary of the test's own, for tests that stop, restart or promote its servers."""
    with PrivateCluster() as cluster:
        prepare(cluster)
        yield cluster


class TestStandbyChanges:
    def test_a_stopped_standby_leaves_the_rotation_reads_keep_working_and_it_returns_when_restarted(
        self, own_primary: PrivateCluster, bridge: Bridge
    ) -> None:
        first, second = own_primary.add_standby(), own_primary.add_standby()
        with replicated(own_primary, first, second, bridge=bridge) as db:
            db.execute("CREATE TABLE seen (id int)")
            served_by_each(db.read, {first.port, second.port})
            errors: list[BaseException] = []
            stop = threading.Event()

            def keep_reading() -> None:
                while not stop.is_set():
                    try:
                        db.read.fetchval("SELECT count(*) FROM seen")
                    except BaseException as exc:  # a read must never fail because a replica did
                        errors.append(exc)
                        return

            reader = threading.Thread(target=keep_reading, daemon=True)
            reader.start()
            try:
                first.stop("immediate")
                wait_until(lambda: states(db)[0] == "down", what="the stopped standby counted as down")
                assert {served_by(db.read) for _ in range(10)} == {second.port}
                first.start()
                wait_until(lambda: states(db)[0] == "healthy", what="the restarted standby back")
            finally:
                stop.set()
                reader.join(30)
            assert errors == []
            assert first.port in {served_by(db.read) for _ in range(20)}

    def test_with_its_only_replica_down_every_read_goes_to_the_primary(
        self, own_primary: PrivateCluster, bridge: Bridge, caller: Caller
    ) -> None:
        standby = own_primary.add_standby()
        with replicated(own_primary, standby, bridge=bridge) as db:
            assert caller.call(db.read, "fetchval", "SELECT inet_server_port()") == standby.port
            standby.stop("immediate")
            # The first read may find the pooled connection dead: it runs again, on the primary.
            assert caller.call(db.read, "fetchval", "SELECT inet_server_port()") == own_primary.port
            assert caller.call(db.read.stale, "fetchval", "SELECT inet_server_port()") == own_primary.port
            wait_until(lambda: states(db) == ["down"], what="the stopped standby counted as down")
            assert db.stats().reads_on_primary >= 2

    def test_a_promoted_standby_leaves_the_rotation(
        self, own_primary: PrivateCluster, bridge: Bridge
    ) -> None:
        first, second = own_primary.add_standby(), own_primary.add_standby()
        with replicated(own_primary, first, second, bridge=bridge) as db:
            served_by_each(db.read, {first.port, second.port})
            first.promote()
            wait_until(lambda: states(db)[0] == "not a standby", what="the promoted standby taken out")
            assert "promoted" in db.stats().replicas[0].reason
            assert {served_by(db.read) for _ in range(10)} == {second.port}


class TestFailover:
    @pytest.mark.parametrize("user", [APP, "postgres"])
    def test_writes_resume_on_the_promoted_standby_and_no_acknowledged_write_is_lost(
        self, own_primary: PrivateCluster, bridge: Bridge, user: str
    ) -> None:
        """Synchronous replication to the standby that takes over; a second, asynchronous standby is
        left following the old primary, which is gone: it must not serve reads after the failover."""
        heir = own_primary.add_standby("heir", synchronous=True)
        orphan = own_primary.add_standby("orphan")
        dsn = multi_host_dsn(own_primary, heir, target_session_attrs="read-write").replace(
            "postgres:", f"{user}:", 1
        )
        db = Database(
            dsn,
            replicas=[heir.dsn(user=user), orphan.dsn(user=user)],
            bridge=bridge,
            max_size=4,
            timeout=3,
            replica_wait=0.3,
        )
        try:
            db.execute("CREATE TABLE ledger (id int PRIMARY KEY)")
            acknowledged = []
            for key in range(50):
                db.execute("INSERT INTO ledger VALUES ($1)", key)
                acknowledged.append(key)
            assert db.read.fetchval("SELECT count(*) FROM ledger") == 50

            own_primary.stop("immediate")
            heir.promote()
            started = time.monotonic()
            resumed = None
            for key in itertools.count(50):
                try:
                    db.execute("INSERT INTO ledger VALUES ($1) ON CONFLICT DO NOTHING", key)
                except (ConnectionError, OSError):
                    assert time.monotonic() - started < 20, "writes did not resume"
                    time.sleep(0.1)
                    continue
                acknowledged.append(key)
                if resumed is None:
                    resumed = time.monotonic() - started
                if len(acknowledged) >= 80:
                    break
            assert resumed is not None
            assert resumed < 20
            assert served_by(db) == heir.port
            # Every acknowledged write is there, and every read after them sees them all.
            stored = {row[0] for row in db.fetch("SELECT id FROM ledger")}
            assert set(acknowledged) <= stored
            for _ in range(20):
                assert db.read.fetchval("SELECT count(*) >= 80 FROM ledger") is True
            wait_until(
                lambda: states(db) == ["not a standby", states(db)[1]] and states(db)[1] != "healthy",
                what="the promoted standby and the orphan out of the rotation",
            )
            assert served_by(db.read) == heir.port
        finally:
            db.close(timeout=5)


class TestProcesses:
    def test_a_forked_child_reads_from_the_replicas_with_watchers_of_its_own(
        self, primary: PrivateCluster, standbys: tuple[PrivateCluster, ...], table: str
    ) -> None:
        """gunicorn --preload: the Database is used in the master, then in each forked worker."""
        replicas = [app_dsn(standby) for standby in standbys]
        out = run_script(
            f"""
            {ALLOW_FORK}
            import asyncio, json, os, sys
            from loopbridge import Database
            db = Database({app_dsn(primary)!r}, replicas={replicas!r}, max_size=2)
            parent = db.read.fetchval("SELECT inet_server_port()")
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                db.execute("INSERT INTO {table} VALUES (1, 'from the child')")
                report = dict(
                    seen=db.read.fetchval("SELECT count(*) FROM {table}"),
                    port=asyncio.run(db.read.afetchval("SELECT inet_server_port()")),
                    states=[replica.state for replica in db.stats().replicas],
                )
                os.write(w, json.dumps(report).encode())
                os.close(w)
                sys.exit(0)
            os.close(w)
            with os.fdopen(r) as pipe:
                child = json.loads(pipe.read())
            _, status = os.waitpid(pid, 0)
            child["exit"] = os.waitstatus_to_exitcode(status)
            child["parent"] = parent
            child["parent_after"] = db.read.fetchval("SELECT inet_server_port()")
            print(json.dumps(child))
            """
        )
        report = json.loads(out)
        ports = {standby.port for standby in standbys}
        assert report["exit"] == 0
        assert report["seen"] == 1
        assert {report["parent"], report["port"], report["parent_after"]} <= ports
        assert report["states"] == ["healthy", "healthy"]

    def test_an_unclosed_database_with_replicas_exits_cleanly(
        self, primary: PrivateCluster, standbys: tuple[PrivateCluster, ...]
    ) -> None:
        replicas = [app_dsn(standby) for standby in standbys]
        out = run_script(
            f"""
            import asyncio
            from loopbridge import Database
            db = Database({app_dsn(primary)!r}, replicas={replicas!r}, max_size=2)
            print(db.read.fetchval("SELECT 1"), asyncio.run(db.read.afetchval("SELECT 2")))
            """
        )
        assert out.split() == ["1", "2"]


class TestFrameworkConfiguration:
    def test_a_django_entry_passes_replicas_through_and_names_a_bad_one(
        self, primary: PrivateCluster, standbys: tuple[PrivateCluster, ...]
    ) -> None:
        from django.core.exceptions import ImproperlyConfigured

        from loopbridge.contrib.django import Databases

        entry = {"dsn": app_dsn(primary), "replicas": [app_dsn(standbys[0])], "max_size": 2}
        databases = Databases()
        databases.configure({"default": entry})
        try:
            assert served_by(databases["default"].read) == standbys[0].port
        finally:
            databases.close_all()
        with pytest.raises(ImproperlyConfigured, match=r"LOOPBRIDGE\['default'\]: replicas\[0\]") as raised:
            Databases().configure({"default": {**entry, "replicas": ["host=standby password=S3cr3t"]}})
        assert "S3cr3t" not in str(raised.value)

    def test_flask_options_pass_replicas_through(
        self, primary: PrivateCluster, standbys: tuple[PrivateCluster, ...]
    ) -> None:
        from flask import Flask

        from loopbridge.contrib.flask import LoopBridge

        app = Flask(__name__)
        app.config["LOOPBRIDGE_DSN"] = app_dsn(primary)
        app.config["LOOPBRIDGE_OPTIONS"] = {"replicas": [app_dsn(standbys[1])], "max_size": 2}
        lb = LoopBridge(app)
        try:
            assert served_by(lb.database.read) == standbys[1].port
        finally:
            lb.database.close()


class TestStressRun:
    def test_a_short_replica_stress_run_with_a_failover_passes(self) -> None:
        proc = stress(
            "--replicas", "--duration", "6", "--sync-threads", "4", "--loops", "1", "--tasks-per-loop", "4"
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output
        line = summary(proc)
        assert line.startswith("stress --replicas: PASS: acknowledged "), output
        for figure in ("lost 0", "duplicated 0", "stale reads 0", "hung 0", "undocumented 0", "bridge alive"):
            assert figure in line
        assert "writes resumed" in proc.stdout
        assert PASSWORD not in output

    def test_replicas_with_an_existing_server_is_refused(self, admin_dsn: str) -> None:
        proc = stress("--replicas", "--dsn", admin_dsn, timeout=60)
        assert proc.returncode == 2
        assert "--replicas starts a primary and standbys of its own" in proc.stderr
