"""Streaming rows: a cursor on the bridge loop, batches through a bounded pipe, and every way of stopping
early giving the connection back. (Memory bounded by prefetch: benchmarks/stream_memory.py.)"""

from __future__ import annotations

import asyncio
import gc
import threading
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
    RowStream,
    TransactionClosedError,
)
from loopbridge._dead import CONNECTION_FAILURES
from loopbridge._stream import Stream
from tests.boundary import Driver, sessions, settled, terminate, wait_until
from tests.support import WAIT, independent, run_loop, run_script

SERIES = "SELECT g FROM generate_series(1, $1::int) AS g"
#: Rows that take a while each: a stream of it is usually waiting for the server.
SLOW = "SELECT g, pg_sleep(0.2) FROM generate_series(1, 50) AS g"
#: Cursors open in the session (the unnamed portal is the query asking).
OPEN_CURSORS = "SELECT count(*) FROM pg_cursors WHERE name <> ''"


class TestRows:
    def test_every_row_arrives_in_order(self, db: Database, driver: Driver) -> None:
        rows = driver.drain(db.iterate(SERIES, 10_000, prefetch=97))
        assert [row["g"] for row in rows] == list(range(1, 10_001))
        assert all(isinstance(row, asyncpg.Record) for row in rows)
        assert db.stats().in_use == 0  # the end of the rows means the connection is back

    def test_iterate_returns_a_row_stream_for_every_caller(self, db: Database, driver: Driver) -> None:
        stream = db.iterate(SERIES, 5, prefetch=2)
        assert isinstance(stream, RowStream)
        assert [row[0] for row in driver.drain(stream)] == [1, 2, 3, 4, 5]

    def test_an_empty_result_and_an_exact_multiple_of_prefetch(self, db: Database, driver: Driver) -> None:
        assert driver.drain(db.iterate(SERIES, 0)) == []
        assert len(driver.drain(db.iterate(SERIES, 30, prefetch=10))) == 30

    def test_an_sql_error_is_raised_by_the_first_step_and_the_connection_returned(
        self, db: Database, driver: Driver, admin_dsn: str, schema: str
    ) -> None:
        stream = db.iterate("SELECT * FROM no_such_table")
        with pytest.raises(asyncpg.UndefinedTableError):
            driver.next(stream)
        settled(db, admin_dsn, schema)

    def test_an_error_in_the_middle_is_raised_after_the_rows_before_it(
        self, db: Database, driver: Driver
    ) -> None:
        stream = db.iterate("SELECT 10 / (5 - g) FROM generate_series(1, 10) AS g", prefetch=2)
        assert [driver.next(stream)[0] for _ in range(4)] == [2, 3, 5, 10]
        with pytest.raises(asyncpg.DivisionByZeroError):
            driver.next(stream)
        with pytest.raises(StopIteration):
            driver.next(stream)
        assert db.stats().in_use == 0

    def test_the_stream_commits_its_own_transaction_only_when_every_row_was_read(
        self, db: Database, driver: Driver
    ) -> None:
        db.execute("CREATE TABLE jobs (id int)")
        db.executemany("INSERT INTO jobs VALUES ($1)", [(i,) for i in range(10)])
        taking = "WITH taken AS (DELETE FROM jobs RETURNING id) SELECT id FROM taken"

        stream = db.iterate(taking, prefetch=3)
        driver.next(stream)
        driver.call(stream, "close")  # stopped early: rolled back
        assert db.fetchval("SELECT count(*) FROM jobs") == 10

        assert len(driver.drain(db.iterate(taking, prefetch=3))) == 10  # read to the end: committed
        assert db.fetchval("SELECT count(*) FROM jobs") == 0

    def test_a_bad_prefetch_is_refused(self, db: Database) -> None:
        with pytest.raises(ConfigurationError, match="prefetch must be a positive number of rows, not 0"):
            db.iterate("SELECT 1", prefetch=0)


