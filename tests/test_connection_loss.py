"""Connections that die: terminated backends, restarts, failed resets, work cancelled while it unwinds.

Most of these pin a bug the stress suite (``python -m stress``) found; each test says which. Backends are
terminated only if they belong to the test (selected by the test's ``application_name``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from loopbridge import Bridge, CallTimeoutError, ConnectionLostError, Database, TransactionClosedError
from tests.boundary import wait_until
from tests.pgcluster import PASSWORD, PrivateCluster
from tests.support import WAIT, Caller, all_released, independent, loop_held


def terminate(admin_dsn: str, application_name: str, *, when: str = "true") -> int:
    """pg_terminate_backend every backend of this test (and only those) matching *when*."""
    rows = independent(
        admin_dsn,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        f"WHERE application_name = $1 AND pid <> pg_backend_pid() AND {when}",
        application_name,
    )
    count: int = rows[0][0]
    return count


def terminate_once_running(admin_dsn: str, application_name: str, query: str) -> threading.Thread:
    """In a thread: wait until *query* runs on one of this test's backends, then terminate it."""

    def watch() -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if terminate(admin_dsn, application_name, when=f"state = 'active' AND query = '{query}'"):
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def asyncio_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    gc.collect()  # a Future or Task whose error nobody retrieved reports it when it is freed
    return [r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]


class TestLostDuringACall:
    def test_a_backend_terminated_mid_query_raises_connection_lost_error(
        self, db: Database, caller: Caller, admin_dsn: str, schema: str
    ) -> None:
        watcher = terminate_once_running(admin_dsn, schema, "SELECT pg_sleep(30)")
        with pytest.raises(ConnectionLostError) as info:
            caller.call(db, "execute", "SELECT pg_sleep(30)", timeout=WAIT)
        watcher.join(WAIT)
        message = str(info.value)
        assert f"database '{db._info.database}'" in message
        assert "was lost during the call" in message
        assert "retry" in message
        assert isinstance(info.value, ConnectionError)
        assert isinstance(info.value.__cause__, asyncpg.PostgresError)
        assert db.fetchval("SELECT 1") == 1  # the pool replaced the connection

    def test_a_transaction_in_run_that_loses_its_connection_raises_connection_lost_error(
        self, db: Database, caller: Caller, admin_dsn: str, schema: str
    ) -> None:
        """Stress suite: asyncpg's Transaction.__aexit__ reports the dead connection as an InterfaceError
        ("the underlying connection is closed"). It is a lost connection, and says so."""
        db.execute("CREATE TABLE t (k int)")

        async def transfer(conn: Any) -> None:
            async with conn.transaction():
                await conn.execute("INSERT INTO t VALUES (1)")
                await conn.execute("SELECT pg_sleep(30)")

        watcher = terminate_once_running(admin_dsn, schema, "SELECT pg_sleep(30)")
        with pytest.raises(ConnectionLostError, match="rolled back") as info:
            caller.call(db, "run", transfer, timeout=WAIT)
        watcher.join(WAIT)
        assert isinstance(info.value.__cause__, (asyncpg.InterfaceError, asyncpg.PostgresConnectionError))
        assert db.fetchval("SELECT count(*) FROM t") == 0  # the transaction did not commit

    def test_a_database_keeps_working_across_a_server_restart(self, cluster: PrivateCluster) -> None:
        with Bridge("restart") as bridge:
            db = Database(cluster.dsn(), bridge=bridge, min_size=2, max_size=4)
            assert db.fetchval("SELECT 1") == 1
            cluster.restart()
            # Every pooled connection died with the server; the next calls get fresh ones.
            assert [db.fetchval("SELECT $1::int", n) for n in range(6)] == list(range(6))
            assert PASSWORD not in repr(db)
            db.close()


