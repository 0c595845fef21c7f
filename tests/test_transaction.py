"""Transactions: one pinned connection per block, commit or rollback, savepoints, and nothing left held
when the block is abandoned (owner gone, dropped, Ctrl-C, timeout, cancelled task, lost connection)."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from typing import Any

import asyncpg
import pytest

from loopbridge import (
    Bridge,
    CallTimeoutError,
    ConfigurationError,
    ConnectionLostError,
    Database,
    DatabaseClosedError,
    DeadlockError,
    PoolTimeoutError,
    Transaction,
    TransactionClosedError,
    TransactionTimeoutError,
)
from loopbridge._twins import twin_contexts
from tests.boundary import Driver, sessions, settled, terminate, wait_until
from tests.support import WAIT, independent, run_loop, run_script


@pytest.fixture
def table(db: Database) -> str:
    db.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)")
    return "items"


def names(dsn: str) -> list[str]:
    """What the server has committed, read over a connection of its own."""
    return [row[0] for row in independent(dsn, "SELECT name FROM items ORDER BY id")]


class TestCommitAndRollback:
    def test_commits_when_the_block_ends_normally(
        self, db: Database, table: str, dsn: str, driver: Driver
    ) -> None:
        with driver.block(db.transaction()) as tx:
            assert isinstance(tx, Transaction)
            driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
            driver.call(tx, "executemany", "INSERT INTO items VALUES ($1, $2)", [(2, "two"), (3, "three")])
            assert names(dsn) == []  # nothing visible outside before COMMIT
            assert driver.call(tx, "fetchval", "SELECT count(*) FROM items") == 3
        assert names(dsn) == ["one", "two", "three"]
        assert tx.state == "committed"

    def test_statement_methods_return_what_asyncpg_returns(
        self, db: Database, table: str, driver: Driver
    ) -> None:
        with driver.block(db.transaction()) as tx:
            assert (
                driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one'), (2, 'two')") == "INSERT 0 2"
            )
            rows = driver.call(tx, "fetch", "SELECT id, name FROM items ORDER BY id")
            assert all(isinstance(row, asyncpg.Record) for row in rows)
            assert driver.call(tx, "fetchrow", "SELECT name FROM items WHERE id = $1", 2)["name"] == "two"
            assert driver.call(tx, "fetchrow", "SELECT name FROM items WHERE id = $1", 9) is None
            assert driver.call(tx, "fetchval", "SELECT id, name FROM items WHERE id = 1", column=1) == "one"

    def test_rolls_back_when_a_statement_fails(
        self, db: Database, table: str, dsn: str, driver: Driver
    ) -> None:
        tx = db.transaction()

        def block() -> None:
            with driver.block(tx):
                driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
                driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'again')")

        with pytest.raises(asyncpg.UniqueViolationError):
            block()
        assert names(dsn) == []
        assert tx.state == "rolled back"

    def test_rolls_back_when_the_callers_own_code_raises_between_statements(
        self, db: Database, table: str, dsn: str, driver: Driver
    ) -> None:
        class ChangedMyMind(Exception):
            pass

        def block() -> None:
            with driver.block(db.transaction()) as tx:
                driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
                raise ChangedMyMind  # the caller's code, between two statements

        with pytest.raises(ChangedMyMind):
            block()
        assert names(dsn) == []
        assert db.stats().in_use == 0

    def test_every_statement_runs_on_the_one_pinned_connection(self, db: Database, driver: Driver) -> None:
        with driver.block(db.transaction()) as tx:
            first = driver.call(tx, "fetchrow", "SELECT pg_backend_pid() AS pid, txid_current() AS xid")
            for _ in range(3):
                assert db.fetchval("SELECT 1") == 1  # other calls meanwhile use other connections
                again = driver.call(tx, "fetchrow", "SELECT pg_backend_pid() AS pid, txid_current() AS xid")
                assert tuple(again) == tuple(first)

    def test_run_gets_the_transactions_connection(self, db: Database, table: str, driver: Driver) -> None:
        async def insert(conn: Any, n: int) -> int:
            await conn.execute("INSERT INTO items VALUES ($1, 'x')", n)
            pid: int = await conn.fetchval("SELECT pg_backend_pid()")
            return pid

        with driver.block(db.transaction()) as tx:
            pid = driver.call(tx, "run", insert, 1)
            assert driver.call(tx, "fetchval", "SELECT pg_backend_pid()") == pid
            assert driver.call(tx, "fetchval", "SELECT count(*) FROM items") == 1

    def test_a_failed_commit_raises_asyncpgs_error_and_keeps_nothing(
        self, db: Database, dsn: str, driver: Driver
    ) -> None:
        db.execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, "
            "CONSTRAINT one_name UNIQUE (name) DEFERRABLE INITIALLY DEFERRED)"
        )
        tx = db.transaction()

        def block() -> None:
            with driver.block(tx):
                driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'same'), (2, 'same')")

        with pytest.raises(asyncpg.UniqueViolationError):
            block()  # the violation surfaces at COMMIT, when the block ends
        assert names(dsn) == []
        assert tx.state == "rolled back"
        assert db.stats().in_use == 0

    def test_concurrent_statements_on_one_transaction_take_turns(self, db: Database) -> None:
        async def main() -> list[int]:
            async with db.transaction() as tx:
                return list(
                    await asyncio.gather(
                        *(tx.afetchval("SELECT $1::int FROM pg_sleep(0.02)", i) for i in range(8))
                    )
                )

        assert run_loop(main) == list(range(8))


class TestCaughtErrors:
    """Regression: a block that caught a failed statement and ended normally reported 'committed'
    although the server had answered its COMMIT with ROLLBACK and kept nothing."""

    def test_a_block_that_caught_a_failed_statement_raises_instead_of_committing(
        self, db: Database, table: str, dsn: str, driver: Driver
    ) -> None:
        tx = db.transaction()

        def block() -> None:
            with driver.block(tx):
                driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
                with pytest.raises(asyncpg.UniqueViolationError):
                    driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'again')")

        with pytest.raises(
            TransactionClosedError, match=r"could not commit: a statement in it had failed"
        ) as info:
            block()
        message = str(info.value)
        assert "UniqueViolationError" in message
        assert "nothing it did was kept" in message
        assert "with tx.transaction():" in message  # what to do instead
        assert "Key (id)=(1)" not in message  # the row's values stay out of the message (in the cause)
        assert isinstance(info.value.__cause__, asyncpg.UniqueViolationError)
        assert tx.state == "rolled back"
        assert names(dsn) == []
        assert db.stats().in_use == 0

    def test_a_block_that_caught_a_statement_timeout_raises_instead_of_committing(
        self, db: Database, table: str, dsn: str, driver: Driver
    ) -> None:
        tx = db.transaction()

        def block() -> None:
            with driver.block(tx):
                driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
                with pytest.raises(CallTimeoutError):
                    driver.call(tx, "execute", "SELECT pg_sleep(60)", timeout=0.3)

        with pytest.raises(
            TransactionClosedError, match=r"could not commit: a statement in it was cancelled"
        ):
            block()
        assert tx.state == "rolled back"
        assert names(dsn) == []

    def test_a_caught_error_that_did_not_reach_the_server_does_not_stop_the_commit(
        self, db: Database, table: str, dsn: str, driver: Driver
    ) -> None:
        with driver.block(db.transaction()) as tx:
            driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
            with pytest.raises(asyncpg.DataError):  # refused by asyncpg: an int parameter given a str
                driver.call(tx, "execute", "INSERT INTO items VALUES ($1, 'two')", "two")
        assert tx.state == "committed"
        assert names(dsn) == ["one"]

    def test_a_savepoint_that_caught_a_failed_statement_rolls_back_to_its_start_and_raises(
        self, db: Database, table: str, dsn: str, driver: Driver
    ) -> None:
        with driver.block(db.transaction()) as tx:
            driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'kept')")
            savepoint = tx.transaction()

            def inner() -> None:
                with driver.block(savepoint):
                    driver.call(savepoint, "execute", "INSERT INTO items VALUES (2, 'undone')")
                    with pytest.raises(asyncpg.UniqueViolationError):
                        driver.call(savepoint, "execute", "INSERT INTO items VALUES (1, 'duplicate')")

            with pytest.raises(TransactionClosedError, match=r"savepoint could not be released") as info:
                inner()
            assert "the enclosing transaction is usable again" in str(info.value)
            assert savepoint.state == "rolled back"
            driver.call(tx, "execute", "INSERT INTO items VALUES (3, 'after')")
        assert tx.state == "committed"
        assert names(dsn) == ["kept", "after"]

    def test_a_failed_statement_caught_inside_run_is_found_at_the_end(
        self, db: Database, table: str, dsn: str, driver: Driver
    ) -> None:
        async def insert_unless_there(conn: Any) -> None:
            try:
                await conn.execute("INSERT INTO items VALUES (1, 'again')")
            except asyncpg.UniqueViolationError:
                pass

        async def insert(conn: Any) -> None:
            await conn.execute("INSERT INTO items VALUES (2, 'two')")

        tx = db.transaction()

        def block() -> None:
            with driver.block(tx):
                driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
                driver.call(tx, "run", insert_unless_there)

        with pytest.raises(TransactionClosedError, match=r"your function ran in tx.run\(\) had failed"):
            block()
        assert names(dsn) == []
        with driver.block(db.transaction()) as again:  # a function that did not fail: committed as usual
            driver.call(again, "run", insert)
        assert again.state == "committed"
        assert names(dsn) == ["two"]


class TestOptions:
    def test_isolation_readonly_and_deferrable_reach_the_server(self, db: Database, driver: Driver) -> None:
        tx = db.transaction(isolation="serializable", readonly=True, deferrable=True)
        with driver.block(tx):
            assert driver.call(tx, "fetchval", "SHOW transaction_isolation") == "serializable"
            assert driver.call(tx, "fetchval", "SHOW transaction_read_only") == "on"
            assert driver.call(tx, "fetchval", "SHOW transaction_deferrable") == "on"
            # In a savepoint: a failed statement caught in the block would fail the block's end.
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError), driver.block(tx.transaction()) as sp:
                driver.call(sp, "execute", "CREATE TABLE nope (x int)")

    def test_an_unknown_isolation_level_is_refused_with_the_choices(self, db: Database) -> None:
        with pytest.raises(
            ConfigurationError, match=r"isolation must be one of 'read_committed'.*not 'snapshot'"
        ):
            db.transaction(isolation="snapshot")


class TestTimeout:
    def test_a_block_that_outlives_its_timeout_is_rolled_back_at_once_and_its_connection_returned(
        self, db: Database, table: str, dsn: str, schema: str, admin_dsn: str, driver: Driver
    ) -> None:
        """The rollback happens when the timeout expires, on the bridge loop, not when the caller's code
        comes back: the server session is not left idle in transaction meanwhile."""
        tx = db.transaction(timeout=0.5)

        def block() -> None:
            with driver.block(tx):
                driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
                wait_until(lambda: tx.state == "rolled back", what="rolled back at its timeout")
                assert db.stats().in_use == 0  # the caller is still in the block
                assert sessions(admin_dsn, schema, "idle in transaction") == 0
                driver.call(tx, "execute", "INSERT INTO items VALUES (2, 'two')")

        with pytest.raises(TransactionTimeoutError, match=r"timeout=0\.5 s .* expired"):
            block()
        assert names(dsn) == []

    def test_a_statement_running_when_the_timeout_expires_is_cancelled(
        self, db: Database, table: str, driver: Driver
    ) -> None:
        tx = db.transaction(timeout=0.5)

        def block() -> None:
            with driver.block(tx):
                driver.call(tx, "execute", "SELECT pg_sleep(30)")

        started = time.monotonic()
        with pytest.raises(TransactionTimeoutError, match="cut off while this statement ran"):
            block()
        assert time.monotonic() - started < 5
        assert tx.state == "rolled back"
        settled_pool(db)

    def test_a_block_that_ends_normally_after_its_timeout_raises_and_commits_nothing(
        self, db: Database, table: str, dsn: str, driver: Driver
    ) -> None:
        tx = db.transaction(timeout=0.5)

        def block() -> None:
            with driver.block(tx):
                driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
                time.sleep(1)  # the caller's own code, between statements

        with pytest.raises(TransactionTimeoutError, match="could not commit"):
            block()
        assert names(dsn) == []
        assert tx.state == "rolled back"
        assert tx.timeout == 0.5

    def test_a_block_within_its_timeout_commits(
        self, db: Database, table: str, dsn: str, driver: Driver
    ) -> None:
        with driver.block(db.transaction(timeout=WAIT)) as tx:
            driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
            with driver.block(tx.transaction()) as savepoint:
                driver.call(savepoint, "execute", "INSERT INTO items VALUES (2, 'two')")
        assert names(dsn) == ["one", "two"]
        assert tx.state == "committed"

    def test_the_timeout_bounds_waiting_for_a_connection(
        self, dsn: str, bridge: Bridge, driver: Driver
    ) -> None:
        db = Database(dsn, bridge=bridge, max_size=1, pool_timeout=WAIT)
        try:
            with db.transaction():  # the only connection
                started = time.monotonic()
                with pytest.raises(TransactionTimeoutError, match="could not begin"):
                    driver.enter(db.transaction(timeout=0.5))
                assert time.monotonic() - started < 5
        finally:
            db.close()

    def test_the_server_ends_the_transaction_itself_if_it_outlives_its_timeout(
        self, db: Database, driver: Driver
    ) -> None:
        """Should the ROLLBACK not reach the server (a partition), the server ends the session: the
        transaction sets idle_in_transaction_session_timeout to its timeout and a second."""
        with driver.block(db.transaction(timeout=3)) as tx:
            assert driver.call(tx, "fetchval", "SHOW idle_in_transaction_session_timeout") == "4s"
        assert db.fetchval("SHOW idle_in_transaction_session_timeout") == "0"  # for that transaction only

    def test_the_database_default_applies_and_inf_turns_it_off(
        self, dsn: str, bridge: Bridge, driver: Driver
    ) -> None:
        db = Database(dsn, bridge=bridge, transaction_timeout=0.5)

        def block() -> None:
            with driver.block(db.transaction()) as tx:
                driver.call(tx, "execute", "SELECT pg_sleep(5)")

        try:
            with pytest.raises(TransactionTimeoutError):
                block()
            with driver.block(db.transaction(timeout=float("inf"))) as tx:
                assert driver.call(tx, "fetchval", "SELECT 1 FROM pg_sleep(0.8)") == 1
            assert tx.timeout is None
            # A stream's own transaction is not a block of the caller's: the default does not apply.
            rows = db.iterate("SELECT g FROM generate_series(1, 2) g, pg_sleep(0.4)")
            assert [row[0] for row in rows] == [1, 2]
        finally:
            db.close()

    def test_a_commit_cut_off_by_the_timeout_says_its_outcome_is_unknown(
        self, db: Database, table: str, driver: Driver, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A timed-out COMMIT keeps saying that its outcome is unknown: it may have committed. And the
        transaction's own timeout is not taken for a silent server: nothing says round_trip_timeout, and
        the pool's idle connections are not replaced. The terminated connection's replacement (the pool
        keeps min_size) is still being made when the test closes the Database: it is closed too, not left
        with its socket open when the bridge stops (uvloop's ResourceWarning, an error here)."""
        db.execute(
            """
            CREATE FUNCTION slow_check() RETURNS trigger LANGUAGE plpgsql AS
                $$ BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$;
            CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON items
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_check();
            """
        )
        tx = db.transaction(timeout=1)

        def block() -> None:
            with driver.block(tx):
                driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")  # checked at COMMIT

        with pytest.raises(CallTimeoutError, match="outcome is unknown") as raised:
            block()
        assert not isinstance(raised.value, TransactionClosedError)  # which would say nothing committed
        assert tx.state == "lost"
        settled_pool(db)
        assert "round_trip_timeout" not in caplog.text

    @pytest.mark.parametrize("timeout", [0, -1, "5", True])
    def test_a_bad_timeout_is_refused(self, db: Database, timeout: Any) -> None:
        with pytest.raises(ConfigurationError, match="timeout must be a positive number of seconds"):
            db.transaction(timeout=timeout)