class TestBackpressure:
    @pytest.mark.slow  # waits out timeouts: 2 s or more
    def test_the_producer_waits_while_the_consumer_is_slow(
        self, db: Database, dsn: str, driver: Driver
    ) -> None:
        # Each row fetched by the cursor calls nextval(): the sequence shows how far the producer got,
        # and a sequence is visible to other sessions at once.
        db.execute("CREATE SEQUENCE produced")
        stream = db.iterate("SELECT nextval('produced') FROM generate_series(1, 100000)", prefetch=10)
        assert driver.next(stream)[0] == 1

        def produced() -> int:
            value: int = independent(dsn, "SELECT last_value FROM produced")[0][0]
            return value

        last = [-1]

        def quiet() -> bool:  # no progress between two looks: the producer is waiting
            now, last[0] = produced(), produced()
            return now == last[0]

        wait_until(quiet, what="the producer to stop")
        # One batch consumed, one queued, one fetched and waiting to be queued: nowhere near 100000.
        assert produced() <= 4 * 10
        assert len(driver.drain(stream)) == 100_000 - 1


class TestStoppingEarly:
    """Whatever stops the consumer, the cursor is closed and the connection returned."""

    def test_close_returns_the_connection_before_it_returns(
        self, db: Database, driver: Driver, admin_dsn: str, schema: str
    ) -> None:
        stream = db.iterate(SERIES, 100_000, prefetch=100)
        driver.next(stream)
        assert db.stats().in_use == 1
        driver.call(stream, "close")
        assert db.stats().in_use == 0
        assert sessions(admin_dsn, schema, "idle in transaction") == 0
        driver.call(stream, "close")  # twice is fine
        with pytest.raises(StopIteration):
            driver.next(stream)

    def test_a_with_block_closes_it(self, db: Database, driver: Driver, admin_dsn: str, schema: str) -> None:
        with driver.block(db.iterate(SERIES, 100_000, prefetch=100)) as rows:
            assert driver.next(rows)[0] == 1
        assert db.stats().in_use == 0
        settled(db, admin_dsn, schema)
        # Entering it again is harmless: it stays closed.
        with driver.block(rows) as again, pytest.raises(StopIteration):
            driver.next(again)

    def test_breaking_out_of_the_loop_returns_the_connection(
        self, db: Database, driver: Driver, admin_dsn: str, schema: str
    ) -> None:
        def sync() -> int:
            for row in db.iterate(SERIES, 100_000, prefetch=100):
                if row[0] == 150:
                    break
            return 150

        async def async_() -> int:
            async for row in db.iterate(SERIES, 100_000, prefetch=100):
                if row[0] == 150:
                    break
            return 150

        assert driver.do(sync, async_) == 150
        gc.collect()
        settled(db, admin_dsn, schema)

    def test_an_exception_in_the_loop_body_returns_the_connection(
        self, db: Database, driver: Driver, admin_dsn: str, schema: str
    ) -> None:
        class ConsumerFailed(Exception):
            pass

        def sync() -> None:
            for row in db.iterate(SERIES, 100_000, prefetch=100):
                if row[0] == 10:
                    raise ConsumerFailed

        async def async_() -> None:
            async for row in db.iterate(SERIES, 100_000, prefetch=100):
                if row[0] == 10:
                    raise ConsumerFailed

        with pytest.raises(ConsumerFailed):
            driver.do(sync, async_)
        gc.collect()
        settled(db, admin_dsn, schema)

    def test_a_dropped_stream_is_closed(
        self, db: Database, driver: Driver, admin_dsn: str, schema: str
    ) -> None:
        stream = db.iterate(SERIES, 100_000, prefetch=100)
        driver.next(stream)
        del stream
        gc.collect()
        settled(db, admin_dsn, schema)

    def test_the_owner_going_away_closes_it(
        self, db: Database, driver: Driver, admin_dsn: str, schema: str
    ) -> None:
        stream = db.iterate(SERIES, 100_000, prefetch=100)
        driver.next(stream)
        driver.stop()
        settled(db, admin_dsn, schema)
        assert stream is not None  # still referenced: the owner watch, not the finalizer, closed it

    def test_a_timeout_waiting_for_rows_closes_the_stream(
        self, db: Database, driver: Driver, admin_dsn: str, schema: str
    ) -> None:
        stream = db.iterate("SELECT pg_sleep(60)", timeout=0.3)
        with pytest.raises(CallTimeoutError):
            driver.next(stream)
        assert db.stats().in_use == 0  # closed before the error was raised
        settled(db, admin_dsn, schema)
        assert sessions(admin_dsn, schema, "active") == 0

    def test_cancelling_the_awaiting_task_closes_the_stream(
        self, db: Database, admin_dsn: str, schema: str
    ) -> None:
        async def main() -> None:
            async def consume() -> None:
                async for _ in db.iterate("SELECT pg_sleep(60)"):
                    pass

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run_loop(main)
        gc.collect()
        settled(db, admin_dsn, schema)
        assert sessions(admin_dsn, schema, "active") == 0

    def test_the_end_of_its_block_closes_it_even_if_the_caller_stopped_waiting_before_it_began(
        self, dsn: str, admin_dsn: str, schema: str
    ) -> None:
        # Regression: a task cancelled while its exit call still waited to start on a busy bridge
        # loop had that exit dropped: the stream stayed open as long as its owner lived.
        driver = Driver("foreign-loop")  # its loop keeps running: the owner watch does not step in
        with Bridge("stream-exit", block_threshold=None) as bridge:
            db = Database(dsn, bridge=bridge)
            blocking, busy = threading.Event(), threading.Event()
            streams: list[Stream[Any]] = []

            async def block_the_bridge_loop() -> None:
                blocking.set()
                busy.wait(WAIT)  # on purpose: the exit call queues behind this

            async def consume() -> None:
                async with db.iterate(SERIES, 100_000, prefetch=100) as rows:
                    streams.append(rows)
                    await rows.__anext__()
                    bridge.submit(block_the_bridge_loop)
                    await asyncio.to_thread(blocking.wait, WAIT)

            async def main() -> None:
                task = asyncio.create_task(consume())
                await asyncio.to_thread(blocking.wait, WAIT)
                await asyncio.sleep(0.1)  # consume() waits for its exit call, which cannot start
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

            try:
                driver.do(lambda: None, main)
                busy.set()
                settled(db, admin_dsn, schema)
                assert streams  # still referenced, and its owner still running: the exit itself closed it
            finally:
                busy.set()
                driver.stop()
                db.close()

    def test_ctrl_c_while_waiting_for_rows(self, dsn: str) -> None:
        out = run_script(
            """
            import signal, sys, threading, time
            signal.signal(signal.SIGINT, signal.default_int_handler)  # see tests.support.CTRL_C
            from loopbridge import Database
            db = Database(sys.argv[1])
            main = threading.main_thread().ident
            threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT)).start()
            try:
                for row in db.iterate("SELECT pg_sleep(60)"):
                    pass
            except KeyboardInterrupt:
                print("interrupted")
            deadline = time.monotonic() + 10
            while db.stats().in_use and time.monotonic() < deadline:
                time.sleep(0.02)
            print("in use:", db.stats().in_use)
            db.close()
            """,
            args=(dsn,),
        )
        assert "interrupted" in out
        assert "in use: 0" in out


