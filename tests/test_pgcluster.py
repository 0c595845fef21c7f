"""The private clusters (tests/pgcluster.py) themselves: streaming replication, promotion, teardown.

Each test starts a primary of its own (initdb) and makes its standbys with pg_basebackup. What a client
sees is checked with asyncpg (``independent``); the clusters' own helpers (``sql``, the LSNs) are what
is under test besides.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator

import asyncpg
import pytest

from tests.boundary import wait_until
from tests.pgcluster import PrivateCluster, format_lsn, parse_lsn
from tests.support import independent, run_loop

pytestmark = pytest.mark.slow


@pytest.fixture
def primary() -> Iterator[PrivateCluster]:
    """A running cluster of the test's own, destroyed afterwards with every standby made from it."""
    with PrivateCluster() as cluster:
        yield cluster


def values(cluster: PrivateCluster, query: str = "SELECT v FROM t ORDER BY v") -> list[object]:
    return [row[0] for row in independent(cluster.dsn(), query)]


def execute_within(cluster: PrivateCluster, query: str, seconds: float) -> None:
    """Run *query* on *cluster*; asyncio.TimeoutError if it has not returned within *seconds* (psql's
    statement_timeout would not do: it cancels a commit's wait for a standby with a mere warning)."""

    async def go() -> None:
        con = await asyncpg.connect(cluster.dsn(), timeout=10)
        try:
            await con.execute(query, timeout=seconds)
        finally:
            await asyncio.wait_for(con.close(), 10)

    run_loop(go)


def test_lsns_parse_and_print_as_postgresql_writes_them() -> None:
    assert parse_lsn("16/B374D848") == 0x16_B374D848
    assert format_lsn(0x16_B374D848) == "16/B374D848"
    assert parse_lsn("0/0") == 0


class TestReplication:
    def test_a_row_written_on_the_primary_is_read_on_a_caught_up_standby(
        self, primary: PrivateCluster
    ) -> None:
        standby = primary.add_standby()
        assert (primary.in_recovery(), standby.in_recovery()) == (False, True)
        independent(primary.dsn(), "CREATE TABLE t (v text)")
        independent(primary.dsn(), "INSERT INTO t VALUES ('written on the primary')")
        primary.wait_caught_up(standby)
        assert values(standby) == ["written on the primary"]
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            independent(standby.dsn(), "INSERT INTO t VALUES ('written on the standby')")

    def test_with_replay_paused_the_standby_does_not_see_a_new_row_until_resumed(
        self, primary: PrivateCluster
    ) -> None:
        standby = primary.add_standby()
        independent(primary.dsn(), "CREATE TABLE t (v int)")
        primary.wait_caught_up(standby)
        standby.pause_replay()
        independent(primary.dsn(), "INSERT INTO t VALUES (1)")
        written = primary.current_lsn()
        # The standby receives the WAL and does not apply it: what it does not see is held back by the
        # pause, not still on its way.
        wait_until(lambda: standby.receive_lsn() >= written, what="the standby received the insert")
        assert standby.replay_lsn() < written
        assert values(standby) == []
        with pytest.raises(TimeoutError, match="replayed up to"):
            primary.wait_caught_up(standby, timeout=0.5)
        standby.resume_replay()
        primary.wait_caught_up(standby)
        assert standby.replay_lsn() >= written
        assert values(standby) == [1]

    def test_promote_makes_the_standby_writable(self, primary: PrivateCluster) -> None:
        standby = primary.add_standby()
        independent(primary.dsn(), "CREATE TABLE t (v text)")
        primary.wait_caught_up(standby)
        standby.promote()
        assert not standby.in_recovery()
        independent(standby.dsn(), "INSERT INTO t VALUES ('after promotion')")
        assert values(standby) == ["after promotion"]
        # A history of its own from now on: the old primary never sees the row.
        assert values(primary) == []
        with pytest.raises(RuntimeError, match="not a standby"):
            standby.promote()

    def test_two_standbys_share_the_primarys_system_identifier_and_another_primary_differs(
        self, primary: PrivateCluster
    ) -> None:
        first, second = primary.add_standby(), primary.add_standby()
        assert len({primary.port, first.port, second.port}) == 3
        streaming = primary.sql("SELECT application_name, state FROM pg_stat_replication ORDER BY 1")
        assert streaming.splitlines() == ["standby1|streaming", "standby2|streaming"]
        identifier = primary.system_identifier()
        assert first.system_identifier() == second.system_identifier() == identifier
        with PrivateCluster() as other:
            assert other.system_identifier() != identifier

    def test_a_standby_follows_its_primary_across_a_restart(self, primary: PrivateCluster) -> None:
        standby = primary.add_standby()
        primary.restart()
        independent(primary.dsn(), "CREATE TABLE t (v text)")
        independent(primary.dsn(), "INSERT INTO t VALUES ('after the restart')")
        primary.wait_caught_up(standby)
        assert values(standby) == ["after the restart"]


