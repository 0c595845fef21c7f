"""Database: the query methods and their twins, the escape hatch, the pool's lifecycle, and errors."""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import logging
import pydoc
import threading
import weakref
from typing import Any

import asyncpg
import pytest

from loopbridge import (
    Bridge,
    CallTimeoutError,
    ConfigurationError,
    ConnectError,
    Database,
    DatabaseClosedError,
    DeadlockError,
    PoolTimeoutError,
    Transaction,
)
from loopbridge._dsn import parse_dsn
from loopbridge._twins import twins
from tests.boundary import sessions, wait_until
from tests.pgcluster import PASSWORD, PrivateCluster
from tests.support import WAIT, Caller, all_released, in_thread, independent, pool_source, run_loop


@pytest.fixture
def table(db: Database) -> str:
    db.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)")
    db.executemany("INSERT INTO items VALUES ($1, $2)", [(1, "one"), (2, "two"), (3, "three")])
    return "items"


class TestQueries:
    def test_fetch_returns_asyncpg_records(self, db: Database, table: str, caller: Caller) -> None:
        rows = caller.call(db, "fetch", "SELECT id, name FROM items ORDER BY id")
        assert all(isinstance(row, asyncpg.Record) for row in rows)
        assert [(row["id"], row["name"]) for row in rows] == [(1, "one"), (2, "two"), (3, "three")]

    def test_fetchrow_returns_one_record_or_none(self, db: Database, table: str, caller: Caller) -> None:
        row = caller.call(db, "fetchrow", "SELECT name FROM items WHERE id = $1", 2)
        assert isinstance(row, asyncpg.Record)
        assert row["name"] == "two"
        assert caller.call(db, "fetchrow", "SELECT name FROM items WHERE id = $1", 99) is None

    def test_fetchval_returns_a_value(self, db: Database, table: str, caller: Caller) -> None:
        assert caller.call(db, "fetchval", "SELECT count(*) FROM items") == 3
        assert caller.call(db, "fetchval", "SELECT id, name FROM items WHERE id = 1", column=1) == "one"

    def test_execute_returns_the_status(self, db: Database, table: str, caller: Caller) -> None:
        assert caller.call(db, "execute", "UPDATE items SET name = upper(name)") == "UPDATE 3"
        assert independent(db_dsn(db), "SELECT name FROM items WHERE id = 1")[0][0] == "ONE"

    def test_execute_runs_a_script_without_arguments(self, db: Database, caller: Caller) -> None:
        caller.call(db, "execute", "CREATE TABLE a (x int); CREATE TABLE b (y int); INSERT INTO a VALUES (1)")
        assert db.fetchval("SELECT count(*) FROM a") == 1

    def test_executemany_is_atomic(self, db: Database, table: str, caller: Caller) -> None:
        with pytest.raises(asyncpg.UniqueViolationError):
            caller.call(db, "executemany", "INSERT INTO items VALUES ($1, $2)", [(10, "ten"), (1, "dup")])
        assert db.fetchval("SELECT count(*) FROM items WHERE id = 10") == 0
        caller.call(db, "executemany", "INSERT INTO items VALUES ($1, $2)", [(10, "ten"), (11, "eleven")])
        assert db.fetchval("SELECT count(*) FROM items") == 5

    def test_sql_errors_leave_the_pool_usable(self, db: Database, caller: Caller) -> None:
        with pytest.raises(asyncpg.PostgresSyntaxError):
            caller.call(db, "execute", "SELEC 1")
        assert caller.call(db, "fetchval", "SELECT 1") == 1

    def test_a_failed_ddl_never_reports_success(self, db: Database, caller: Caller, dsn: str) -> None:
        # A table must never be reported as "ensured" without existing: a failed CREATE raises, and
        # the table does not exist.
        with pytest.raises(asyncpg.PostgresSyntaxError):
            caller.call(db, "execute", "CREATE TABLE broken (id int,")
        assert independent(dsn, "SELECT to_regclass('broken')")[0][0] is None


