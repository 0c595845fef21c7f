"""Pool health (killed backends, restarts, a server that is down), asyncpg's pool options passed through,
and Database.stats()."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from loopbridge import Bridge, ConnectError, Database, DatabaseStats, PoolTimeoutError
from tests.boundary import Driver, sessions, terminate, wait_until
from tests.pgcluster import PASSWORD, PrivateCluster
from tests.support import WAIT, Caller, independent


class TestRecovery:
    def test_killed_backends_are_replaced_and_the_next_call_succeeds(
        self, dsn: str, bridge: Bridge, schema: str, admin_dsn: str, caller: Caller
    ) -> None:
        db = Database(dsn, bridge=bridge, min_size=2, max_size=2)
        db.open()
        assert sessions(admin_dsn, schema) == 2
        terminate(admin_dsn, schema)
        assert caller.call(db, "fetchval", "SELECT 1") == 1
        assert caller.call(db, "fetchval", "SELECT count(*) FROM generate_series(1, 3)") == 3
        db.close()

    def test_a_restarted_server_leaves_a_working_pool(
        self, cluster: PrivateCluster, bridge: Bridge, caller: Caller
    ) -> None:
        db = Database(cluster.dsn(), bridge=bridge, min_size=2)
        before = db.fetchval("SELECT pg_postmaster_start_time()")
        cluster.restart()
        assert caller.call(db, "fetchval", "SELECT pg_postmaster_start_time()") > before
        with db.transaction() as tx:
            assert tx.fetchval("SELECT 1") == 1
        db.close()

    def test_calls_while_the_server_is_down_fail_promptly_then_work_again(
        self, cluster: PrivateCluster, bridge: Bridge, driver: Driver
    ) -> None:
        db = Database(cluster.dsn(), bridge=bridge)
        assert db.fetchval("SELECT 1") == 1
        cluster.stop()
        try:
            # timeout= only bounds a hang: a server that is down answers at once, with ConnectError.
            for method, args in (("fetchval", ("SELECT 1",)), ("execute", ("SELECT 1",))):
                with pytest.raises(ConnectError, match=r"is PostgreSQL running there") as info:
                    driver.call(db, method, *args, timeout=20)
                assert PASSWORD not in str(info.value)
            with pytest.raises(ConnectError):
                driver.enter(db.transaction())
            with pytest.raises(ConnectError):
                driver.next(db.iterate("SELECT 1"))
            with pytest.raises(ConnectError):
                driver.call(db, "copy_records_to_table", "t", records=[(1,)])
        finally:
            cluster.start()
        assert db.stats().in_use == 0
        assert driver.call(db, "fetchval", "SELECT 1") == 1
        db.close()


class TestPoolOptions:
    def test_max_inactive_connection_lifetime_closes_idle_connections(
        self, dsn: str, bridge: Bridge, schema: str, admin_dsn: str
    ) -> None:
        db = Database(dsn, bridge=bridge, min_size=0, max_inactive_connection_lifetime=0.2)
        assert db.fetchval("SELECT 1") == 1
        wait_until(lambda: sessions(admin_dsn, schema) == 0, what="the idle connection closed")
        assert db.fetchval("SELECT 2") == 2
        db.close()

    def test_max_queries_replaces_a_connection_after_that_many_queries(
        self, dsn: str, bridge: Bridge
    ) -> None:
        db = Database(dsn, bridge=bridge, max_size=1, max_queries=2)
        pids = [db.fetchval("SELECT pg_backend_pid()") for _ in range(6)]
        assert len(set(pids)) >= 2
        default = Database(dsn, bridge=bridge, max_size=1)
        assert len({default.fetchval("SELECT pg_backend_pid()") for _ in range(6)}) == 1
        db.close()
        default.close()

    def test_init_runs_once_per_connection_and_setup_on_every_acquire(
        self, dsn: str, bridge: Bridge, caller: Caller
    ) -> None:
        inits: list[str] = []
        setups: list[str] = []

        async def init(conn: Any) -> None:
            assert isinstance(conn, asyncpg.Connection)
            inits.append(threading.current_thread().name)
            await conn.execute("SET application_name = 'set-by-init'")

        async def setup(conn: Any) -> None:
            setups.append(threading.current_thread().name)

        db = Database(dsn, bridge=bridge, min_size=1, max_size=1, init=init, setup=setup)
        assert caller.call(db, "fetchval", "SELECT current_setting('application_name')") == "set-by-init"
        with db.transaction() as tx:
            tx.execute("SELECT 1")
        list(db.iterate("SELECT 1"))
        db.listen("setup").open().close()
        assert inits == [f"loopbridge-{bridge.name}"]
        assert setups == [f"loopbridge-{bridge.name}"] * 4
        db.close()

    def test_statement_cache_size_zero_prepares_nothing_named(self, dsn: str, bridge: Bridge) -> None:
        async def prepared_after_a_query(conn: Any) -> int:
            await conn.fetchval("SELECT 1 + $1::int", 1)
            count: int = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")
            return count

        cached = Database(dsn, bridge=bridge, max_size=1)
        uncached = Database(dsn, bridge=bridge, max_size=1, statement_cache_size=0)
        assert cached.run(prepared_after_a_query) >= 1
        assert uncached.run(prepared_after_a_query) == 0
        cached.close()
        uncached.close()


@pytest.fixture
def ssl_cluster(cluster: PrivateCluster) -> Iterator[PrivateCluster]:
    """The private cluster with TLS turned on (a self-signed certificate), turned off again afterwards."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the ssl pass-through test needs the openssl command to make a certificate")
    key, cert = cluster.root / "server.key", cluster.root / "server.crt"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    key.chmod(0o600)
    if cluster.user is not None:
        shutil.chown(key, cluster.user)
        shutil.chown(cert, cluster.user)
    admin = cluster.dsn()
    for setting, value in (("ssl_cert_file", str(cert)), ("ssl_key_file", str(key)), ("ssl", "on")):
        # ALTER SYSTEM takes no parameters: let the server quote the value.
        quoted = independent(
            admin, "SELECT format('ALTER SYSTEM SET %I = %L', $1::text, $2::text)", setting, value
        )
        independent(admin, quoted[0][0])
    independent(admin, "SELECT pg_reload_conf()")
    wait_until(lambda: independent(admin, "SHOW ssl")[0][0] == "on", what="TLS on")
    yield cluster
    for reset in (
        "ALTER SYSTEM RESET ssl",
        "ALTER SYSTEM RESET ssl_cert_file",
        "ALTER SYSTEM RESET ssl_key_file",
    ):
        independent(admin, reset)
    independent(admin, "SELECT pg_reload_conf()")
    wait_until(lambda: independent(admin, "SHOW ssl")[0][0] == "off", what="TLS off")