def settled_pool(db: Database) -> None:
    wait_until(lambda: db.stats().in_use == 0, what="every connection back")


class TestSavepoints:
    def test_a_failed_savepoint_rolls_back_only_its_own_work(
        self, db: Database, table: str, dsn: str, driver: Driver
    ) -> None:
        def failing_savepoint(tx: Transaction) -> None:
            with driver.block(tx.transaction()) as savepoint:
                assert savepoint.is_savepoint
                driver.call(savepoint, "execute", "INSERT INTO items VALUES (2, 'undone')")
                driver.call(savepoint, "execute", "INSERT INTO items VALUES (1, 'duplicate')")

        with driver.block(db.transaction()) as tx:
            driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'kept')")
            with pytest.raises(asyncpg.UniqueViolationError):
                failing_savepoint(tx)
            with driver.block(tx.transaction()) as savepoint:
                driver.call(savepoint, "execute", "INSERT INTO items VALUES (3, 'released')")
            driver.call(tx, "execute", "INSERT INTO items VALUES (4, 'after')")
        assert names(dsn) == ["kept", "released", "after"]

    def test_savepoints_nest_deeply_on_the_same_connection(self, db: Database, table: str, dsn: str) -> None:
        with db.transaction() as tx, tx.transaction() as a, a.transaction() as b:
            b.execute("INSERT INTO items VALUES (1, 'deep')")
            assert b.fetchval("SELECT pg_backend_pid()") == tx.fetchval("SELECT pg_backend_pid()")
        assert names(dsn) == ["deep"]

    def test_the_callers_exception_in_a_savepoint_leaves_the_transaction_usable(
        self, db: Database, table: str, dsn: str
    ) -> None:
        with db.transaction() as tx:
            try:
                with tx.transaction() as savepoint:
                    savepoint.execute("INSERT INTO items VALUES (1, 'undone')")
                    raise KeyError("the caller's own code")
            except KeyError:
                pass
            tx.execute("INSERT INTO items VALUES (2, 'kept')")
        assert names(dsn) == ["kept"]


