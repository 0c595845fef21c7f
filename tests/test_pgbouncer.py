"""``Database(pgbouncer=True)`` behind a real PgBouncer in transaction pooling mode, small server pool.

PgBouncer runs in front of the private cluster (``tests/pgbouncer.py``). Where the binary is missing these
tests skip, with the reason, unless ``LOOPBRIDGE_REQUIRE_PGBOUNCER`` is set (CI sets it): then they fail.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from loopbridge import Bridge, ConfigurationError, ConnectError, Database
from tests.pgbouncer import PgBouncer, PgBouncerMissing, pgbouncer_binary, required
from tests.pgcluster import PASSWORD, PrivateCluster
from tests.support import WAIT, all_at_once, in_thread, independent, run_loop

ROOT = Path(__file__).resolve().parent.parent


def _need_pgbouncer() -> None:
    try:
        pgbouncer_binary()
    except PgBouncerMissing as exc:
        if required():
            pytest.fail(f"LOOPBRIDGE_REQUIRE_PGBOUNCER is set, but {exc}")
        pytest.skip(f"{exc} Set LOOPBRIDGE_REQUIRE_PGBOUNCER=1 to make this a failure.")


@pytest.fixture(scope="module")
def pgbouncer(cluster: PrivateCluster) -> Iterator[PgBouncer]:
    """One PgBouncer for the module: transaction mode, 3 server connections per database and user."""
    _need_pgbouncer()
    bouncer = PgBouncer(cluster, pool_size=3)
    bouncer.start()
    yield bouncer
    bouncer.destroy()


@pytest.fixture
def fresh_pgbouncer(cluster: PrivateCluster) -> Iterator[PgBouncer]:
    """A PgBouncer of this test's own (2 server connections), so that which server serves whom is known."""
    _need_pgbouncer()
    bouncer = PgBouncer(cluster, pool_size=2)
    bouncer.start()
    yield bouncer
    bouncer.destroy()


@pytest.fixture
def table(cluster: PrivateCluster) -> Iterator[str]:
    """A table of this test's own on the private cluster: ``(k text PRIMARY KEY, who text)``.

    Behind PgBouncer a ``search_path`` cannot be passed at login, so tests get a table, not a schema.
    """
    name = f"pgb_{uuid.uuid4().hex[:12]}"
    independent(cluster.dsn(), f"CREATE TABLE {name} (k text PRIMARY KEY, who text)")
    yield name
    independent(cluster.dsn(), f"DROP TABLE {name}")


