"""A connection goes back to the pool reset only when its session state may have changed, and then fully.

Each test runs two calls on a pool of one connection: the first changes the session's state, the second,
on the same server session, must find none of it. The statements that can leave state behind are
recognised from their text (``loopbridge._session_state``); everything else goes back without a reset's
round trip, which a change the text cannot show (a function of yours that runs SET inside) shows, and
``session_reset="always"`` covers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from loopbridge import Bridge, ConfigurationError, Database
from loopbridge._session_state import may_change_session_state, may_drop_statements
from tests.boundary import wait_until
from tests.support import Caller

SEARCH_PATH = "SELECT current_setting('search_path')"
APPLICATION_NAME = "SELECT current_setting('application_name')"
ADVISORY_LOCKS = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
SQL_PREPARED = "SELECT count(*) FROM pg_prepared_statements WHERE from_sql"
LISTENING = "SELECT count(*) FROM pg_listening_channels()"
CURSORS = "SELECT count(*) FROM pg_cursors WHERE name <> ''"

#: (what changes the session, what shows it): each change must be gone for the next caller.
CHANGES = [
    pytest.param("SET search_path = elsewhere, public", SEARCH_PATH, id="set"),
    pytest.param("set application_name = 'changed'", APPLICATION_NAME, id="set-lower"),
    pytest.param(
        "SELECT set_config('application_name', 'changed', false)", APPLICATION_NAME, id="set_config"
    ),
    pytest.param("SET ROLE pg_monitor", "SELECT current_user", id="set-role"),
    pytest.param("SET SESSION AUTHORIZATION pg_monitor", "SELECT session_user", id="session-authorization"),
    pytest.param("LISTEN somewhere", LISTENING, id="listen"),
    pytest.param("DECLARE held CURSOR WITH HOLD FOR SELECT 1", CURSORS, id="declare-with-hold"),
    pytest.param("PREPARE mine AS SELECT 1", SQL_PREPARED, id="prepare"),
    pytest.param(
        "CREATE TEMP TABLE scratch (n int)", "SELECT to_regclass('pg_temp.scratch')::text", id="temp-table"
    ),
    pytest.param(
        "CREATE TEMPORARY SEQUENCE counter", "SELECT to_regclass('pg_temp.counter')::text", id="temp-sequence"
    ),
    pytest.param(
        "SELECT 1 AS n INTO TEMP copied", "SELECT to_regclass('pg_temp.copied')::text", id="select-into-temp"
    ),
    pytest.param("SELECT pg_advisory_lock(4242)", ADVISORY_LOCKS, id="advisory-lock"),
    pytest.param("SELECT pg_try_advisory_lock(4242)", ADVISORY_LOCKS, id="try-advisory-lock"),
    pytest.param("SELECT pg_try_advisory_lock_shared(4242)", ADVISORY_LOCKS, id="try-advisory-lock-shared"),
    pytest.param("DO $$ BEGIN EXECUTE 'SET search_path = elsewhere'; END $$", SEARCH_PATH, id="do-block"),
    pytest.param(
        "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0",
        # A library stays loaded (nothing unloads one); its settings are reset: the default, -1.
        "SELECT coalesce(current_setting('auto_explain.log_min_duration', true), '-1')",
        id="load",
    ),
    # The commands that undo session state: the next caller finds the pool's session as it was (the
    # DSN's application_name, asyncpg's cached statement of the probe itself still working).
    pytest.param("RESET ALL", APPLICATION_NAME, id="reset-all"),
    pytest.param("SET ROLE pg_monitor; RESET ROLE", "SELECT current_user", id="reset-role"),
    pytest.param("RESET search_path", SEARCH_PATH, id="reset-one"),
    pytest.param("UNLISTEN *", LISTENING, id="unlisten"),
    pytest.param("CLOSE ALL", CURSORS, id="close"),
    pytest.param("DEALLOCATE ALL", SQL_PREPARED, id="deallocate-all"),
    pytest.param("PREPARE mine AS SELECT 1; DEALLOCATE PREPARE mine", SQL_PREPARED, id="deallocate-one"),
    pytest.param("DISCARD ALL", APPLICATION_NAME, id="discard-all"),
    pytest.param("DISCARD PLANS", APPLICATION_NAME, id="discard-plans"),
    pytest.param(
        "CREATE TEMP TABLE scratch (n int); DISCARD TEMP",
        "SELECT to_regclass('pg_temp.scratch')::text",
        id="discard-temp",
    ),
    pytest.param("DISCARD SEQUENCES", APPLICATION_NAME, id="discard-sequences"),
    pytest.param("/* a comment first */ SET search_path = elsewhere", SEARCH_PATH, id="after-a-comment"),
    pytest.param("-- a line comment\nSET search_path = elsewhere", SEARCH_PATH, id="after-a-line-comment"),
    pytest.param("SELECT 1; SET search_path = elsewhere", SEARCH_PATH, id="second-statement"),
    pytest.param("SELECT '--'; /* */ SET search_path = elsewhere", SEARCH_PATH, id="after-a-quoted-dash"),
]


@pytest.fixture
def one_connection(dsn: str, bridge: Bridge) -> Iterator[Database]:
    db = Database(dsn, bridge=bridge, min_size=1, max_size=1)
    yield db
    db.close()


def same_session(db: Database, caller: Caller, query: str) -> tuple[int, Any]:
    """The backend and what *query* shows, both seen in one call (a single statement)."""
    row = caller.call(db, "fetchrow", f"SELECT pg_backend_pid(), ({query})")
    return int(row[0]), row[1]


class TestWhatIsReset:
    @pytest.mark.parametrize(("change", "shows"), CHANGES)
    def test_session_state_never_reaches_the_next_caller(
        self, one_connection: Database, caller: Caller, change: str, shows: str
    ) -> None:
        db = one_connection
        pid, before = same_session(db, caller, shows)
        assert may_change_session_state(change)
        caller.call(db, "execute", change)
        after_pid, after = same_session(db, caller, shows)
        assert after_pid == pid  # the same server session, one connection
        assert after == before

    def test_a_raw_connection_in_run_is_reset(self, one_connection: Database, caller: Caller) -> None:
        async def change(con: Any) -> None:
            await con.execute("SET search_path = elsewhere")  # the caller's own code: anything may happen

        _, before = same_session(one_connection, caller, SEARCH_PATH)
        caller.call(one_connection, "run", change)
        assert same_session(one_connection, caller, SEARCH_PATH)[1] == before

    def test_asyncpgs_statements_dropped_by_the_session_are_prepared_anew(
        self, one_connection: Database, caller: Caller
    ) -> None:
        # DEALLOCATE ALL and DISCARD ALL drop the statements asyncpg has prepared and cached: unless the
        # reset sees it, the next caller's call of one fails ("prepared statement ... does not exist").
        db = one_connection
        probe = "SELECT $1::int + 1"
        assert caller.call(db, "fetchval", probe, 1) == 2
        for drop in (
            "DEALLOCATE ALL",
            "DISCARD ALL",
            "DEALLOCATE PREPARE ALL",
            "DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$",
        ):
            caller.call(db, "execute", drop)
            assert caller.call(db, "fetchval", probe, 2) == 3

    def test_a_cached_statement_deallocated_by_its_name_is_prepared_anew(
        self, one_connection: Database, caller: Caller
    ) -> None:
        db = one_connection
        probe = "SELECT $1::int * 2"
        assert caller.call(db, "fetchval", probe, 2) == 4
        name = caller.call(
            db, "fetchval", "SELECT name FROM pg_prepared_statements WHERE statement = $1", probe
        )
        caller.call(db, "execute", f'DEALLOCATE "{name}"')
        assert caller.call(db, "fetchval", probe, 3) == 6

    def test_statements_dropped_on_a_raw_connection_in_run_are_prepared_anew(
        self, one_connection: Database, caller: Caller
    ) -> None:
        async def discard(con: Any) -> None:
            await con.execute("DISCARD ALL")  # the caller's own code: nothing loopbridge reads the text of

        db = one_connection
        assert caller.call(db, "fetchval", "SELECT $1::int - 1", 1) == 0
        caller.call(db, "run", discard)
        assert caller.call(db, "fetchval", "SELECT $1::int - 1", 2) == 1
        # Nothing prepared before the drop is left for asyncpg to close later: the server holds the
        # statement just prepared anew and the one listing them, no more.
        listing = "SELECT array_agg(statement ORDER BY statement) FROM pg_prepared_statements"
        assert caller.call(db, "fetchval", listing) == sorted(["SELECT $1::int - 1", listing])

    def test_statements_deallocated_in_a_transaction_are_prepared_anew_after_it(
        self, one_connection: Database, caller: Caller
    ) -> None:
        db = one_connection
        assert caller.call(db, "fetchval", "SELECT $1::int + 10", 1) == 11
        with db.transaction() as tx:
            tx.execute("DEALLOCATE ALL")
        assert caller.call(db, "fetchval", "SELECT $1::int + 10", 2) == 12

    def test_a_session_setting_made_in_a_transaction_is_reset(
        self, one_connection: Database, caller: Caller
    ) -> None:
        db = one_connection
        _, before = same_session(db, caller, SEARCH_PATH)
        with db.transaction() as tx:  # a session-level SET outlives the transaction that made it
            tx.execute("SET search_path = elsewhere")
        assert same_session(db, caller, SEARCH_PATH)[1] == before

    def test_a_subscriptions_connection_listens_no_more_when_it_goes_back(
        self, one_connection: Database, caller: Caller
    ) -> None:
        db = one_connection
        with db.listen("events"):
            pass
        assert same_session(db, caller, LISTENING)[1] == 0


class TestWhatIsNotReset:
    @pytest.fixture
    def sneaky(self, dsn: str) -> str:
        # A function that changes the session itself: nothing in the text of the call that runs it says so.
        with Database(dsn, max_size=1) as db:
            db.execute(
                "CREATE FUNCTION sneaky() RETURNS void LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM set_config('application_name', 'sneaky', false); END $$"
            )
        return "SELECT sneaky()"  # in the test's schema, dropped with it

    def test_statements_that_change_nothing_go_back_without_a_reset(
        self, one_connection: Database, sneaky: str, caller: Caller
    ) -> None:
        db = one_connection
        caller.call(db, "execute", sneaky)
        # No reset ran: what the function did is still there (what a statement of its text shows would
        # be gone). The documented blind spot, and the proof that a plain call pays for no reset.
        assert same_session(db, caller, APPLICATION_NAME)[1] == "sneaky"

    def test_session_reset_always_resets_every_connection(
        self, dsn: str, bridge: Bridge, sneaky: str, caller: Caller
    ) -> None:
        with Database(dsn, bridge=bridge, min_size=1, max_size=1, session_reset="always") as db:
            _, before = same_session(db, caller, APPLICATION_NAME)
            caller.call(db, "execute", sneaky)
            assert same_session(db, caller, APPLICATION_NAME)[1] == before

    def test_asyncpgs_own_statement_cache_survives_the_full_reset(self, one_connection: Database) -> None:
        db = one_connection
        assert db.fetchval("SELECT $1::int + 1", 1) == 2  # prepared by asyncpg, cached under its name
        db.execute("PREPARE mine AS SELECT 1")  # the full reset deallocates this one only
        assert db.fetchval("SELECT $1::int + 1", 2) == 3  # the cached statement still works
        assert db.fetchval("SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql") >= 1

    def test_a_bad_session_reset_is_refused(self, dsn: str) -> None:
        with pytest.raises(ConfigurationError, match="session_reset must be 'when_changed'"):
            Database(dsn, session_reset="never")


class TestGivenBackAtOnce:
    """A connection that needs no reset is back in the pool before the caller hears of its result (no
    task, no round trip); asyncpg's own release still handles every connection that needs something."""

    def test_a_plain_call_leaves_no_connection_in_use_when_it_returns(
        self, one_connection: Database, caller: Caller
    ) -> None:
        db = one_connection
        for _ in range(3):
            assert caller.call(db, "fetchval", "SELECT 1") == 1
            assert db.stats().in_use == 0  # at once: nothing was left to finish in the background

    def test_the_idle_connection_keeps_its_inactivity_timer(self, dsn: str, bridge: Bridge) -> None:
        # asyncpg rearms it on release: a connection given back in line must be closed after the same
        # idle time as any other.
        with Database(dsn, bridge=bridge, min_size=0, max_size=1, max_inactive_connection_lifetime=0.2) as db:
            assert db.fetchval("SELECT 1") == 1
            wait_until(lambda: db.stats().size == 0, what="the idle connection closed after 0.2 s")

    def test_a_connection_at_max_queries_is_replaced(self, dsn: str, bridge: Bridge, caller: Caller) -> None:
        with Database(dsn, bridge=bridge, min_size=1, max_size=1, max_queries=2) as db:
            first = caller.call(db, "fetchval", "SELECT pg_backend_pid()")
            caller.call(db, "fetchval", "SELECT 1")  # its second query: closed by asyncpg's release
            assert caller.call(db, "fetchval", "SELECT pg_backend_pid()") != first

    def test_listeners_left_on_a_raw_connection_are_dropped_with_a_warning(
        self, one_connection: Database
    ) -> None:
        async def leave_a_listener(con: Any) -> None:
            await con.add_listener("left_behind", lambda *args: None)  # never removed

        # asyncpg's check of a connection given back, kept: it warns, and the connection listens no more.
        with pytest.warns(Warning, match="left_behind|listener"):
            one_connection.run(leave_a_listener)
        assert one_connection.fetchval(LISTENING) == 0