class TestInATransaction:
    def test_statements_may_run_between_rows(self, db: Database, dsn: str, driver: Driver) -> None:
        db.execute("CREATE TABLE items (id int PRIMARY KEY, seen bool NOT NULL DEFAULT false)")
        db.executemany("INSERT INTO items (id) VALUES ($1)", [(i,) for i in range(25)])
        with driver.block(db.transaction()) as tx:
            stream = tx.iterate("SELECT id FROM items ORDER BY id", prefetch=4)
            while True:
                try:
                    row = driver.next(stream)
                except StopIteration:
                    break
                driver.call(tx, "execute", "UPDATE items SET seen = true WHERE id = $1", row["id"])
            assert db.stats().in_use == 1  # the transaction's connection, and no other
        assert independent(dsn, "SELECT count(*) FROM items WHERE seen")[0][0] == 25

    def test_a_stream_still_open_when_its_transaction_ends_raises(self, db: Database, driver: Driver) -> None:
        with driver.block(db.transaction()) as tx:
            stream = tx.iterate(SERIES, 1000, prefetch=10)
            for _ in range(15):
                driver.next(stream)
        with pytest.raises(TransactionClosedError, match="its enclosing transaction ended"):
            driver.drain(stream)
        assert db.stats().in_use == 0

    @pytest.mark.parametrize("how", ["close", "with-block", "dropped"])
    def test_stopping_a_stream_early_leaves_its_transaction_usable(
        self, db: Database, dsn: str, driver: Driver, how: str
    ) -> None:
        # Regression: stopping a stream while its producer was fetching cancelled the query,
        # which aborted the caller's transaction; the block then "committed" and nothing was kept.
        db.execute("CREATE TABLE items (id int)")
        with driver.block(db.transaction()) as tx:
            driver.call(tx, "execute", "INSERT INTO items VALUES (1)")
            stream = tx.iterate(SLOW, prefetch=1)
            if how == "with-block":
                with driver.block(stream) as rows:
                    driver.next(rows)  # the producer goes on to fetch the next, slow, row
            else:
                driver.next(stream)
                if how == "close":
                    driver.call(stream, "close")
                else:  # an early break: the iterator is dropped
                    del stream
                    gc.collect()
            driver.call(tx, "execute", "INSERT INTO items VALUES (2)")
            if how != "dropped":  # closed before close() returned (a dropped one closes soon after)
                assert driver.call(tx, "fetchval", OPEN_CURSORS) == 0
        assert tx.state == "committed"
        assert independent(dsn, "SELECT count(*) FROM items")[0][0] == 2

    def test_closing_a_stream_does_not_hide_an_error_caught_in_its_transaction(
        self, db: Database, driver: Driver
    ) -> None:
        # Closing its cursor succeeds even in a transaction the server has aborted: that says nothing.
        db.execute("CREATE TABLE items (id int PRIMARY KEY)")
        tx = db.transaction()

        def block() -> None:
            with driver.block(tx):
                driver.call(tx, "execute", "INSERT INTO items VALUES (1)")
                stream = tx.iterate(SERIES, 100, prefetch=10)
                driver.next(stream)
                with pytest.raises(asyncpg.UniqueViolationError):
                    driver.call(tx, "execute", "INSERT INTO items VALUES (1)")
                driver.call(stream, "close")

        with pytest.raises(TransactionClosedError, match="could not commit"):
            block()
        assert db.fetchval("SELECT count(*) FROM items") == 0

    def test_a_block_ending_with_its_stream_mid_fetch_commits_everything(
        self, db: Database, dsn: str, driver: Driver
    ) -> None:
        db.execute("CREATE TABLE items (id int)")
        with driver.block(db.transaction()) as tx:
            driver.call(tx, "execute", "INSERT INTO items VALUES (1)")
            stream = tx.iterate(SLOW, prefetch=1)
            driver.next(stream)
        assert tx.state == "committed"
        assert independent(dsn, "SELECT count(*) FROM items")[0][0] == 1
        with pytest.raises(TransactionClosedError, match="its enclosing transaction ended"):
            driver.drain(stream)
        assert db.stats().in_use == 0

    def test_a_rolled_back_block_does_not_wait_for_its_streams_fetch(
        self, db: Database, driver: Driver, admin_dsn: str, schema: str
    ) -> None:
        class Undo(Exception):
            pass

        def block() -> None:
            with driver.block(db.transaction()) as tx:
                stream = tx.iterate("SELECT g, pg_sleep(g * 60) FROM generate_series(0, 1) g", prefetch=1)
                driver.next(stream)  # the producer now fetches a row that takes a minute
                raise Undo

        with pytest.raises(Undo):
            block()  # within the driver's bound, well under a minute: the fetch was cancelled
        settled(db, admin_dsn, schema)
        assert sessions(admin_dsn, schema, "active") == 0

    def test_a_timeout_waiting_for_rows_in_a_transaction_fails_the_block_if_caught(
        self, db: Database, dsn: str, driver: Driver
    ) -> None:
        # The timeout cancels the fetch, as a statement's timeout cancels the statement: the server
        # aborts the transaction, and a block that carries on must not report a commit.
        db.execute("CREATE TABLE items (id int)")
        tx = db.transaction()

        def block() -> None:
            with driver.block(tx):
                driver.call(tx, "execute", "INSERT INTO items VALUES (1)")
                with pytest.raises(CallTimeoutError):
                    driver.next(tx.iterate("SELECT pg_sleep(60)", timeout=0.3))

        with pytest.raises(TransactionClosedError, match="could not commit: a statement in it was cancelled"):
            block()
        assert tx.state == "rolled back"
        assert independent(dsn, "SELECT count(*) FROM items")[0][0] == 0

    def test_a_stream_in_a_rolled_back_transaction_sees_its_writes(
        self, db: Database, driver: Driver
    ) -> None:
        db.execute("CREATE TABLE items (id int)")

        class Undo(Exception):
            pass

        def block() -> list[Any]:
            with driver.block(db.transaction()) as tx:
                driver.call(tx, "execute", "INSERT INTO items SELECT generate_series(1, 5)")
                rows = driver.drain(tx.iterate("SELECT id FROM items ORDER BY id"))
                assert [row[0] for row in rows] == [1, 2, 3, 4, 5]
                raise Undo

        with pytest.raises(Undo):
            block()
        assert db.fetchval("SELECT count(*) FROM items") == 0