class TestMisuse:
    def test_statements_after_the_block_raise_transaction_closed_error(
        self, db: Database, driver: Driver
    ) -> None:
        with driver.block(db.transaction()) as tx:
            pass
        with pytest.raises(TransactionClosedError, match="has ended: it was committed") as info:
            driver.call(tx, "fetchval", "SELECT 1")
        assert isinstance(info.value, RuntimeError)

    def test_statements_before_the_block_say_how_to_use_it(self, db: Database, driver: Driver) -> None:
        with pytest.raises(
            TransactionClosedError, match=r"use it in a block, 'with db.transaction\(\) as tx:'"
        ):
            driver.call(db.transaction(), "execute", "SELECT 1")

    def test_a_transaction_is_entered_once(self, db: Database, driver: Driver) -> None:
        tx = db.transaction()
        with driver.block(tx):
            pass
        with pytest.raises(TransactionClosedError, match=r"call db\.transaction\(\) .* again"):
            driver.enter(tx)
        assert db.stats().in_use == 0

    def test_a_blocking_statement_on_the_bridge_thread_raises_deadlock_error(self, db: Database) -> None:
        async def inside(conn: Any) -> None:
            with db.transaction():
                pass

        with pytest.raises(DeadlockError, match=r"await the async twin"):
            db.run(inside)
        assert db.stats().in_use == 0