class TestRecognised:
    @pytest.mark.parametrize(
        "sql",
        [
            "SELECT 1",
            "select * from t where id = $1",
            "UPDATE t SET x = 1",
            "INSERT INTO t VALUES ('SET x')",
            'SELECT "set" FROM t',
            "SELECT pg_advisory_xact_lock(1)",
            "CREATE TABLE t (n int)",
            "CREATE FUNCTION f() RETURNS void AS $$ SET x = 1 $$ LANGUAGE sql",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "SELECT E'it\\'s; SET x'",
        ],
    )
    def test_statements_that_leave_nothing_are_not_taken_for_changes(self, sql: str) -> None:
        assert not may_change_session_state(sql)

    @pytest.mark.parametrize(
        "sql",
        [
            "RESET ALL",
            "UNLISTEN *",
            "CLOSE ALL",
            "DEALLOCATE mine",
            "DISCARD PLANS",
            "create global temporary table t (n int)",
            "SELECT 'unterminated; SET x = 1",  # unbalanced quotes: a false alarm at worst
        ],
    )
    def test_every_command_on_the_list_is_recognised(self, sql: str) -> None:
        assert may_change_session_state(sql)

    @pytest.mark.parametrize(
        ("sql", "drops"),
        [
            ("DEALLOCATE ALL", True),
            ("deallocate prepare mine", True),
            ("DISCARD ALL", True),
            ("SELECT 1; discard all", True),
            ("DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$", True),
            ("DISCARD PLANS", False),
            ("DISCARD TEMP", False),
            ("PREPARE mine AS SELECT 1", False),
            ("SET search_path = 'DEALLOCATE ALL'", False),
            ("/* DISCARD ALL */ RESET ALL", False),
        ],
    )
    def test_what_may_drop_asyncpgs_statements_is_told_apart(self, sql: str, drops: bool) -> None:
        # Only these make the reset ask the server whether asyncpg's cached statements are all still
        # there (a question that costs as much server time as the rest of the reset).
        assert may_drop_statements(sql) is drops