class TestLostConnection:
    @pytest.mark.parametrize("producer", ["waiting for the consumer", "fetching"])
    def test_a_lost_connection_under_a_stream_raises_connection_lost_error(
        self, db: Database, driver: Driver, admin_dsn: str, schema: str, producer: str
    ) -> None:
        # Regression: the consumer of db.iterate() got TransactionClosedError ("begin a new
        # transaction"), about a transaction it never opened.
        if producer == "fetching":  # the second row takes a minute: the producer is waiting for it
            stream = db.iterate("SELECT g, pg_sleep(g * 60) FROM generate_series(0, 1) AS g", prefetch=1)
            state = "active"
        else:  # the pipe is full: the producer waits for the consumer, the session is idle
            stream = db.iterate(SERIES, 100_000, prefetch=10)
            state = "idle in transaction"
        driver.next(stream)
        wait_until(lambda: sessions(admin_dsn, schema, state) == 1, what=f"the stream's session {state}")
        terminate(admin_dsn, schema, state)
        with pytest.raises(
            ConnectionLostError, match=r"iterate\(\) stopped: its connection was lost"
        ) as info:
            driver.drain(stream)
        assert isinstance(info.value.__cause__, CONNECTION_FAILURES)  # asyncpg's error
        settled(db, admin_dsn, schema)
        assert driver.call(db, "fetchval", "SELECT 1") == 1


class TestClosing:
    def test_a_database_closed_under_a_stream_says_so(self, dsn: str, driver: Driver) -> None:
        with Bridge("stream-close") as bridge:
            db = Database(dsn, bridge=bridge)
            stream = db.iterate(SERIES, 100_000, prefetch=10)
            driver.next(stream)
            db.close(timeout=0.2)  # the stream is not done within the timeout: its connection is ended
            with pytest.raises(DatabaseClosedError, match="was closed while rows were being read"):
                driver.drain(stream)

    def test_iterating_on_the_bridge_thread_raises_deadlock_error(self, db: Database) -> None:
        async def inside(conn: Any) -> None:
            for _ in db.iterate("SELECT 1"):
                pass

        with pytest.raises(DeadlockError):
            db.run(inside)
        assert db.stats().in_use == 0
