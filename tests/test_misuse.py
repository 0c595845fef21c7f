"""Bad input, misuse and security: each gets a clear, documented error, and the bridge keeps serving.

Every test ends by checking that the same Database (or Bridge) still answers: one caller's mistake must
never cost the others their bridge.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import logging
import mmap
import re
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import loopbridge
from loopbridge import (
    Bridge,
    BridgeClosedError,
    CallTimeoutError,
    ConfigurationError,
    ConnectError,
    ConnectionLostError,
    Database,
    DatabaseClosedError,
    DeadlockError,
)
from tests.pgcluster import PASSWORD, PrivateCluster
from tests.support import WAIT, Caller, all_released, in_thread, independent, run_loop


async def add(a: int, b: int) -> int:
    return a + b


def still_serves(db: Database) -> None:
    assert db.fetchval("SELECT 40 + 2", timeout=WAIT) == 42
    assert db.bridge.run(add, 1, 1, timeout=WAIT) == 2


def no_loop_errors(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert errors == []


def gigabytes(size: float) -> memoryview:
    """A zero-filled bytes-like value of *size* GiB that takes no memory until it is read."""
    return memoryview(mmap.mmap(-1, int(size * 2**30)))


class TestLimits:
    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"max_size": True}, "max_size must be an integer from 1 to 10,000, not True"),
            ({"max_size": 10**7}, "max_size must be an integer from 1 to 10,000, not 10000000"),
            ({"max_size": 2.0}, "max_size must be an integer from 1 to 10,000"),
            ({"min_size": False}, "min_size must be an integer from 0 to 10"),
            ({"min_size": 3, "max_size": 2}, "min_size must be an integer from 0 to 2"),
            ({"pool_timeout": float("nan")}, "pool_timeout must be a positive number of seconds"),
            ({"pool_timeout": -1}, "pool_timeout must be a positive number of seconds"),
        ],
    )
    def test_sizes_and_timeouts_beyond_reach_are_refused_saying_what_is_allowed(
        self, dsn: str, options: dict[str, Any], message: str
    ) -> None:
        """max_size=10**7 blocked the shared bridge for seconds when the pool opened and again at exit,
        10**9 was killed by the kernel, and max_size=True was taken for 1."""
        bridge = Bridge("limits")
        with pytest.raises(ConfigurationError, match=re.escape(message)):
            Database(dsn, bridge=bridge, **options)
        assert bridge.state == "created"  # refused before anything ran

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"max_queries": 0}, "max_queries must be an integer >= 1, not 0"),
            ({"max_queries": 1.5}, "max_queries must be an integer >= 1"),
            ({"max_inactive_connection_lifetime": -1}, "max_inactive_connection_lifetime must be"),
            ({"command_timeout": 0}, "command_timeout must be a positive number of seconds"),
            ({"timeout": float("inf")}, "timeout must be a positive number of seconds (finite)"),
            ({"statement_cache_size": -1}, "statement_cache_size must be an integer >= 0"),
            ({"server_settings": {"work_mem": 64}}, "server_settings must be a dict of str to str"),
            ({"connection_class": dict}, "connection_class must be a subclass of asyncpg"),
            ({"init": "SET x = 1"}, "init must be a function"),
            ({"init_size": 11}, "init_size must be an integer from 1 to 10"),
        ],
    )
    def test_asyncpg_pool_options_are_checked_up_front(
        self, dsn: str, options: dict[str, Any], message: str
    ) -> None:
        """max_queries=0 was taken, and failed at the first call, on the bridge loop, with asyncpg's bare
        ValueError."""
        if "init_size" in options and "init_size" not in inspect.signature(asyncpg.create_pool).parameters:
            pytest.skip("this asyncpg has no init_size")
        bridge = Bridge("options")
        with pytest.raises(ConfigurationError, match=re.escape(message)):
            Database(dsn, bridge=bridge, min_size=1, max_size=10, **options)
        assert bridge.state == "created"

    @pytest.mark.parametrize("timeout", [float("inf"), 1e300, threading.TIMEOUT_MAX])
    def test_an_infinite_timeout_means_no_timeout(self, db: Database, caller: Caller, timeout: float) -> None:
        """timeout=float('inf') (or 1e300) raised OverflowError from deep inside the wait."""
        assert caller.call(db, "fetchval", "SELECT 1", timeout=timeout) == 1
        assert db.bridge.run(add, 1, 2, timeout=timeout) == 3
        assert db.bridge.submit(add, 2, 2, timeout=timeout).result(WAIT) == 4
        assert [row[0] for row in db.iterate("SELECT generate_series(1, 3)", timeout=timeout)] == [1, 2, 3]
        with db.listen("forever") as sub:
            db.execute("NOTIFY forever")
            assert sub.get(timeout=timeout) is not None
        assert Database(db.dsn, bridge=db.bridge, command_timeout=timeout)._source.command_timeout is None
        still_serves(db)


class TestWhatIsSubmitted:
    def test_a_non_callable_is_refused(self, db: Database, caller: Caller) -> None:
        with pytest.raises(TypeError, match="needs an async function"):
            caller.call(db.bridge, "run", 42)
        with pytest.raises(TypeError, match=r"correct: db\.run\(work, 42\)"):
            caller.call(db, "run", "SELECT 1")
        still_serves(db)

    def test_an_already_awaited_coroutine_is_refused(self, db: Database) -> None:
        coro = add(1, 2)
        assert db.bridge.run(coro) == 3
        with pytest.raises(RuntimeError, match="a coroutine runs once"):
            db.bridge.run(coro)
        with pytest.raises(RuntimeError, match="a coroutine runs once"):
            db.bridge.submit(coro)
        still_serves(db)

    def test_a_sync_function_is_refused(self, db: Database, caller: Caller) -> None:
        def not_async(conn: Any) -> int:
            return 1

        with pytest.raises(TypeError, match="define it with 'async def'"):
            caller.call(db, "run", not_async)
        still_serves(db)


class TestArguments:
    def test_a_query_that_is_not_a_string_says_how_to_pass_values(self, db: Database, caller: Caller) -> None:
        for query in (42, None, b"SELECT 1"):
            with pytest.raises(TypeError, match=r"takes the SQL as a str with \$1, \$2"):
                caller.call(db, "fetch", query)
        still_serves(db)

    def test_a_parameter_of_the_wrong_type_names_the_parameter(self, db: Database, caller: Caller) -> None:
        with pytest.raises(asyncpg.DataError, match=r"invalid input for query argument \$1: 'abc'"):
            caller.call(db, "fetchval", "SELECT $1::int", "abc")
        still_serves(db)

    def test_a_wrong_number_of_arguments_says_what_the_server_expects(
        self, db: Database, caller: Caller
    ) -> None:
        with pytest.raises(asyncpg.InterfaceError, match="the server expects 1 argument"):
            caller.call(db, "fetchval", "SELECT $1::int")
        with pytest.raises(asyncpg.InterfaceError, match="the server expects 0 arguments"):
            caller.call(db, "fetchval", "SELECT 1", 5)
        still_serves(db)

    def test_executemany_needs_a_sequence_of_rows(self, db: Database) -> None:
        db.execute("CREATE TABLE t (k int)")
        with pytest.raises(asyncpg.DataError, match="expected a sequence"):
            db.executemany("INSERT INTO t VALUES ($1)", [1, 2])  # type: ignore[list-item]
        assert db.fetchval("SELECT count(*) FROM t") == 0
        still_serves(db)

    @pytest.mark.parametrize(
        ("timeout", "error", "message"),
        [
            ("5", TypeError, "timeout must be a number of seconds or None, not str"),
            (True, TypeError, "not bool"),
            (float("nan"), ValueError, ">= 0 or None, not nan"),
            (-1, ValueError, ">= 0 or None, not -1"),
        ],
    )
    def test_a_bad_timeout_is_refused_before_the_call_is_queued(
        self,
        db: Database,
        caller: Caller,
        caplog: pytest.LogCaptureFixture,
        timeout: object,
        error: type[Exception],
        message: str,
    ) -> None:
        # Once queued, it failed on the bridge loop ("Exception in callback LoopThread._drain()").
        caplog.set_level(logging.ERROR, logger="asyncio")
        with pytest.raises(error, match=re.escape(message)):
            caller.call(db, "fetchval", "SELECT 1", timeout=timeout)
        with pytest.raises(error, match=re.escape(message)):
            db.bridge.submit(add, 1, 2, timeout=timeout)  # type: ignore[call-overload,call-arg]
        still_serves(db)
        no_loop_errors(caplog)

    @pytest.mark.parametrize(
        "settings",
        [{"block_threshold": -1}, {"block_threshold": 0}, {"close_timeout": "10"}, {"close_timeout": None}],
    )
    def test_bad_bridge_settings_are_refused(self, settings: dict[str, Any]) -> None:
        with pytest.raises(ConfigurationError, match="must be a positive number of seconds"):
            Bridge("bad", **settings)

    def test_a_pool_timeout_that_is_not_a_number_is_refused(self, dsn: str) -> None:
        with pytest.raises(ConfigurationError, match="pool_timeout must be a positive number"):
            Database(dsn, pool_timeout="3")  # type: ignore[arg-type]


class TestServerErrors:
    @pytest.mark.parametrize(
        ("query", "error"),
        [
            ("SELEC 1", asyncpg.PostgresSyntaxError),
            ("SELECT * FROM no_such_table", asyncpg.UndefinedTableError),
            ("SELECT 1 / 0", asyncpg.DivisionByZeroError),
            ("SELECT 'x'::int", asyncpg.InvalidTextRepresentationError),
        ],
    )
    def test_sql_errors_reach_the_caller_unchanged(
        self, db: Database, caller: Caller, query: str, error: type[Exception]
    ) -> None:
        with pytest.raises(error):
            caller.call(db, "fetch", query)
        still_serves(db)
        all_released(db)

    def test_a_query_timeout_cancels_the_query_on_the_server(
        self, db: Database, caller: Caller, admin_dsn: str, schema: str
    ) -> None:
        with pytest.raises(CallTimeoutError, match=r"did not finish within 0\.3 s"):
            caller.call(db, "execute", "SELECT pg_sleep(30)", timeout=0.3)
        running = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'active'"
        assert independent(admin_dsn, running, schema)[0][0] == 0
        still_serves(db)

    def test_command_timeout_becomes_a_call_timeout_error_that_says_so(
        self, dsn: str, bridge: Bridge
    ) -> None:
        db = Database(dsn, bridge=bridge, command_timeout=0.3)
        with pytest.raises(CallTimeoutError, match=r"command_timeout=0\.3 s") as info:
            db.fetchval("SELECT pg_sleep(30)")
        assert isinstance(info.value, TimeoutError)
        still_serves(db)
        db.close()


class TestAfterClose:
    def test_a_closed_database_says_to_create_a_new_one_and_its_bridge_serves_on(
        self, dsn: str, bridge: Bridge, caller: Caller
    ) -> None:
        closed, other = Database(dsn, bridge=bridge), Database(dsn, bridge=bridge)
        closed.fetchval("SELECT 1")
        closed.close()
        with pytest.raises(DatabaseClosedError, match="create a new Database"):
            caller.call(closed, "fetchval", "SELECT 1")
        still_serves(other)
        other.close()

    def test_a_closed_bridge_says_to_create_a_new_one(self, dsn: str, caller: Caller) -> None:
        bridge = Bridge("closed")
        db = Database(dsn, bridge=bridge)
        db.fetchval("SELECT 1")
        bridge.close()
        with pytest.raises(BridgeClosedError, match="create a new Bridge"):
            caller.call(db, "fetchval", "SELECT 1")
        with pytest.raises(BridgeClosedError):
            caller.call(bridge, "run", add, 1, 2)


class TestBlockingOnTheBridge:
    def test_a_blocking_call_on_the_bridge_thread_raises_deadlock_error(self, db: Database) -> None:
        async def nested(conn: Any) -> None:
            db.fetchval("SELECT 1")  # blocking, on the bridge thread: would wait for itself forever

        with pytest.raises(DeadlockError, match=r"correct: await db\.afetch"):
            db.run(nested)
        still_serves(db)

    def test_reading_a_stream_on_the_bridge_thread_raises_deadlock_error_and_leaves_it_readable(
        self, db: Database, caller: Caller
    ) -> None:
        """A stream opened in the caller's thread and read inside db.run(fn) waited on the bridge thread
        for a batch that only the bridge loop could fetch: the bridge was dead for good ("the bridge
        loop did not respond to its cancellation"), every later call timed out."""
        with db.iterate("SELECT generate_series(1, 5)", prefetch=2) as rows:
            assert [next(rows)[0], next(rows)[0]] == [1, 2]  # the first batch: the next row needs a wait

            async def read_on_the_bridge(conn: Any) -> object:
                return next(rows)

            with pytest.raises(DeadlockError, match="'async for'"):
                caller.call(db, "run", read_on_the_bridge, timeout=WAIT)
            assert [row[0] for row in rows] == [3, 4, 5]  # refused before anything changed
        still_serves(db)

    def test_a_subscription_read_on_the_bridge_thread_raises_deadlock_error_at_once(
        self, db: Database, caller: Caller
    ) -> None:
        """sub.get(timeout=1) inside db.run blocked the bridge loop, and every caller, for a second."""
        with db.listen("on_the_bridge") as sub:

            async def get_on_the_bridge(conn: Any) -> object:
                return sub.get(timeout=1)

            started = time.monotonic()
            with pytest.raises(DeadlockError, match=r"await sub\.aget\(\)"):
                caller.call(db, "run", get_on_the_bridge, timeout=WAIT)
            assert time.monotonic() - started < 0.9
            assert db.bridge.stats().max_loop_lag < 0.5
            db.execute("NOTIFY on_the_bridge, 'still there'")
            item = sub.get(timeout=WAIT)
        assert isinstance(item, loopbridge.Notification)
        assert item.payload == "still there"
        still_serves(db)

    def test_a_copy_fed_on_the_bridge_thread_raises_deadlock_error(self, db: Database) -> None:
        db.execute("CREATE TABLE t (k int)")

        async def copy_on_the_bridge(conn: Any) -> str:
            return db.copy_records_to_table("t", records=iter([(1,), (2,)]))

        with pytest.raises(DeadlockError):
            db.run(copy_on_the_bridge, timeout=WAIT)
        assert db.fetchval("SELECT count(*) FROM t") == 0
        still_serves(db)


class TestWrongForms:
    """Using a name or a form of another library, or of the other world, says what to write instead."""

    @pytest.mark.parametrize(
        ("name", "advice"),
        [
            ("fetchone", "use fetchrow()"),
            ("fetchall", "use fetch()"),
            ("fetch_one", "use fetchrow()"),
            ("afetchall", "use afetch()"),
            ("query", "use fetch() for rows, execute() for a command"),
            ("acquire", "use run(fn)"),
            ("begin", "use transaction()"),
            ("exeute", "did you mean 'execute'?"),
        ],
    )
    def test_a_near_miss_name_says_what_to_use(self, db: Database, name: str, advice: str) -> None:
        with pytest.raises(AttributeError, match=re.escape(advice)):
            getattr(db, name)
        with db.transaction() as tx, pytest.raises(AttributeError, match="'Transaction' object has no"):
            getattr(tx, name)
        still_serves(db)

    def test_awaiting_a_blocking_method_raises_before_it_runs(self, db: Database) -> None:
        # It ran the query while blocking the loop, then failed: "object int can't be used in 'await'".
        db.execute("CREATE TABLE t (n int)")

        async def misuse() -> list[str]:
            errors = []
            try:
                await db.execute("INSERT INTO t VALUES (1)")  # type: ignore[misc]
            except TypeError as exc:
                errors.append(str(exc))
            try:
                await db.fetchval("INSERT INTO t VALUES (2) RETURNING n")
            except TypeError as exc:
                errors.append(str(exc))
            try:
                await db.bridge.run(add, 1, 2)  # type: ignore[misc]
            except TypeError as exc:
                errors.append(str(exc))
            return errors

        errors = run_loop(misuse)
        assert len(errors) == 3
        assert "correct: await db.aexecute(...)" in errors[0]
        assert "incorrect: await db.fetchval(...); correct: await db.afetchval(...)" in errors[1]
        assert "correct: await bridge.arun(...)" in errors[2]
        assert all("Nothing was run" in error for error in errors)
        assert db.fetchval("SELECT count(*) FROM t") == 0
        still_serves(db)

    def test_a_slow_blocking_call_on_a_running_loop_warns_once_per_call_site(
        self, dsn: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        with Bridge("warns", warn_blocking=0.1) as bridge:
            db = Database(dsn, bridge=bridge)
            db.fetchval("SELECT 1")  # the pool is open: what follows measures the statements

            async def handler() -> int:
                ticks = 0

                async def ticker() -> None:
                    nonlocal ticks
                    while True:
                        await asyncio.sleep(0.01)
                        ticks += 1

                task = asyncio.ensure_future(ticker())
                await asyncio.sleep(0.05)
                before = ticks
                for _ in range(2):
                    db.fetchval("SELECT pg_sleep(0.3)")  # the mistake: one call site, twice
                stalled = ticks == before
                db.fetchval("SELECT 1")  # fast: no warning
                task.cancel()
                return int(stalled)

            with caplog.at_level(logging.WARNING, logger="loopbridge"):
                assert run_loop(handler) == 1  # the loop stood still meanwhile: nothing ticked
                in_thread(lambda: db.fetchval("SELECT pg_sleep(0.3)"))  # no loop there: nothing to warn
            warnings = [r.getMessage() for r in caplog.records if "blocked the event loop" in r.getMessage()]
            assert len(warnings) == 1, warnings
            assert "Database.fetchval() blocked the event loop of thread 'test-loop'" in warnings[0]
            assert f"{Path(__file__).name}:" in warnings[0]
            assert "in handler()" in warnings[0]
            assert "await db.afetchval(...)" in warnings[0]
            db.close()

    def test_the_blocking_warning_can_be_turned_off(self, dsn: str, caplog: pytest.LogCaptureFixture) -> None:
        with Bridge("quiet", warn_blocking=None) as bridge:
            db = Database(dsn, bridge=bridge)

            async def handler() -> None:
                db.fetchval("SELECT pg_sleep(0.2)")

            with caplog.at_level(logging.WARNING, logger="loopbridge"):
                run_loop(handler)
            assert "blocked the event loop" not in caplog.text
            db.close()


class TestHugeResults:
    def test_a_large_result_arrives_while_other_callers_are_served(self, db: Database) -> None:
        quick: list[int] = []
        done = threading.Event()

        def others() -> None:
            while not done.is_set():
                quick.append(db.fetchval("SELECT 1", timeout=WAIT))

        other = threading.Thread(target=others)
        other.start()
        try:
            rows = db.fetch("SELECT g, md5(g::text) FROM generate_series(1, 300000) g", timeout=WAIT * 2)
        finally:
            done.set()
            other.join(WAIT)
        assert len(rows) == 300_000
        assert rows[-1]["g"] == 300_000
        assert quick
        assert set(quick) == {1}
        still_serves(db)

    def test_a_huge_result_cut_off_by_its_timeout_leaves_the_pool_healthy(
        self, db: Database, caller: Caller
    ) -> None:
        with pytest.raises(CallTimeoutError):
            caller.call(
                db, "fetch", "SELECT g, repeat('x', 1000) FROM generate_series(1, 10000000) g", timeout=0.5
            )
        still_serves(db)
        all_released(db)

    @pytest.mark.parametrize(
        "values",
        [
            # Each a view of an anonymous mapping: gigabytes that take no memory until they are read.
            pytest.param((gigabytes(1.01),), id="one value over 1 GB"),
            pytest.param((gigabytes(0.6), gigabytes(0.6)), id="two that do not fit together"),
        ],
    )
    def test_parameters_too_big_to_send_are_refused_before_they_reach_the_bridge(
        self, db: Database, caller: Caller, values: tuple[memoryview, ...]
    ) -> None:
        """A 2 GB string parameter was encoded on the bridge loop, stalling every caller for about 7 s,
        before asyncpg's DataError: values that PostgreSQL cannot take in one message are refused in
        the caller's thread, without reading them."""
        placeholders = ", ".join(f"length(${n}::bytea)" for n in range(1, len(values) + 1))
        started = time.monotonic()
        with pytest.raises(asyncpg.DataError, match="PostgreSQL takes at most 1,073,741,823 bytes"):
            caller.call(db, "fetchval", f"SELECT {placeholders}", *values, timeout=WAIT)
        assert time.monotonic() - started < 2
        assert db.bridge.stats().max_loop_lag < 0.5
        still_serves(db)

    def test_executemany_rows_too_big_to_send_are_refused(self, db: Database) -> None:
        db.execute("CREATE TABLE t (b bytea)")
        with pytest.raises(asyncpg.DataError, match="argument \\$1"):
            db.executemany("INSERT INTO t VALUES ($1)", [(b"small",), (gigabytes(1.01),)])
        assert db.fetchval("SELECT count(*) FROM t") == 0
        still_serves(db)

    def test_a_large_value_that_fits_is_sent(self, db: Database) -> None:
        text = "é" * 3_000_000  # 6 MB in UTF-8: measured only when its bounds cannot tell
        assert db.fetchval("SELECT octet_length($1::text)", text) == 6_000_000
        still_serves(db)

    def test_a_value_beyond_postgres_limits_raises_the_servers_error(self, db: Database) -> None:
        with pytest.raises(asyncpg.ProgramLimitExceededError, match="requested length too large"):
            db.fetchval("SELECT repeat('x', 1100000000)")
        still_serves(db)


# -- security -------------------------------------------------------------------------------------

PACKAGE = Path(loopbridge.__file__).parent

#: asyncpg methods that send SQL; their first argument must never be built by string formatting.
SQL_METHODS = {
    "execute",
    "executemany",
    "fetch",
    "fetchrow",
    "fetchval",
    "prepare",
    "cursor",
    "copy_from_query",
    "_statement",
}
#: A string that starts like a SQL command.
SQL_START = re.compile(
    r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH|CREATE|DROP|ALTER|TRUNCATE|COPY|LISTEN|NOTIFY|UNLISTEN|SET|RESET|"
    r"SHOW|BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|DEALLOCATE|DECLARE|FETCH|CLOSE|LOCK|GRANT|REVOKE)\b",
    re.IGNORECASE,
)


def _formatted(node: ast.AST) -> bool:
    """An f-string, ``"..." % x``, ``"...".format(x)`` or a concatenation involving a non-constant."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(part, ast.FormattedValue) for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
        return not (isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant))
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
        and isinstance(node.func.value, ast.Constant)
    )


def _leading_text(node: ast.AST) -> str:
    if isinstance(node, ast.JoinedStr):
        first = node.values[0] if node.values else None
        return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else ""
    if isinstance(node, ast.BinOp):
        return _leading_text(node.left)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return _leading_text(node.func.value)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return ""


def _only_names(node: ast.AST, names: frozenset[str]) -> bool:
    """True if every value interpolated into the f-string *node* is one of *names*."""
    if not isinstance(node, ast.JoinedStr) or not names:
        return False
    values = [part.value for part in node.values if isinstance(part, ast.FormattedValue)]
    return all(isinstance(value, ast.Name) and value.id in names for value in values)


def sql_built_by_formatting(source: str, allowed: frozenset[str] = frozenset()) -> list[int]:
    """Line numbers where SQL is built by string formatting (other than f-strings interpolating only
    the names in *allowed*)."""
    tree = ast.parse(source)
    # Messages are not SQL: what is raised or logged may start like a command ("COPY data must be ...").
    messages = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.Raise)
        or (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in ("logger", "logging", "warnings")
        )
        for inner in ast.walk(node)
    }
    lines = []
    for node in ast.walk(tree):
        if id(node) in messages:
            continue
        if _formatted(node) and SQL_START.match(_leading_text(node)) and not _only_names(node, allowed):
            lines.append(node.lineno)  # type: ignore[attr-defined]
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in SQL_METHODS
            and node.args
            and _formatted(node.args[0])
            and not _only_names(node.args[0], allowed)
        ):
            lines.append(node.lineno)
    return sorted(set(lines))


#: Interpolations a module may make, and why each carries no caller value.
ALLOWED = {
    # The demo's own scratch table, named loopbridge_demo_<pid> by the demo itself.
    "_demo.py": frozenset({"table"}),
    # The plugin's fresh schema or database, named PREFIX + uuid4 hex by the plugin itself (quoted), and
    # " WITH (FORCE)" or "" chosen from the server version.
    "contrib/pytest_plugin.py": frozenset({"name", "option"}),
}


class TestSecurity:
    def test_the_scan_catches_sql_built_by_formatting(self) -> None:
        assert sql_built_by_formatting('q = f"SELECT * FROM {table} WHERE id = {value}"') == [1]
        assert sql_built_by_formatting("con.execute('LISTEN ' + channel)") == [1]
        assert sql_built_by_formatting("con.fetch('SELECT %s' % value)") == [1]
        assert sql_built_by_formatting("con.execute(query.format(x))") == []  # not a constant: see below
        assert sql_built_by_formatting("con.execute('SET x = {}'.format(v))") == [1]
        assert sql_built_by_formatting("con.fetch('SELECT $1', value)") == []
        assert sql_built_by_formatting('raise TypeError(f"{label} needs a str")') == []
        assert sql_built_by_formatting('raise TypeError(f"COPY data must be bytes, not {kind}")') == []
        assert sql_built_by_formatting('logger.info(f"SELECT failed for {name}")') == []
        assert sql_built_by_formatting('con.execute(f"DROP TABLE {table}")', frozenset({"table"})) == []
        assert sql_built_by_formatting('con.execute(f"DROP TABLE {name}")', frozenset({"table"})) == [1]

    @pytest.mark.parametrize(
        "module", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(path.relative_to(PACKAGE))
    )
    def test_the_package_never_builds_sql_by_string_formatting(self, module: Path) -> None:
        """Values reach the server as parameters ($1, $2); identifiers would use asyncpg's quoting."""
        allowed = ALLOWED.get(str(module.relative_to(PACKAGE)), frozenset())
        assert sql_built_by_formatting(module.read_text(), allowed) == [], (
            f"SQL built by formatting: {module}"
        )

    def test_passwords_never_appear_in_logs_reprs_or_errors(
        self, cluster: PrivateCluster, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        seen: list[str] = []

        def record(exc: BaseException) -> None:
            seen.append("".join(traceback.format_exception(exc)))
            seen.extend(repr(e) for e in (exc, exc.__cause__, exc.__context__) if e is not None)

        with Bridge("secrets") as bridge:
            db = Database(cluster.dsn(), bridge=bridge, max_size=2)
            seen += [repr(db), db.dsn, repr(bridge)]
            db.open()
            seen += [repr(db), str(bridge.stats())]
            failures: tuple[Callable[[], object], ...] = (
                lambda: db.fetchval("SELEC 1"),
                lambda: db.fetchval("SELECT pg_sleep(5)", timeout=0.2),
                lambda: Database(cluster.dsn(password="wrong-" + PASSWORD), bridge=bridge).fetchval(
                    "SELECT 1"
                ),
                lambda: Database(cluster.dsn() + "?sslmode=require", bridge=bridge).fetchval("SELECT 1"),
            )
            for bad in failures:
                try:
                    bad()
                except Exception as exc:
                    record(exc)

            def lose_the_connection() -> None:
                async def terminate_myself(conn: Any) -> None:
                    await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

                db.run(terminate_myself)

            with pytest.raises(ConnectionLostError) as lost:
                in_thread(lose_the_connection)
            record(lost.value)
            cluster.stop()
            try:
                with pytest.raises((ConnectError, ConnectionLostError)) as down:
                    db.fetchval("SELECT 1")
                record(down.value)
            finally:
                cluster.start()
            assert db.fetchval("SELECT 1") == 1
            db.close()
            seen.append(repr(db))
        assert len(seen) > 10
        for text in [*seen, caplog.text]:
            assert PASSWORD not in text