class TestSynchronousStandby:
    def test_a_stopped_synchronous_standby_makes_the_primarys_commit_wait(
        self, primary: PrivateCluster
    ) -> None:
        standby = primary.add_standby("sync_one", synchronous=True)
        assert primary.sql("SELECT application_name, sync_state FROM pg_stat_replication") == "sync_one|sync"
        independent(primary.dsn(), "CREATE TABLE t (v text)")  # confirmed at once while the standby runs
        standby.stop()

        with pytest.raises(asyncio.TimeoutError):
            execute_within(primary, "INSERT INTO t VALUES ('unconfirmed')", 1)
        # Giving up the wait does not undo the commit: it is done locally, only not replicated.
        assert values(primary) == ["unconfirmed"]
        standby.start()
        # Confirmed (and so returns) once the standby is back.
        independent(primary.dsn(), "INSERT INTO t VALUES ('confirmed')")
        primary.wait_caught_up(standby)
        assert values(standby) == ["confirmed", "unconfirmed"]

    def test_a_stopped_asynchronous_standby_holds_no_commit(self, primary: PrivateCluster) -> None:
        standby = primary.add_standby()
        standby.stop()
        execute_within(primary, "CREATE TABLE t (v text)", 5)
        standby.start()
        primary.wait_caught_up(standby)
        assert values(standby) == []

    def test_destroying_a_synchronous_standby_releases_the_primary(self, primary: PrivateCluster) -> None:
        standby = primary.add_standby(synchronous=True)
        standby.destroy()
        assert primary.standbys == []
        assert primary.sql("SHOW synchronous_standby_names") == ""
        assert primary.sql("SELECT count(*) FROM pg_replication_slots") == "0"
        execute_within(primary, "CREATE TABLE t (v text)", 5)  # waits for no one


class TestLifeCycle:
    def test_destroying_a_primary_destroys_its_standbys_first(self) -> None:
        primary = PrivateCluster()
        try:
            primary.start()
            standbys = [primary.add_standby(synchronous=True), primary.add_standby()]
            primary.destroy()
            for cluster in [primary, *standbys]:
                assert not cluster.is_running()
                assert not cluster.root.exists()
            primary.destroy()  # idempotent
        finally:
            primary.destroy()

    def test_a_fast_stop_that_outlasts_its_timeout_ends_as_an_immediate_stop(
        self, primary: PrivateCluster
    ) -> None:
        primary.stop(timeout=0)  # pg_ctl gives up waiting at once
        assert not primary.is_running()
        with pytest.raises(subprocess.CalledProcessError):
            primary.stop()  # as before: stopping a stopped cluster is an error
        primary.start()
        assert primary.sql("SELECT 1") == "1"

    def test_a_failed_command_says_what_the_server_said(self, primary: PrivateCluster) -> None:
        with pytest.raises(subprocess.CalledProcessError, match="no_such_table"):
            primary.sql("SELECT * FROM no_such_table")