class TestAbandoned:
    """Whatever way the block is left, or not left, the server ends up with no open transaction."""

    def test_a_statement_timeout_rolls_back_the_transaction(
        self, db: Database, table: str, dsn: str, schema: str, admin_dsn: str, driver: Driver
    ) -> None:
        def block() -> None:
            with driver.block(db.transaction()) as tx:
                driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
                driver.call(tx, "execute", "SELECT pg_sleep(60)", timeout=0.3)

        with pytest.raises(CallTimeoutError):
            block()
        settled(db, admin_dsn, schema)
        assert names(dsn) == []

    def test_command_timeout_in_a_transaction_is_a_timeout_not_a_lost_connection(
        self,
        dsn: str,
        bridge: Bridge,
        schema: str,
        admin_dsn: str,
        driver: Driver,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        # asyncpg's command_timeout raises a bare TimeoutError, an OSError on 3.11+: it was taken for a
        # lost connection ("the server rolled the transaction back"), the connection was released still
        # inside the transaction, and asyncpg logged "Resetting connection with an active transaction".
        db = Database(dsn, bridge=bridge, command_timeout=0.3)
        try:
            db.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)")
            transaction = db.transaction()

            def block() -> None:
                with driver.block(transaction) as tx:
                    driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
                    driver.call(tx, "execute", "SELECT pg_sleep(10)")

            with caplog.at_level(logging.DEBUG), pytest.raises(CallTimeoutError) as raised:
                block()
            assert "command_timeout=0.3" in str(raised.value)
            assert not isinstance(raised.value, ConnectionLostError)
            assert transaction.state == "rolled back"
            settled(db, admin_dsn, schema)
            assert names(dsn) == []
            assert "active transaction" not in caplog.text
            assert "lost" not in caplog.text
            assert db.fetchval("SELECT 1") == 1  # the connection went back to the pool, usable
        finally:
            db.close()

    def test_the_owner_thread_or_loop_ending_rolls_back_and_returns_the_connection(
        self, db: Database, table: str, dsn: str, schema: str, admin_dsn: str, driver: Driver
    ) -> None:
        tx = db.transaction()
        driver.enter(tx)  # entered and never exited, as code that died would leave it
        driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
        assert sessions(admin_dsn, schema, "idle in transaction") == 1
        driver.stop()  # the thread ends, or the loop is closed with nothing finished
        settled(db, admin_dsn, schema)
        assert tx.state == "rolled back"
        assert names(dsn) == []
        with pytest.raises(TransactionClosedError, match=r"rolled back because .* ended without closing it"):
            tx.execute("SELECT 1")

    def test_an_event_loop_left_unclosed_by_a_thread_that_ended_counts_as_gone(
        self, db: Database, table: str, dsn: str, schema: str, admin_dsn: str
    ) -> None:
        # Regression: the owner of an async with block was alive as long as its loop was not
        # closed, so a worker thread that ran a loop and returned left the transaction open for as long
        # as the handle lived.
        held: list[Transaction] = []

        async def begin() -> None:
            tx = db.transaction()
            await tx.__aenter__()  # entered and never exited
            await tx.aexecute("INSERT INTO items VALUES (1, 'one')")
            held.append(tx)

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_until_complete, args=(begin(),))
        thread.start()
        thread.join(WAIT)
        try:
            assert held, "the transaction did not begin"
            settled(db, admin_dsn, schema)
            assert held[0].state == "rolled back"  # still referenced: the owner watch ended it
            assert names(dsn) == []
        finally:
            loop.close()

    def test_a_transaction_dropped_without_its_block_ending_is_rolled_back(
        self, db: Database, table: str, dsn: str, schema: str, admin_dsn: str, driver: Driver
    ) -> None:
        tx = db.transaction()
        driver.enter(tx)
        driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
        del tx
        gc.collect()
        settled(db, admin_dsn, schema)
        assert names(dsn) == []

    def test_cancelling_the_awaiting_task_rolls_back(
        self, db: Database, table: str, dsn: str, schema: str, admin_dsn: str
    ) -> None:
        async def main() -> None:
            entered = asyncio.Event()

            async def work(statement: str) -> None:
                async with db.transaction() as tx:
                    await tx.aexecute("INSERT INTO items VALUES (1, 'one')")
                    entered.set()
                    if statement:
                        await tx.aexecute(statement)
                    else:
                        await asyncio.sleep(30)  # the caller's own await, between statements

            for statement in ("SELECT pg_sleep(60)", ""):
                entered.clear()
                task = asyncio.create_task(work(statement))
                await asyncio.wait_for(entered.wait(), WAIT)
                await asyncio.sleep(0.1)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

        run_loop(main)
        settled(db, admin_dsn, schema)
        assert names(dsn) == []
        assert sessions(admin_dsn, schema, "active") == 0

    def test_cancelled_while_waiting_for_a_connection_leaves_nothing_held(
        self, dsn: str, bridge: Bridge, schema: str, admin_dsn: str
    ) -> None:
        db = Database(dsn, bridge=bridge, max_size=1)
        holder = db.transaction()
        holder.__enter__()

        async def main() -> None:
            task = asyncio.create_task(db.transaction().__aenter__())
            await asyncio.sleep(0.3)  # it is waiting for the pool's only connection
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run_loop(main)
        holder.__exit__(None, None, None)
        settled(db, admin_dsn, schema)
        assert db.fetchval("SELECT 1") == 1
        db.close()

    def test_ctrl_c_in_the_block_rolls_back(self, dsn: str) -> None:
        out = run_script(
            """
            import signal, sys, threading, time
            signal.signal(signal.SIGINT, signal.default_int_handler)  # see tests.support.CTRL_C
            from loopbridge import Database
            db = Database(sys.argv[1], max_size=2)
            db.execute("CREATE TABLE ctrl_c (id int)")
            main = threading.main_thread().ident
            for where in ("between statements", "during a statement"):
                threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT)).start()
                try:
                    with db.transaction() as tx:
                        tx.execute("INSERT INTO ctrl_c VALUES (1)")
                        if where == "between statements":
                            time.sleep(30)
                        else:
                            tx.execute("SELECT pg_sleep(60)")
                except KeyboardInterrupt:
                    print(where, "interrupted;", "state:", tx.state, "in use:", db.stats().in_use)
            print("rows:", db.fetchval("SELECT count(*) FROM ctrl_c"))
            db.execute("DROP TABLE ctrl_c")
            db.close()
            """,
            args=(dsn,),
        )
        assert "between statements interrupted; state: rolled back in use: 0" in out
        assert "during a statement interrupted; state: rolled back in use: 0" in out
        assert "rows: 0" in out

    def test_an_open_transaction_holds_its_connection_so_others_time_out(
        self, dsn: str, bridge: Bridge, driver: Driver
    ) -> None:
        db = Database(dsn, bridge=bridge, max_size=1, pool_timeout=0.3)
        with db.transaction():
            with pytest.raises(PoolTimeoutError, match=r"within pool_timeout=0.3 s: all 1 connections"):
                driver.call(db, "fetchval", "SELECT 1")
            assert db.stats().in_use == 1
        assert db.fetchval("SELECT 1") == 1
        db.close()


