"""Pinning (``loopbridge._pin``): every call on one connection, taking turns, for rolled-back tests.

Private, but the rollback fixture of the pytest plugin and transactions inside such a test rest on it:
every connection a pinned Database hands out must be the pinned one, from any caller, except a LISTEN's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any

import asyncpg
import pytest
from asyncpg.transaction import Transaction

from loopbridge import Database, Notification, PoolTimeoutError
from loopbridge._pin import PinnedSource, pin, unpin
from tests.support import WAIT, Caller, all_released, in_thread, independent, run_loop


async def _pin_and_begin(db: Database) -> Transaction:
    pinned = await pin(db)
    async with pinned.turn():
        transaction = pinned.con.transaction()
        await transaction.start()
    return transaction


async def _rollback_and_unpin(db: Database, transaction: Transaction) -> None:
    pinned = db._source
    assert isinstance(pinned, PinnedSource)
    async with pinned.turn():
        await transaction.rollback()
    await unpin(db)


def is_pinned(db: Database) -> bool:
    return isinstance(db._source, PinnedSource) and not db._source.gone


@pytest.fixture
def pinned(db: Database) -> Database:
    db.execute("CREATE TABLE items (n int PRIMARY KEY)")
    db.bridge.run(pin, db)
    return db


class TestPinned:
    def test_every_call_uses_the_pinned_connection(self, pinned: Database, caller: Caller) -> None:
        pid = pinned.fetchval("SELECT pg_backend_pid()")
        assert caller.call(pinned, "fetchval", "SELECT pg_backend_pid()") == pid
        assert caller.call(pinned, "fetchrow", "SELECT pg_backend_pid()")[0] == pid
        assert caller.call(pinned, "fetch", "SELECT pg_backend_pid()")[0][0] == pid

        async def backend(con: Any) -> int:
            return int(await con.fetchval("SELECT pg_backend_pid()"))

        assert caller.call(pinned, "run", backend) == pid

    def test_concurrent_callers_take_turns_on_it(self, pinned: Database) -> None:
        def insert(n: int) -> int:
            pinned.execute("INSERT INTO items VALUES ($1)", n)
            return int(pinned.fetchval("SELECT pg_backend_pid()"))

        async def ainsert(n: int) -> int:
            await pinned.aexecute("INSERT INTO items VALUES ($1)", n)
            return int(await pinned.afetchval("SELECT pg_backend_pid()"))

        async def many() -> list[int]:
            return await asyncio.gather(*(ainsert(n) for n in range(100, 140)))

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(insert, n) for n in range(40)]
            pids = set(run_loop(many)) | {future.result(timeout=WAIT) for future in futures}
        assert len(pids) == 1
        assert pinned.fetchval("SELECT count(*) FROM items") == 80

    def test_a_call_inside_db_run_reenters_instead_of_deadlocking(self, pinned: Database) -> None:
        async def nested(con: Any) -> tuple[int, int, int]:
            outer = await con.fetchval("SELECT pg_backend_pid()")
            inner = await pinned.afetchval("SELECT pg_backend_pid()")
            deeper = await pinned.arun(lambda c: c.fetchval("SELECT pg_backend_pid()"))
            return outer, inner, deeper

        outer, inner, deeper = pinned.run(nested, timeout=WAIT)
        assert outer == inner == deeper
        assert pinned.fetchval("SELECT 1", timeout=WAIT) == 1  # the turn was passed on

    def test_concurrent_calls_started_inside_db_run_time_out_with_a_clear_error(self, dsn: str) -> None:
        db = Database(dsn, max_size=2, pool_timeout=0.5)
        try:
            db.bridge.run(pin, db)

            async def gathers(con: Any) -> object:
                # A child task waits for the turn that its parent holds.
                return await asyncio.gather(db.afetchval("SELECT 1"))

            with pytest.raises(PoolTimeoutError, match=r"pinned to one connection.*take turns"):
                db.run(gathers, timeout=WAIT)
            assert db.fetchval("SELECT 2", timeout=WAIT) == 2
        finally:
            db.close()

    def test_unpin_returns_the_connection_to_the_pool_and_rolls_back(self, db: Database, dsn: str) -> None:
        db.execute("CREATE TABLE items (n int)")
        transaction = db.bridge.run(_pin_and_begin, db)
        db.execute("INSERT INTO items VALUES (1)")
        assert db.fetchval("SELECT count(*) FROM items") == 1
        assert independent(dsn, "SELECT count(*) FROM items")[0][0] == 0  # not committed
        db.bridge.run(_rollback_and_unpin, db, transaction)
        assert db.fetchval("SELECT count(*) FROM items") == 0
        assert not is_pinned(db)
        all_released(db)
        db.bridge.run(unpin, db)  # safe twice

    def test_a_transaction_inside_the_pinned_one_is_a_savepoint(self, db: Database) -> None:
        db.execute("CREATE TABLE items (n int)")
        transaction = db.bridge.run(_pin_and_begin, db)
        db.execute("INSERT INTO items VALUES (1)")

        async def fails_inside(con: Any) -> None:
            async with con.transaction():
                await con.execute("INSERT INTO items VALUES (2)")
                raise LookupError("undo the savepoint")

        with pytest.raises(LookupError):
            db.run(fails_inside)
        assert db.fetchval("SELECT count(*) FROM items") == 1  # the outer transaction lives on
        db.bridge.run(_rollback_and_unpin, db, transaction)
        assert db.fetchval("SELECT count(*) FROM items") == 0

    def test_pinning_twice_is_refused(self, pinned: Database) -> None:
        with pytest.raises(RuntimeError, match="already pinned"):
            pinned.bridge.run(pin, pinned)

    def test_unpin_waits_for_the_call_holding_the_connection(self, pinned: Database) -> None:
        async def scenario() -> str:
            running = asyncio.ensure_future(pinned.aexecute("SELECT pg_sleep(0.3)"))
            await asyncio.sleep(0.05)
            await unpin(pinned, timeout=WAIT)
            return await running

        assert pinned.bridge.run(scenario, timeout=WAIT) == "SELECT 1"
        assert not is_pinned(pinned)
        all_released(pinned)

    def test_unpin_terminates_a_connection_held_too_long(
        self, pinned: Database, caplog: pytest.LogCaptureFixture
    ) -> None:
        async def scenario() -> type[BaseException] | None:
            # Short, and distinct: the server runs it to its end even once the connection is gone.
            stuck = asyncio.ensure_future(pinned.aexecute("SELECT pg_sleep(3) -- loopbridge: stuck holder"))
            await asyncio.sleep(0.1)
            with caplog.at_level(logging.WARNING, logger="loopbridge"):
                await unpin(pinned, timeout=0.2)
            # Callers no longer wait for the pinned connection: they use the pool.
            assert await pinned.afetchval("SELECT 1") == 1
            try:
                await asyncio.wait_for(stuck, WAIT)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError) as exc:
                return type(exc)
            return None

        assert pinned.bridge.run(scenario, timeout=WAIT) is not None
        assert "terminating it" in caplog.text
        assert not is_pinned(pinned)
        all_released(pinned)

    def test_closing_a_pinned_database_returns_its_connection_first(
        self, pinned: Database, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.WARNING, logger="loopbridge"):
            pinned.close(timeout=5)
        assert not is_pinned(pinned)
        assert "terminating" not in caplog.text  # returned, not cut off when the pool closed

    def test_a_subscription_listens_on_a_connection_of_its_own(
        self, pinned: Database, dsn: str, caller: Caller
    ) -> None:
        # LISTEN inside the test's transaction would take effect only at a COMMIT that never comes.
        with pinned.listen("pinned_events") as subscription:
            independent(dsn, "SELECT pg_notify('pinned_events', 'seen')")
            item = subscription.get(timeout=WAIT)
            assert isinstance(item, Notification)
            assert item.payload == "seen"
            # Meanwhile the pinned connection serves the plain calls, from every kind of caller.
            assert caller.call(pinned, "fetchval", "SELECT 1") == 1


class TestTransactionsOnAPinnedDatabase:
    """A transaction on a pinned Database takes the connection one step at a time, so code inside the
    block may still call the plain Database (regression: it waited for the block until
    PoolTimeoutError)."""

    def test_plain_calls_inside_a_transaction_block_do_not_wait(self, dsn: str, bridge: Any) -> None:
        db = Database(dsn, bridge=bridge, max_size=2, pool_timeout=5)
        db.execute("CREATE TABLE items (n int PRIMARY KEY)")
        db.bridge.run(pin, db)
        try:
            pid = db.fetchval("SELECT pg_backend_pid()")
            with db.transaction() as tx:
                tx.execute("INSERT INTO items VALUES (1)")
                # The plain call runs on the same session, inside the transaction.
                assert db.fetchval("SELECT count(*) FROM items", timeout=WAIT) == 1
                assert db.fetchval("SELECT pg_backend_pid()") == pid
                tx.execute("INSERT INTO items VALUES (2)")
            assert db.fetchval("SELECT count(*) FROM items") == 2
        finally:
            db.bridge.run(unpin, db)
            db.close()

    def test_by_caller_kind(self, pinned: Database, caller: Caller) -> None:
        async def inside_a_transaction() -> int:
            async with pinned.transaction() as tx:
                await tx.aexecute("INSERT INTO items VALUES (7)")
                return int(await pinned.afetchval("SELECT count(*) FROM items", timeout=WAIT))

        def blocking() -> int:
            with pinned.transaction() as tx:
                tx.execute("INSERT INTO items VALUES (7)")
                return int(pinned.fetchval("SELECT count(*) FROM items", timeout=WAIT))

        if caller.kind == "foreign-loop":
            assert run_loop(inside_a_transaction) == 1
        elif caller.kind == "sync-thread":
            assert in_thread(blocking) == 1
        else:

            async def blocking_in_a_loop() -> int:
                return blocking()

            assert run_loop(blocking_in_a_loop) == 1

    def test_a_failed_block_rolls_back_only_its_own_savepoint(self, pinned: Database) -> None:
        def fails_halfway() -> None:
            with pinned.transaction() as tx:
                tx.execute("INSERT INTO items VALUES (2)")
                raise RuntimeError("undo")

        pinned.execute("INSERT INTO items VALUES (1)")
        with pytest.raises(RuntimeError, match="undo"):
            fails_halfway()
        assert pinned.fetchval("SELECT count(*) FROM items") == 1