class TestSsl:
    ON_TLS = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"

    def test_ssl_passes_through_to_asyncpg(self, ssl_cluster: PrivateCluster, bridge: Bridge) -> None:
        required = Database(ssl_cluster.dsn(), bridge=bridge, ssl="require")
        assert required.fetchval(self.ON_TLS) is True
        plain = Database(ssl_cluster.dsn(), bridge=bridge, ssl=False)
        assert plain.fetchval(self.ON_TLS) is False
        required.close()
        plain.close()

    def test_a_certificate_that_does_not_verify_is_a_connect_error(
        self, ssl_cluster: PrivateCluster, bridge: Bridge
    ) -> None:
        verifying = ssl.create_default_context()  # the self-signed certificate is not trusted
        db = Database(ssl_cluster.dsn(), bridge=bridge, ssl=verifying)
        with pytest.raises(ConnectError, match=f"127.0.0.1:{ssl_cluster.port}") as info:
            db.fetchval("SELECT 1")
        assert PASSWORD not in str(info.value)
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


class TestStats:
    def test_calls_submitted_counts_calls_still_waiting_to_start(self, dsn: str) -> None:
        # Regression: calls_submitted counted the calls started on the bridge loop.
        with Bridge("stats", block_threshold=None) as bridge:
            db = Database(dsn, bridge=bridge)
            blocking, busy = threading.Event(), threading.Event()

            async def block_the_bridge_loop() -> None:
                blocking.set()
                busy.wait(WAIT)  # on purpose: the next call waits in the queue

            try:
                bridge.submit(block_the_bridge_loop)
                assert blocking.wait(WAIT)
                before = db.stats()
                queued = bridge.submit(asyncio.sleep, 0)
                after = db.stats()
                assert after.calls_submitted == before.calls_submitted + 1
                assert bridge.stats().calls_started == before.calls_submitted  # not started yet
            finally:
                busy.set()
            queued.result(WAIT)
            db.close()

    def test_stats_report_the_pool_the_calls_and_the_loop(self, dsn: str, bridge: Bridge) -> None:
        db = Database(dsn, bridge=bridge, min_size=1, max_size=1, pool_timeout=WAIT)
        stats = db.stats()
        assert isinstance(stats, DatabaseStats)
        assert (stats.max_size, stats.size, stats.idle, stats.in_use, stats.waiting) == (1, 0, 0, 0, 0)
        with pytest.raises(dataclasses.FrozenInstanceError):
            stats.size = 3  # type: ignore[misc]

        db.fetchval("SELECT 1")
        stats = db.stats()
        assert (stats.size, stats.idle, stats.in_use) == (1, 1, 0)
        submitted, failed = stats.calls_submitted, stats.calls_failed

        with pytest.raises(asyncpg.PostgresSyntaxError):
            db.execute("SELEC 1")
        with db.transaction():
            waiter = threading.Thread(target=db.fetchval, args=("SELECT 1",))
            waiter.start()
            wait_until(lambda: db.stats().waiting == 1, what="a caller waiting for the connection")
            stats = db.stats()
            assert (stats.size, stats.idle, stats.in_use, stats.waiting) == (1, 0, 1, 1)
            assert stats.calls_in_flight >= 1
        waiter.join(WAIT)
        stats = db.stats()
        assert (stats.in_use, stats.waiting) == (0, 0)
        assert stats.calls_submitted > submitted
        assert stats.calls_failed == failed + 1
        assert stats.calls_completed == stats.calls_submitted
        assert stats.loop_lag >= 0.0
        assert stats.max_loop_lag >= 0.0
        db.close()

    def test_pool_timeout_error_names_the_pool_size_and_the_wait(self, dsn: str, bridge: Bridge) -> None:
        db = Database(dsn, bridge=bridge, max_size=2, pool_timeout=0.25)
        with db.transaction(), db.transaction(), pytest.raises(PoolTimeoutError) as info:
            db.fetchval("SELECT 1")  # both connections are pinned by the transactions
        message = str(info.value)
        assert "pool_timeout=0.25 s" in message
        assert "all 2 connections" in message
        assert "Raise max_size" in message
        db.close()