class TestRun:
    def test_run_gets_a_pooled_asyncpg_connection(self, db: Database, table: str, caller: Caller) -> None:
        async def names(conn: Any, first: int) -> list[str]:
            assert isinstance(conn, asyncpg.pool.PoolConnectionProxy)
            async with conn.transaction():
                return [r["name"] async for r in conn.cursor("SELECT name FROM items WHERE id >= $1", first)]

        assert caller.call(db, "run", names, 2) == ["two", "three"]

    def test_run_rolls_back_a_failed_transaction(self, db: Database, table: str) -> None:
        async def half_done(conn: Any) -> None:
            async with conn.transaction():
                await conn.execute("DELETE FROM items")
                raise RuntimeError("changed my mind")

        with pytest.raises(RuntimeError, match="changed my mind"):
            db.run(half_done)
        assert db.fetchval("SELECT count(*) FROM items") == 3

    def test_run_refuses_a_coroutine_object(self, db: Database) -> None:
        async def work(conn: Any) -> None:
            pass

        with pytest.raises(TypeError, match=r"incorrect: db.run\(work\(conn\)\)"):
            db.run(work(None))  # type: ignore[arg-type]

    def test_run_refuses_a_sync_function(self, db: Database) -> None:
        def work(conn: Any) -> int:
            return 1

        with pytest.raises(TypeError, match="define it with 'async def'"):
            db.run(work)  # type: ignore[arg-type]