class TestDeadPooledConnections:
    def test_a_connection_killed_while_idle_is_replaced_before_the_call_fails(
        self, dsn: str, bridge: Bridge, admin_dsn: str, schema: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Stress suite: a pooled connection whose backend was terminated while it sat idle, used before
        asyncpg saw its socket close, failed with "InternalClientError: cannot switch to state 15;
        another operation (2) is in progress". Nothing had been sent, so the call now runs again on a
        fresh connection, exactly once."""
        caplog.set_level(logging.DEBUG, logger="loopbridge")
        db = Database(dsn, bridge=bridge, min_size=1, max_size=1)
        db.execute("CREATE TABLE t (k int)")
        # The bridge loop is kept from reading the dead socket until the insert is already queued.
        with loop_held(bridge):
            assert terminate(admin_dsn, schema) == 1
            wait_until(
                lambda: (
                    not independent(
                        admin_dsn, "SELECT 1 FROM pg_stat_activity WHERE application_name = $1", schema
                    )
                )
            )
            insert = bridge.submit(db.aexecute, "INSERT INTO t VALUES (1)")
        assert insert.result(WAIT) == "INSERT 0 1"
        assert db.fetchval("SELECT count(*) FROM t") == 1
        assert any("dead before use; retrying" in r.getMessage() for r in caplog.records)

    def test_a_connection_that_dies_while_being_acquired_is_replaced(
        self, dsn: str, bridge: Bridge, admin_dsn: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Stress suite: a new connection whose backend was terminated as the pool set it up failed the
        call with "ConnectionDoesNotExistError: connection was closed during pool initialization"."""
        caplog.set_level(logging.DEBUG, logger="loopbridge")
        made: list[asyncpg.Connection] = []

        async def connect_then_die_once(*args: Any, **kwargs: Any) -> asyncpg.Connection:
            connection: asyncpg.Connection = await asyncpg.connect(*args, **kwargs)
            made.append(connection)
            if len(made) == 1:  # the first one dies before the pool hands it out
                closed = asyncio.Event()
                connection.add_termination_listener(lambda _: closed.set())
                admin = await asyncpg.connect(admin_dsn)
                await admin.execute("SELECT pg_terminate_backend($1)", connection.get_server_pid())
                await admin.close()
                await asyncio.wait_for(closed.wait(), WAIT)
            return connection

        db = Database(dsn, bridge=bridge, min_size=0, max_size=1, connect=connect_then_die_once)
        assert db.fetchval("SELECT 1", timeout=WAIT) == 1
        assert len(made) == 2
        assert any("died while being acquired" in r.getMessage() for r in caplog.records)
        all_released(db)

    def test_a_call_that_may_have_reached_the_server_is_never_retried(
        self, db: Database, admin_dsn: str, schema: str
    ) -> None:
        db.execute("CREATE TABLE t (k int)")
        watcher = terminate_once_running(admin_dsn, schema, "INSERT INTO t SELECT 1 FROM pg_sleep(30)")
        with pytest.raises(ConnectionLostError):
            db.execute("INSERT INTO t SELECT 1 FROM pg_sleep(30)")
        watcher.join(WAIT)
        assert db.fetchval("SELECT count(*) FROM t") == 0


class TestRelease:
    def test_a_failed_reset_on_release_does_not_replace_the_outcome(self, dsn: str, bridge: Bridge) -> None:
        """Stress suite: "InternalClientError: cannot switch to state 15" from the pool's reset replaced
        the call's own outcome, so a committed write was reported as failed."""

        async def failing_reset(conn: Any) -> None:
            raise RuntimeError("reset failed")

        db = Database(dsn, bridge=bridge, max_size=1, reset=failing_reset)
        db.execute("CREATE TABLE t (k int)")
        assert db.execute("INSERT INTO t VALUES (1)") == "INSERT 0 1"
        with pytest.raises(asyncpg.UndefinedTableError):
            db.execute("INSERT INTO missing VALUES (1)")
        assert db.fetchval("SELECT count(*) FROM t") == 1
        all_released(db)

    def test_a_release_left_to_finish_alone_reports_no_unretrieved_error(
        self, dsn: str, bridge: Bridge, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Stress suite: a call cancelled while its connection was being released left asyncpg's shielded
        release to fail alone: "Task exception was never retrieved"."""
        caplog.set_level(logging.ERROR, logger="asyncio")
        released = threading.Event()

        async def slow_failing_reset(conn: Any) -> None:
            await asyncio.sleep(0.5)
            released.set()
            raise RuntimeError("reset failed")

        db = Database(dsn, bridge=bridge, max_size=1, reset=slow_failing_reset)
        db.open()
        with pytest.raises(CallTimeoutError):
            db.fetchval("SELECT 1", timeout=0.2)  # expires during the release
        assert released.wait(WAIT)
        assert db.fetchval("SELECT 2", timeout=WAIT) == 2
        assert asyncio_errors(caplog) == []


class TestCancellationUnwinding:
    def test_work_that_fails_while_unwinding_a_timeout_still_reports_the_timeout(
        self, bridge: Bridge, caller: Caller
    ) -> None:
        """Stress suite: a timeout cancelled a transaction whose connection had died; asyncpg's
        Transaction.__aexit__ raised InterfaceError while unwinding, and the caller got that instead
        of CallTimeoutError."""

        async def unwinds_badly() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                raise ValueError("cleanup failed") from None

        with pytest.raises(CallTimeoutError, match=r"did not finish within 0\.2 s") as info:
            caller.call(bridge, "run", unwinds_badly, timeout=0.2)
        assert isinstance(info.value.__cause__, ValueError)

    def test_the_same_holds_for_arun_on_the_bridge_loop_itself(self, bridge: Bridge) -> None:
        async def unwinds_badly() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                raise ValueError("cleanup failed") from None

        async def nested() -> None:
            await bridge.arun(unwinds_badly, timeout=0.2)

        with pytest.raises(CallTimeoutError) as info:
            bridge.run(nested)
        assert isinstance(info.value.__cause__, ValueError)

    def test_an_error_unrelated_to_the_cancellation_is_reported_as_it_is(self, bridge: Bridge) -> None:
        async def fails_at_once() -> None:
            raise KeyError("mine")

        with pytest.raises(KeyError, match="mine"):
            bridge.run(fails_at_once, timeout=5)


class TestAbandonedConnect:
    def test_a_connection_attempt_whose_caller_gave_up_is_finished_and_closed(
        self, dsn: str, bridge: Bridge, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Stress suite: cancelling asyncpg.connect() halfway (a caller's short timeout) left a future
        failing unseen: "Future exception was never retrieved: unexpected connection_lost() call"."""
        caplog.set_level(logging.ERROR, logger="asyncio")
        made: list[asyncpg.Connection] = []

        async def slow_connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
            await asyncio.sleep(0.5)
            connection: asyncpg.Connection = await asyncpg.connect(*args, **kwargs)
            made.append(connection)
            return connection

        db = Database(dsn, bridge=bridge, min_size=0, max_size=1, connect=slow_connect)
        with pytest.raises(CallTimeoutError):
            db.fetchval("SELECT 1", timeout=0.1)
        wait_until(lambda: bool(made) and made[0].is_closed())
        assert db.fetchval("SELECT 1", timeout=WAIT) == 1
        assert asyncio_errors(caplog) == []


class TestLoopNoise:
    def test_asyncpgs_cancel_request_race_is_not_reported_as_an_error(
        self, bridge: Bridge, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Stress suite: asyncpg's CancelRequest connection, cancelled by asyncpg itself when the query's
        connection closed, logged "Future exception was never retrieved: unexpected connection_lost()"."""
        caplog.set_level(logging.DEBUG)

        async def orphan(error: BaseException) -> None:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(error)
            del future  # freed unretrieved: asyncio reports it to the loop's exception handler

        bridge.run(orphan, ConnectionError("unexpected connection_lost() call"))
        gc.collect()
        assert asyncio_errors(caplog) == []
        bridge.run(orphan, ConnectionError("something else"))
        assert any("something else" in message for message in asyncio_errors(caplog)) or any(
            "something else" in str(r.exc_info) for r in caplog.records if r.name == "asyncio"
        )


class TestTransactionsLosingTheirConnection:
    """db.transaction() blocks under the same faults (the stress suite's ``block`` calls)."""

    def _kill_while_the_loop_is_held(
        self, bridge: Bridge, admin_dsn: str, schema: str, then: Callable[[], Any]
    ) -> Any:
        """Terminate this test's backends while the bridge loop is held, queue *then* (in a thread),
        and let the loop go: *then* runs before asyncpg has seen its socket close."""
        outcome: list[Any] = []

        def call() -> None:
            try:
                outcome.append(then())
            except BaseException as exc:
                outcome.append(exc)

        caller = threading.Thread(target=call)
        with loop_held(bridge):
            terminate(admin_dsn, schema)
            wait_until(
                lambda: (
                    not independent(
                        admin_dsn, "SELECT 1 FROM pg_stat_activity WHERE application_name = $1", schema
                    )
                )
            )
            caller.start()
            time.sleep(0.2)  # let the call be queued behind the held loop
        caller.join(WAIT)
        return outcome[0]

    def test_a_transaction_begun_on_a_connection_killed_while_idle_begins_on_another(
        self, dsn: str, bridge: Bridge, admin_dsn: str, schema: str
    ) -> None:
        """Stress suite: BEGIN on a pooled connection whose backend was terminated while idle failed with
        "InternalClientError: cannot switch to state 15". Nothing had run: it begins on a fresh one."""
        db = Database(dsn, bridge=bridge, min_size=1, max_size=1)
        db.execute("CREATE TABLE t (k int)")

        def block() -> int:
            with db.transaction() as tx:
                tx.execute("INSERT INTO t VALUES (1)")
            count: int = db.fetchval("SELECT count(*) FROM t")
            return count

        assert self._kill_while_the_loop_is_held(bridge, admin_dsn, schema, block) == 1

    def test_a_statement_after_the_connection_died_raises_transaction_closed_error(
        self, dsn: str, bridge: Bridge, admin_dsn: str, schema: str
    ) -> None:
        """Stress suite: the statement after the connection died between two statements raised
        "InternalClientError: cannot switch to state 11"; it is a lost transaction, and says so."""
        db = Database(dsn, bridge=bridge, max_size=1)
        db.execute("CREATE TABLE t (k int)")
        tx = db.transaction()
        tx.__enter__()
        tx.execute("INSERT INTO t VALUES (1)")
        error = self._kill_while_the_loop_is_held(
            bridge, admin_dsn, schema, lambda: tx.execute("INSERT INTO t VALUES (2)")
        )
        assert isinstance(error, TransactionClosedError)
        assert "connection to the server was lost" in str(error)
        with pytest.raises(TransactionClosedError, match="cannot commit"):
            tx.__exit__(None, None, None)
        assert db.fetchval("SELECT count(*) FROM t") == 0

    def test_a_commit_after_the_connection_died_says_nothing_was_committed(
        self, dsn: str, bridge: Bridge, admin_dsn: str, schema: str
    ) -> None:
        """Stress suite: COMMIT on a connection that died between statements raised "InternalClientError:
        cannot switch to state 15". COMMIT never left: nothing was committed, and the error says so."""
        db = Database(dsn, bridge=bridge, max_size=1)
        db.execute("CREATE TABLE t (k int)")
        tx = db.transaction()
        tx.__enter__()
        tx.execute("INSERT INTO t VALUES (1)")
        error = self._kill_while_the_loop_is_held(
            bridge, admin_dsn, schema, lambda: tx.__exit__(None, None, None)
        )
        assert isinstance(error, TransactionClosedError)
        assert "cannot commit" in str(error)
        assert db.fetchval("SELECT count(*) FROM t") == 0
        all_released(db)


class TestCallsLeavingATransactionOpen:
    def test_a_connection_returned_inside_a_transaction_is_discarded_not_pooled(
        self, dsn: str, bridge: Bridge, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Stress suite: a call whose ROLLBACK was cancelled gave its connection back inside a
        transaction; asyncpg's reset then logged "Resetting connection with an active transaction"."""
        caplog.set_level(logging.WARNING)
        db = Database(dsn, bridge=bridge, max_size=1)
        first = db.fetchval("SELECT pg_backend_pid()")

        async def begins_and_returns(conn: Any) -> None:
            await conn.execute("BEGIN")  # by hand, never ended: a bug in the caller

        db.run(begins_and_returns)
        assert db.fetchval("SELECT pg_backend_pid()") != first  # a fresh connection, not in a transaction
        assert db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", first) == 0
        assert any("returned with a transaction still open" in r.getMessage() for r in caplog.records)
        assert asyncio_errors(caplog) == []