class TestLostConnection:
    def test_a_terminated_backend_ends_the_transaction_and_says_so(
        self, db: Database, table: str, dsn: str, schema: str, admin_dsn: str, driver: Driver
    ) -> None:
        tx = db.transaction()

        def block() -> None:
            with driver.block(tx):
                driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
                terminate(admin_dsn, schema, "idle in transaction")
                # The statement sent on the broken connection raises ConnectionLostError if it went out
                # before the loss was noticed, TransactionClosedError otherwise; every later one the latter.
                with pytest.raises((ConnectionLostError, TransactionClosedError)):
                    driver.call(tx, "execute", "INSERT INTO items VALUES (2, 'two')")
                with pytest.raises(TransactionClosedError, match="connection to the server was lost"):
                    driver.call(tx, "execute", "INSERT INTO items VALUES (3, 'three')")

        with pytest.raises(TransactionClosedError, match="cannot commit") as info:
            block()
        assert "Nothing it did was committed" in str(info.value)
        assert tx.state == "lost"
        settled(db, admin_dsn, schema)
        assert names(dsn) == []
        assert driver.call(db, "fetchval", "SELECT 1") == 1  # the pool replaced the connection

    def test_closing_the_database_under_an_open_transaction_says_so(
        self, dsn: str, bridge: Bridge, table: str, driver: Driver
    ) -> None:
        db = Database(dsn, bridge=bridge)
        tx = db.transaction()

        def block() -> None:
            with driver.block(tx):
                driver.call(tx, "execute", "INSERT INTO items VALUES (1, 'one')")
                db.close(timeout=0.2)  # the transaction does not end within 0.2 s: its connection is ended
                with pytest.raises(DatabaseClosedError, match="was open when its Database was closed"):
                    driver.call(tx, "execute", "INSERT INTO items VALUES (2, 'two')")

        with pytest.raises(DatabaseClosedError, match="Nothing it did was committed"):
            block()  # the commit at the end of the block
        assert names(dsn) == []

    def test_a_statement_running_when_the_backend_dies_raises_connection_lost_error(
        self, db: Database, schema: str, admin_dsn: str
    ) -> None:
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with db.transaction() as tx:
                    tx.execute("SELECT pg_sleep(60)")
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        wait_until(lambda: sessions(admin_dsn, schema, "active") == 1)
        terminate(admin_dsn, schema, "active")
        thread.join(WAIT)
        assert len(errors) == 1
        assert isinstance(errors[0], ConnectionLostError)
        assert "nothing it did was committed" in str(errors[0])
        assert isinstance(
            errors[0].__cause__, (asyncpg.ConnectionDoesNotExistError, asyncpg.AdminShutdownError)
        )
        settled(db, admin_dsn, schema)
        assert db.fetchval("SELECT 1") == 1