class TestKeepaliveBehindAPooler:
    def test_a_pooler_that_refuses_keepalive_settings_is_connected_to_without_them(
        self, fresh_pgbouncer: PgBouncer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """PgBouncer (in session mode too, where pgbouncer=True is not wanted) refuses startup parameters
        it does not know: the server-side keepalive settings are dropped once, and every connection
        then works, with keepalive on the client's side still."""
        with Bridge("pgb-keepalive") as bridge:
            db = Database(fresh_pgbouncer.dsn(), bridge=bridge, max_size=2, statement_cache_size=0)
            assert db.fetchval("SELECT 1") == 1
            all_at_once(lambda: db.fetchval("SELECT pg_sleep(0.1)"), lambda: db.fetchval("SELECT 2"))
            refused = [r for r in caplog.records if "refuses keepalive settings" in r.getMessage()]
            assert len(refused) == 1
            db.close()


class TestTransactionPooling:
    def test_without_the_option_asyncpgs_named_statements_break(self, fresh_pgbouncer: PgBouncer) -> None:
        """The control: this PgBouncer really pools by transaction, so asyncpg's statement cache fails."""
        with Bridge("pgb-control") as bridge:
            # Pools of their own (Databases of one configuration would share one): distinct options.
            first = Database(fresh_pgbouncer.dsn(), bridge=bridge, max_size=1, command_timeout=60)
            second = Database(fresh_pgbouncer.dsn(), bridge=bridge, max_size=1, command_timeout=61)
            assert first.fetchval("SELECT $1::int", 1) == 1  # prepared, by name, on server connection S1
            holding, release = threading.Event(), threading.Event()

            async def hold_a_transaction(conn: Any) -> None:
                async with conn.transaction():  # pins S1 (PgBouncer lends the most recently used)
                    await conn.execute("SELECT 1")
                    holding.set()
                    await asyncio.to_thread(release.wait, WAIT)

            holder = threading.Thread(target=second.run, args=(hold_a_transaction,))
            holder.start()
            try:
                assert holding.wait(WAIT)
                with pytest.raises(asyncpg.InvalidSQLStatementNameError, match="does not exist"):
                    first.fetchval("SELECT $1::int", 2)  # on S2, where that statement was never prepared
            finally:
                release.set()
                holder.join(WAIT)

    def test_with_pgbouncer_true_the_same_sequence_works(self, fresh_pgbouncer: PgBouncer) -> None:
        with Bridge("pgb-option") as bridge:
            first = Database(
                fresh_pgbouncer.dsn(), bridge=bridge, max_size=1, pgbouncer=True, command_timeout=60
            )
            second = Database(
                fresh_pgbouncer.dsn(), bridge=bridge, max_size=1, pgbouncer=True, command_timeout=61
            )
            assert first.fetchval("SELECT $1::int", 1) == 1
            holding, release = threading.Event(), threading.Event()

            async def hold_a_transaction(conn: Any) -> None:
                async with conn.transaction():
                    await conn.execute("SELECT 1")
                    holding.set()
                    await asyncio.to_thread(release.wait, WAIT)

            holder = threading.Thread(target=second.run, args=(hold_a_transaction,))
            holder.start()
            try:
                assert holding.wait(WAIT)
                assert first.fetchval("SELECT $1::int", 2) == 2
            finally:
                release.set()
                holder.join(WAIT)

    def test_one_transaction_per_call_no_reset_round_trip(self, fresh_pgbouncer: PgBouncer) -> None:
        """asyncpg's reset query would cost a second server transaction on every release."""
        with Bridge("pgb-reset") as bridge:
            db = Database(fresh_pgbouncer.dsn(), bridge=bridge, max_size=1, pgbouncer=True)
            db.fetchval("SELECT 1")
            before = _transactions(fresh_pgbouncer)
            for n in range(10):
                assert db.fetchval("SELECT $1::int", n) == n
            assert _transactions(fresh_pgbouncer) - before == 10

    def test_a_named_statement_cache_is_refused_with_pgbouncer_true(self, pgbouncer: PgBouncer) -> None:
        with pytest.raises(ConfigurationError, match="named prepared statements do not survive"):
            Database(pgbouncer.dsn(), pgbouncer=True, statement_cache_size=100)

    def test_a_startup_parameter_pgbouncer_refuses_gets_a_hint(
        self, pgbouncer: PgBouncer, bridge: Bridge
    ) -> None:
        db = Database(pgbouncer.dsn() + "?search_path=app", bridge=bridge, pgbouncer=True)
        with pytest.raises(ConnectError, match="ignore_startup_parameters") as info:
            db.fetchval("SELECT 1")
        assert "unsupported startup parameter: search_path" in str(info.value)
        assert PASSWORD not in str(info.value)


class TestCallersThroughPgBouncer:
    def test_sync_threads_foreign_loops_and_a_running_loop_share_one_database(
        self, pgbouncer: PgBouncer, table: str, bridge: Bridge
    ) -> None:
        # More client connections (8) than PgBouncer's server connections (3), and more callers still.
        db = Database(pgbouncer.dsn(), bridge=bridge, max_size=8, pgbouncer=True)
        insert = f"INSERT INTO {table} VALUES ($1, $2)"
        per_caller = 15

        def sync_thread(i: int) -> None:
            for n in range(per_caller):
                db.execute(insert, f"t{i}-{n}", "thread", timeout=WAIT)
                assert db.fetchval(f"SELECT who FROM {table} WHERE k = $1", f"t{i}-{n}") == "thread"

        def foreign_loop(i: int) -> None:
            async def task(t: int) -> None:
                for n in range(per_caller):
                    await db.aexecute(insert, f"l{i}-{t}-{n}", "loop", timeout=WAIT)

            async def main() -> None:
                await asyncio.gather(*(task(t) for t in range(8)))

            asyncio.run(main())

        def running_loop() -> None:
            async def main() -> None:
                for n in range(per_caller):
                    db.execute(insert, f"r-{n}", "running-loop", timeout=WAIT)

            asyncio.run(main())

        all_at_once(
            *(functools.partial(sync_thread, i) for i in range(8)),
            *(functools.partial(foreign_loop, i) for i in range(2)),
            running_loop,
            timeout=90,
        )
        assert db.fetchval(f"SELECT count(*) FROM {table}") == (8 + 2 * 8 + 1) * per_caller

    def test_transactions_keep_their_server_connection_and_roll_back_as_a_whole(
        self, pgbouncer: PgBouncer, table: str, bridge: Bridge
    ) -> None:
        db = Database(pgbouncer.dsn(), bridge=bridge, max_size=6, pgbouncer=True)

        async def transfer(conn: Any, n: int) -> str:
            async with conn.transaction():
                # Transaction-scoped state holds within the transaction, on one server connection.
                await conn.execute("SET LOCAL application_name = 'in-transaction'")
                await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", f"tx-{n}", "a")
                await conn.execute(f"UPDATE {table} SET who = who || 'b' WHERE k = $1", f"tx-{n}")
                name: str = await conn.fetchval("SHOW application_name")
                return name

        async def fails_halfway(conn: Any, n: int) -> None:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", f"bad-{n}", "a")
                raise RuntimeError("changed my mind")

        async def main() -> list[Any]:
            calls = [db.arun(transfer, n) for n in range(20)] + [db.arun(fails_halfway, n) for n in range(10)]
            return list(await asyncio.gather(*calls, return_exceptions=True))

        results = run_loop(main)
        assert results[:20] == ["in-transaction"] * 20
        assert all(isinstance(r, RuntimeError) for r in results[20:])
        rows = in_thread(lambda: db.fetch(f"SELECT k, who FROM {table} ORDER BY k"))
        assert [(r["k"], r["who"]) for r in rows] == sorted((f"tx-{n}", "ab") for n in range(20))


@pytest.mark.slow
def test_the_stress_mixed_load_passes_through_pgbouncer() -> None:
    _need_pgbouncer()
    proc = subprocess.run(
        [sys.executable, "-m", "stress", "--pgbouncer", "--duration", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("stress: PASS: acknowledged "), output
    assert "lost 0; duplicated 0; hung 0; leaked 0; abandoned 0" in summary
    assert "torn 0; phantom 0; unseen reads 0; undocumented 0; bridge alive" in summary
    assert "through PgBouncer (transaction mode)" in proc.stdout
    assert PASSWORD not in output


def _transactions(bouncer: PgBouncer) -> int:
    """Server transactions PgBouncer has run for database 'postgres' (SHOW STATS totals)."""
    for row in bouncer.show("STATS"):
        if row.get("database") == "postgres":
            return int(row["total_xact_count"])
    return 0


class TestMissingBinary:
    def test_a_missing_pgbouncer_skips_locally_and_fails_in_ci(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("tests.pgbouncer.shutil.which", lambda *args, **kwargs: None)
        monkeypatch.delenv("LOOPBRIDGE_REQUIRE_PGBOUNCER", raising=False)
        with pytest.raises(pytest.skip.Exception, match="apt-get install pgbouncer"):
            _need_pgbouncer()
        monkeypatch.setenv("LOOPBRIDGE_REQUIRE_PGBOUNCER", "1")
        with pytest.raises(pytest.fail.Exception, match="LOOPBRIDGE_REQUIRE_PGBOUNCER is set"):
            _need_pgbouncer()