class TestLifecycle:
    def test_the_pool_is_created_on_first_use(
        self, dsn: str, bridge: Bridge, schema: str, admin_dsn: str
    ) -> None:
        db = Database(dsn, bridge=bridge, min_size=2)
        assert "not opened yet" in repr(db)
        assert bridge.thread is None  # nothing started either
        assert db.fetchval("SELECT 1") == 1
        assert "open" in repr(db)
        assert connections(admin_dsn, schema) == 2
        db.close()

    def test_open_creates_the_pool_eagerly(
        self, dsn: str, bridge: Bridge, schema: str, admin_dsn: str
    ) -> None:
        db = Database(dsn, bridge=bridge, min_size=3)
        db.open()
        assert connections(admin_dsn, schema) == 3
        db.close()
        assert connections(admin_dsn, schema) == 0

    def test_aopen_and_aclose_from_a_foreign_loop(
        self, dsn: str, bridge: Bridge, schema: str, admin_dsn: str
    ) -> None:
        db = Database(dsn, bridge=bridge, min_size=2)

        async def main() -> None:
            await db.aopen()
            assert connections(admin_dsn, schema) == 2
            await db.aclose()

        run_loop(main)
        assert connections(admin_dsn, schema) == 0

    def test_context_managers_open_and_close(self, dsn: str, bridge: Bridge) -> None:
        with Database(dsn, bridge=bridge) as db:
            assert db.fetchval("SELECT 1") == 1
        assert db.closed

        async def main() -> None:
            async with Database(dsn, bridge=bridge) as adb:
                assert await adb.afetchval("SELECT 2") == 2
            assert adb.closed

        run_loop(main)

    def test_close_twice_is_fine_and_later_calls_say_so(self, db: Database, caller: Caller) -> None:
        db.fetchval("SELECT 1")
        db.close()
        db.close()
        with pytest.raises(DatabaseClosedError, match="create a new Database"):
            caller.call(db, "fetchval", "SELECT 1")

    def test_closing_keeps_the_bridge_running_for_others(self, dsn: str, bridge: Bridge) -> None:
        first = Database(dsn, bridge=bridge)
        second = Database(dsn, bridge=bridge)
        first.fetchval("SELECT 1")
        second.fetchval("SELECT 1")
        first.close()
        assert second.fetchval("SELECT 2") == 2
        second.close()

    def test_close_lets_calls_in_flight_finish(self, db: Database) -> None:
        results: list[Any] = []
        thread = threading.Thread(
            target=lambda: results.append(db.fetchval("SELECT pg_sleep(0.3)::text || 'done'"))
        )
        thread.start()
        wait_until(
            lambda: (
                db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND query LIKE 'SELECT pg_sleep(0.3)%' "
                    "AND application_name = current_setting('application_name')"
                )
                == 1
            )
        )
        db.close(timeout=10)
        thread.join(WAIT)
        assert results == ["done"]

    def test_close_on_the_bridge_thread_raises_deadlock_error_and_leaves_the_database_open(
        self, dsn: str, bridge: Bridge, admin_dsn: str, schema: str
    ) -> None:
        """Regression: close() marked the Database closed before it found it was on the bridge thread, so
        the DeadlockError left a pool that a later, proper close() no longer closed."""
        db = Database(dsn, bridge=bridge, min_size=2)
        db.open()

        async def close_inside(con: asyncpg.Connection) -> None:
            db.close()

        with pytest.raises(DeadlockError, match=r"Database.close\(\)"):
            db.run(close_inside)
        assert not db.closed
        assert db.fetchval("SELECT 1") == 1
        db.close()
        wait_until(lambda: sessions(admin_dsn, schema) == 0)

    def test_dsn_defaults_to_loopbridge_dsn_then_database_url(
        self, dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Regression: this compared ``db.dsn`` with the server's DSN, which fails for any server DSN
        with a password (the embedded server's ``postgres:@``, testcontainers' ``test:test@``): ``db.dsn``
        is redacted. What matters is which DSN the Database connects with."""
        monkeypatch.delenv("LOOPBRIDGE_DSN", raising=False)
        monkeypatch.setenv("DATABASE_URL", "postgresql://from-database-url@h/d")
        assert "from-database-url" in Database().dsn
        monkeypatch.setenv("LOOPBRIDGE_DSN", dsn)
        db = Database()
        assert db.dsn == parse_dsn(dsn).redacted
        # Connected with LOOPBRIDGE_DSN: its application_name is this test's schema.
        assert db.fetchval("SELECT current_setting('application_name')") == schema
        db.close()

    def test_no_dsn_at_all_says_what_to_set(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("LOOPBRIDGE_DSN", raising=False)
        monkeypatch.delenv("DATABASE_URL", raising=False)
        with pytest.raises(ConfigurationError, match="set LOOPBRIDGE_DSN"):
            Database()


class TestUnreachable:
    """A Database nobody holds any more is closed on the bridge loop (a notebook re-running its
    ``db = Database(dsn)`` cell); one that a call, the caller or a transaction still uses is not."""

    def test_recreating_a_database_in_a_loop_leaves_one_pool_on_the_server(
        self, dsn: str, bridge: Bridge, admin_dsn: str, schema: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Regression: the bridge's registry held every Database strongly, so each one dropped this way
        kept its pool open until the bridge closed (six re-runs: six pools). Each configuration here is
        its own (a distinct option), so that no two share a pool: each is closed once dropped."""
        with caplog.at_level(logging.INFO, logger="loopbridge"):
            for run in range(6):
                db = Database(dsn, bridge=bridge, min_size=2, max_size=2, statement_cache_size=100 + run)
                assert db.fetchval("SELECT 1") == 1
            # Each is collected once its last connection is back (a reset may finish in the background).
            wait_until(lambda: gc.collect() >= 0 and sessions(admin_dsn, schema) == 2)  # the last one's
        assert caplog.text.count("was garbage collected while open; closing it on the bridge loop") == 5
        assert db.fetchval("SELECT 2") == 2
        db.close()
        wait_until(lambda: sessions(admin_dsn, schema) == 0)

    def test_databases_of_one_configuration_share_one_pool_even_while_all_are_kept(
        self, dsn: str, bridge: Bridge, admin_dsn: str, schema: str, caller: Caller
    ) -> None:
        # A notebook cell that ends by displaying its Database: IPython's output history keeps every
        # earlier one alive, so none can be collected; four re-runs made four pools.
        history = []
        for _ in range(4):
            db = Database(dsn, bridge=bridge, min_size=2, max_size=3)
            assert caller.call(db, "fetchval", "SELECT 1") == 1
            history.append(db)
        assert sessions(admin_dsn, schema) == 2
        assert all(kept.stats().size == 2 for kept in history)
        # Closing one leaves the pool to the others; the last one closes it.
        history[0].close()
        assert history[0].closed
        with pytest.raises(DatabaseClosedError, match="create a new Database"):
            caller.call(history[0], "fetchval", "SELECT 1")
        assert caller.call(history[1], "fetchval", "SELECT 2") == 2
        for kept in history[1:]:
            kept.close()
        wait_until(lambda: sessions(admin_dsn, schema) == 0)
        # A configuration that differs in anything gets a pool of its own.
        first = Database(dsn, bridge=bridge, max_size=3)
        other = Database(dsn, bridge=bridge, max_size=4)
        try:
            first.fetchval("SELECT 1")
            other.fetchval("SELECT 1")
            assert sessions(admin_dsn, schema) == 2
        finally:
            first.close()
            other.close()

    def test_a_dropped_database_is_closed_at_once_without_the_cyclic_collector(
        self, dsn: str, bridge: Bridge, admin_dsn: str, schema: str, caller: Caller
    ) -> None:
        """Regression: a finished stream's owner watch and the stream referred to each other, a cycle
        that kept the Database alive until the cyclic collector ran, which an idle notebook kernel may
        not do for minutes (re-running ``db = Database(dsn)`` left the previous pool open meanwhile)."""
        previous = gc.isenabled()
        gc.disable()
        try:
            db = Database(dsn, bridge=bridge, min_size=1, max_size=1)
            caller.call(db, "execute", "CREATE TABLE t AS SELECT generate_series(1, 50) AS n")
            assert [row["n"] for row in db.iterate("SELECT n FROM t ORDER BY n", prefetch=8)] == list(
                range(1, 51)
            )

            async def streamed(db: Database) -> list[int]:
                return [row["n"] async for row in db.iterate("SELECT n FROM t ORDER BY n", prefetch=8)]

            assert run_loop(functools.partial(streamed, db)) == list(range(1, 51))
            with db.transaction() as tx:
                tx.execute("INSERT INTO t VALUES (51)")
            assert caller.call(db, "fetchval", "SELECT count(*) FROM t") == 51
            del tx  # a finished transaction still refers to db
            gone = weakref.ref(db)
            del db
            wait_until(lambda: gone() is None and sessions(admin_dsn, schema) == 0)
        finally:
            if previous:
                gc.enable()

    def test_a_call_in_flight_keeps_its_database_open(self, dsn: str, bridge: Bridge) -> None:
        # Nothing but the call refers to this Database.
        future = bridge.submit(Database(dsn, bridge=bridge)._fetchval, "SELECT 7 FROM pg_sleep(0.3)")
        gc.collect()
        assert future.result(WAIT) == 7

    def test_a_transaction_keeps_its_database_open(self, dsn: str, bridge: Bridge) -> None:
        with Database(dsn, bridge=bridge).transaction() as tx:  # the handle alone holds the Database
            tx.execute("CREATE TABLE t (n int)")
            gc.collect()
            tx.execute("INSERT INTO t VALUES (1)")
            assert tx.fetchval("SELECT count(*) FROM t") == 1


class TestPool:
    def test_pool_options_pass_through_to_asyncpg(self, dsn: str, bridge: Bridge) -> None:
        inits: list[str] = []
        setups: list[str] = []

        async def init(conn: Any) -> None:
            inits.append(threading.current_thread().name)

        async def setup(conn: Any) -> None:
            setups.append(threading.current_thread().name)

        db = Database(
            dsn,
            bridge=bridge,
            min_size=1,
            max_size=1,
            init=init,
            setup=setup,
            statement_cache_size=0,
            command_timeout=5,
            server_settings={"work_mem": "7MB"},
        )
        assert db.fetchval("SHOW work_mem") == "7MB"
        assert db.fetchval("SELECT 1") == 1
        assert inits == [f"loopbridge-{bridge.name}"]
        assert setups == [f"loopbridge-{bridge.name}"] * 2
        db.close()

    def test_unknown_options_are_refused_with_a_suggestion(self, dsn: str) -> None:
        with pytest.raises(ConfigurationError, match="did you mean 'statement_cache_size'"):
            Database(dsn, statment_cache_size=0)
        with pytest.raises(ConfigurationError, match="did you mean 'max_size'"):
            Database(dsn, max_szie=3)
        loop = asyncio.new_event_loop()
        try:
            with pytest.raises(ConfigurationError, match="always lives on the bridge loop"):
                Database(dsn, loop=loop)
        finally:
            loop.close()

    @pytest.mark.parametrize(("min_size", "max_size"), [(0, 0), (5, 2), (-1, 3)])
    def test_bad_sizes_are_refused(self, dsn: str, min_size: int, max_size: int) -> None:
        with pytest.raises(ConfigurationError, match="_size must be"):
            Database(dsn, min_size=min_size, max_size=max_size)

    @pytest.mark.slow  # waits out timeouts: 2 s or more
    def test_an_exhausted_pool_raises_pool_timeout_error(
        self, dsn: str, bridge: Bridge, caller: Caller
    ) -> None:
        db = Database(dsn, bridge=bridge, max_size=1, pool_timeout=0.3)
        holder = threading.Thread(target=db.execute, args=("SELECT pg_sleep(3)",))
        holder.start()
        wait_until(lambda: pool_source(db).leased == 1)
        with pytest.raises(PoolTimeoutError, match=r"within pool_timeout=0.3 s: all 1 connections") as info:
            caller.call(db, "fetchval", "SELECT 1")
        assert isinstance(info.value, TimeoutError)
        holder.join(WAIT)
        assert db.fetchval("SELECT 1") == 1
        db.close()

    def test_callers_beyond_max_size_wait_their_turn(self, dsn: str, bridge: Bridge) -> None:
        db = Database(dsn, bridge=bridge, max_size=2)

        async def main() -> list[int]:
            return list(
                await asyncio.gather(
                    *(db.afetchval("SELECT $1::int FROM pg_sleep(0.05)", i) for i in range(12))
                )
            )

        assert run_loop(main) == list(range(12))
        all_released(db)
        db.close()

    def test_a_timeout_while_waiting_for_a_connection_gives_it_back(self, dsn: str, bridge: Bridge) -> None:
        db = Database(dsn, bridge=bridge, max_size=1)
        holder = threading.Thread(target=db.execute, args=("SELECT pg_sleep(1)",))
        holder.start()
        wait_until(lambda: pool_source(db).leased == 1)
        with pytest.raises(CallTimeoutError):
            db.fetchval("SELECT 1", timeout=0.2)
        holder.join(WAIT)
        all_released(db)
        assert db.fetchval("SELECT 1") == 1
        db.close()


class TestConnectionReturn:
    """A successful call's connection is reset and returned after the caller has its result, when
    another connection is idle; otherwise before."""

    def test_the_caller_does_not_wait_for_the_reset_and_nobody_gets_the_connection_before_it(
        self, dsn: str, bridge: Bridge, schema: str, admin_dsn: str
    ) -> None:
        gate = Gate()
        db = Database(dsn, bridge=bridge, min_size=2, max_size=2, reset=gate.reset)
        db.open()

        async def dirty(con: Any) -> int:
            await con.execute("SET application_name = 'dirty'")
            pid: int = await con.fetchval("SELECT pg_backend_pid()")
            return pid

        # Returns although the reset of its connection is held back.
        pid = in_thread(lambda: db.run(dirty))
        assert gate.entered.wait(WAIT)
        # That connection is not handed out before its reset is done: calls get the other one...
        assert all(db.fetchval("SELECT pg_backend_pid()") != pid for _ in range(5))
        bridge.run(gate.open)
        # ... and the reset does run: the session is clean again.
        query = "SELECT application_name FROM pg_stat_activity WHERE pid = $1"
        wait_until(lambda: independent(admin_dsn, query, pid)[0][0] == schema)
        db.close()
        assert connections(admin_dsn, schema) == 0

    def test_close_waits_for_connections_being_reset(
        self, dsn: str, bridge: Bridge, schema: str, admin_dsn: str
    ) -> None:
        gate = Gate()
        db = Database(dsn, bridge=bridge, min_size=2, max_size=2, reset=gate.reset)
        db.open()
        assert in_thread(lambda: db.fetchval("SELECT 1")) == 1
        assert gate.entered.wait(WAIT)
        closing = threading.Thread(target=db.close)
        closing.start()
        closing.join(0.3)
        assert closing.is_alive()
        bridge.run(gate.open)
        closing.join(WAIT)
        assert not closing.is_alive()
        assert connections(admin_dsn, schema) == 0

    def test_a_failed_reset_is_logged_and_the_pool_replaces_the_connection(
        self, dsn: str, bridge: Bridge, caplog: pytest.LogCaptureFixture
    ) -> None:
        failures: list[object] = []

        async def failing_reset(con: Any) -> None:
            if not failures:
                failures.append(con)
                raise RuntimeError("reset broke")

        db = Database(dsn, bridge=bridge, min_size=2, max_size=2, reset=failing_reset)
        db.open()
        with caplog.at_level(logging.DEBUG, logger="loopbridge"):
            assert db.fetchval("SELECT 1") == 1  # the caller's statement succeeded: it gets its result
            wait_until(lambda: bool(failures) and not pool_source(db).releasing)
            assert [db.fetchval("SELECT $1::int", i) for i in range(4)] == [0, 1, 2, 3]
        assert any(
            "failed its reset" in record.getMessage() and "reset broke" in record.getMessage()
            for record in caplog.records
        )
        db.close()

    def test_a_sequential_caller_keeps_one_connection_when_no_other_is_idle(
        self, dsn: str, bridge: Bridge
    ) -> None:
        db = Database(dsn, bridge=bridge, min_size=1, max_size=4)
        assert len({db.fetchval("SELECT pg_backend_pid()") for _ in range(10)}) == 1
        db.close()


class Gate:
    """A pool ``reset`` hook that holds the first reset until the gate is opened (on the bridge loop)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self._open: asyncio.Event | None = None

    async def reset(self, con: Any) -> None:
        if not self.entered.is_set():
            self.entered.set()
            await self._event().wait()
        await con.execute(con.get_reset_query())

    async def open(self) -> None:
        self._event().set()

    def _event(self) -> asyncio.Event:
        if self._open is None:  # made on the bridge loop, its first user
            self._open = asyncio.Event()
        return self._open


class TestConnectErrors:
    def test_refused_connection_names_host_port_and_database(self, bridge: Bridge, caller: Caller) -> None:
        db = Database("postgresql://alice:hunter2@127.0.0.1:1/inventory", bridge=bridge)
        with pytest.raises(ConnectError) as info:
            caller.call(db, "fetchval", "SELECT 1")
        message = str(info.value)
        assert "database 'inventory' on 127.0.0.1:1 as user 'alice'" in message
        assert "is PostgreSQL running there" in message
        assert "hunter2" not in message
        assert isinstance(info.value, ConnectionError)
        assert isinstance(info.value.__cause__, OSError)

    def test_wrong_password_names_the_place_but_never_the_password(
        self, cluster: PrivateCluster, bridge: Bridge, caller: Caller, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        db = Database(cluster.dsn(password="not-the-" + PASSWORD), bridge=bridge)
        with pytest.raises(ConnectError) as info:
            caller.call(db, "fetchval", "SELECT 1")
        message = str(info.value)
        assert f"database 'postgres' on 127.0.0.1:{cluster.port} as user 'postgres'" in message
        assert "check the user name and password" in message
        assert isinstance(info.value.__cause__, asyncpg.InvalidPasswordError)
        for text in (message, repr(db), db.dsn, caplog.text, repr(info.value.__cause__)):
            assert PASSWORD not in text
        # Nothing cached the failure: with the right password, the same kind of Database works.
        good = Database(cluster.dsn(), bridge=bridge)
        assert good.fetchval("SELECT 1") == 1
        assert PASSWORD not in repr(good)
        assert PASSWORD not in good.dsn
        good.close()

    def test_unknown_database_says_to_create_it(self, cluster: PrivateCluster, bridge: Bridge) -> None:
        db = Database(cluster.dsn(database="no_such_database"), bridge=bridge)
        with pytest.raises(ConnectError, match="does not exist: create it") as info:
            db.fetchval("SELECT 1")
        assert "database 'no_such_database'" in str(info.value)

    def test_a_failed_open_is_retried_on_the_next_call(self, cluster: PrivateCluster, bridge: Bridge) -> None:
        cluster.stop()
        try:
            db = Database(cluster.dsn(), bridge=bridge)
            with pytest.raises(ConnectError):
                db.fetchval("SELECT 1")
        finally:
            cluster.start()
        assert db.fetchval("SELECT 1") == 1
        db.close()

    def test_a_bad_dsn_is_refused_at_once(self) -> None:
        with pytest.raises(ConfigurationError, match="unsupported DSN scheme 'mysql'"):
            Database("mysql://root:pw@localhost/db")


class TestTwins:
    @pytest.mark.parametrize("owner", [Database, Transaction])
    def test_every_query_method_has_an_async_twin_from_the_same_implementation(self, owner: type) -> None:
        names = ["fetch", "fetchrow", "fetchval", "execute", "executemany", "run"]
        for name in [*names, "open"] if owner is Database else names:
            sync, async_ = getattr(owner, name), getattr(owner, f"a{name}")
            assert sync.__qualname__ == f"{owner.__name__}.{name}"
            assert async_.__qualname__ == f"{owner.__name__}.a{name}"
            assert inspect.iscoroutinefunction(async_)
            assert not inspect.iscoroutinefunction(sync)
            assert sync.__doc__.split("\n\n")[0] == async_.__doc__.split("\n\n")[0]
            assert inspect.unwrap(sync) is inspect.unwrap(async_)

    @pytest.mark.parametrize("owner", [Database, Transaction])
    def test_twins_carry_the_implementations_signature_and_docstring(
        self, owner: type[Database] | type[Transaction]
    ) -> None:
        for method in (owner.fetch, owner.afetch):
            assert str(inspect.signature(method)) == (
                "(self, query: 'str', *args: 'Any', timeout: 'float | None' = None) -> 'list[asyncpg.Record]'"
            )
            assert "Run *query* with *args*" in pydoc.render_doc(method)
        assert list(inspect.signature(owner.fetchval).parameters) == [
            "self",
            "query",
            "args",
            "column",
            "timeout",
        ]
        assert list(inspect.signature(owner.arun).parameters) == ["self", "fn", "args", "timeout"]

    def test_twins_name_their_method_in_the_errors_of_their_calls(self) -> None:
        class Thing:
            def __init__(self, bridge: Bridge) -> None:
                self.bridge = bridge

            async def _poke(self, seconds: float, *, timeout: float | None = None) -> float:
                """Poke."""
                await asyncio.sleep(seconds)
                return seconds

            poke, apoke = twins(_poke)

        with Bridge("twins") as bridge:
            thing = Thing(bridge)
            assert thing.poke(0) == 0
            assert run_loop(lambda: thing.apoke(0)) == 0
            with pytest.raises(CallTimeoutError, match=r"^Thing\.poke\(\) did not finish within 0\.05 s"):
                thing.poke(5, timeout=0.05)
            with pytest.raises(CallTimeoutError, match=r"^Thing\.apoke\(\) did not finish within 0\.05 s"):
                run_loop(lambda: thing.apoke(5, timeout=0.05))


def connections(admin_dsn: str, application_name: str) -> int:
    rows = independent(
        admin_dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", application_name
    )
    count: int = rows[0][0]
    return count


def db_dsn(db: Database) -> str:
    return db._info.dsn