class TestTwinContexts:
    """loopbridge._twins.twin_contexts, which gives Transaction (and streams, subscriptions) their four
    context-manager methods."""

    class Held:
        def __init__(self, bridge: Bridge) -> None:
            self.bridge = bridge
            self.log: list[str] = []

        async def _open(self, owner: Any) -> str:
            self.log.append("open")
            return "held"

        async def _close(self, error: BaseException | None) -> None:
            await asyncio.sleep(0.05)
            self.log.append(f"close {type(error).__name__}")

        __enter__, __exit__, __aenter__, __aexit__ = twin_contexts(_open, _close)

    def test_entering_that_fails_on_the_callers_side_still_closes_on_the_bridge(self) -> None:
        # The bridge side opened, but the caller was cancelled before it could receive the result: no
        # block will ever exit, so the exit runs anyway.
        with Bridge("twin-contexts") as bridge:
            held = self.Held(bridge)

            async def main() -> None:
                task = asyncio.create_task(held.__aenter__())
                await asyncio.sleep(0)  # the call is on its way
                time.sleep(0.3)  # noqa: ASYNC251  # on purpose: busy while the bridge opens and answers
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

            run_loop(main)
            wait_until(lambda: held.log == ["open", "close CancelledError"])

    def test_the_exit_runs_to_completion_even_when_the_caller_stops_waiting(self) -> None:
        with Bridge("twin-contexts") as bridge:
            held = self.Held(bridge)

            async def main() -> None:
                await held.__aenter__()
                task = asyncio.create_task(held.__aexit__(None, None, None))
                await asyncio.sleep(0.01)  # the exit is running on the bridge (it takes 50 ms)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

            run_loop(main)
            wait_until(lambda: held.log == ["open", "close NoneType"])

    def test_the_exit_runs_even_when_the_caller_stops_waiting_before_it_started(self) -> None:
        # Regression: a task cancelled while its exit call was still queued on a busy bridge loop
        # had the exit closed unrun; the transaction stayed idle in transaction until garbage collection.
        with Bridge("twin-contexts", block_threshold=None) as bridge:
            held = self.Held(bridge)
            blocking, busy = threading.Event(), threading.Event()

            async def block_the_bridge_loop() -> None:
                blocking.set()
                busy.wait(WAIT)  # on purpose: the exit call queues behind this

            async def main() -> None:
                await held.__aenter__()
                bridge.submit(block_the_bridge_loop)
                await asyncio.to_thread(blocking.wait, WAIT)
                task = asyncio.create_task(held.__aexit__(None, None, None))
                await asyncio.sleep(0.1)  # the exit call is queued; the bridge loop cannot start it
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert held.log == ["open"]

            try:
                run_loop(main)
            finally:
                busy.set()
            wait_until(lambda: held.log == ["open", "close NoneType"])

    def test_ctrl_c_before_the_exit_started_still_ends_the_transaction(self, dsn: str) -> None:
        # Regression: the same for a sync caller, interrupted while its COMMIT waited to start.
        out = run_script(
            """
            import signal, sys, threading, time
            signal.signal(signal.SIGINT, signal.default_int_handler)  # see tests.support.CTRL_C
            from loopbridge import Bridge, Database
            bridge = Bridge("ctrl-c", block_threshold=None)
            db = Database(sys.argv[1], bridge=bridge, max_size=2)
            db.execute("CREATE TABLE ctrl_c (id int)")
            blocking, busy = threading.Event(), threading.Event()

            async def block_the_bridge_loop():
                blocking.set()
                busy.wait(30)

            main = threading.main_thread().ident
            try:
                with db.transaction() as tx:
                    tx.execute("INSERT INTO ctrl_c VALUES (1)")
                    bridge.submit(block_the_bridge_loop)  # the COMMIT queues behind this
                    blocking.wait(30)
                    threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()
            except KeyboardInterrupt:
                print("interrupted while", tx.state)
            busy.set()
            deadline = time.monotonic() + 10
            while tx.state == "active" and time.monotonic() < deadline:
                time.sleep(0.02)
            print("state:", tx.state, "in use:", db.stats().in_use)
            print("rows:", db.fetchval("SELECT count(*) FROM ctrl_c"))
            db.execute("DROP TABLE ctrl_c")
            db.close(timeout=2)
            bridge.close()
            """,
            args=(dsn,),
        )
        assert "interrupted while active" in out
        assert "state: committed in use: 0" in out  # the block had ended normally: its COMMIT ran
        assert "rows: 1" in out

    def test_an_exit_waits_for_an_enter_still_unwinding_on_the_bridge(self) -> None:
        # Regression (found by the stress suite): a caller cancelled while entering stops waiting after a
        # grace period; the exit that follows ran before the enter had finished, found nothing open, and
        # what the enter then opened was left for the garbage collector to end.
        class SlowToUnwind:
            def __init__(self, bridge: Bridge) -> None:
                self.bridge = bridge
                self.log: list[str] = []
                self.entering = threading.Event()

            async def _open(self, owner: Any) -> str:
                self.entering.set()
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    await asyncio.sleep(1.5)  # longer than the caller's grace: like a slow BEGIN
                    self.log.append("opened anyway")
                    return "held"
                return "held"

            async def _close(self, error: BaseException | None) -> None:
                self.log.append("closed" if self.log else "closed before it opened")

            __enter__, __exit__, __aenter__, __aexit__ = twin_contexts(_open, _close)

        with Bridge("twin-contexts") as bridge:
            held = SlowToUnwind(bridge)

            async def main() -> None:
                task = asyncio.create_task(held.__aenter__())
                await asyncio.to_thread(held.entering.wait, WAIT)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

            run_loop(main)
            wait_until(lambda: len(held.log) == 2)
            assert held.log == ["opened anyway", "closed"]
