"""The pytest plugin: ``loopbridge_db`` (a fresh schema or database) and ``loopbridge_rollback_db``.

Used here in this very session (conftest points ``loopbridge_dsn`` at the suite's server), and in
projects of their own run by pytester in a subprocess, where the plugin is found through its
``pytest11`` entry point as a user's project would find it. The rollback tests run in a row: each
writes one row and sees only its own, so every earlier test's row was rolled back.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
import pytest_asyncio

from loopbridge import Database
from loopbridge._pin import PinnedSource
from loopbridge.contrib import pytest_plugin
from loopbridge.contrib.pytest_plugin import PREFIX
from tests.support import WAIT, in_thread, independent


@pytest.fixture(scope="module")
def rolled(loopbridge_app_db: Database) -> str:
    """A table that exists for real (committed before any test's transaction)."""
    loopbridge_app_db.execute("CREATE TABLE IF NOT EXISTS rolled (n int NOT NULL, who text)")
    return "rolled"


def app_code_records(db: Database, who: str) -> None:
    """Code under test: uses the plain Database, knows nothing of tests."""
    db.execute("INSERT INTO rolled VALUES (1, $1)", who)


async def app_code_arecords(db: Database, who: str) -> None:
    await db.aexecute("INSERT INTO rolled VALUES (1, $1)", who)


class TestFreshDatabase:
    def test_loopbridge_db_is_on_a_fresh_empty_schema(self, loopbridge_db: Database) -> None:
        schema = loopbridge_db.fetchval("SELECT current_schema()")
        assert schema.startswith(PREFIX)
        assert loopbridge_db.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = $1", schema) == 0
        loopbridge_db.execute("CREATE TABLE mine (x int)")

    @pytest.mark.asyncio
    async def test_loopbridge_db_from_an_async_test(self, loopbridge_db: Database) -> None:
        assert (await loopbridge_db.afetchval("SELECT current_schema()")).startswith(PREFIX)
        assert await loopbridge_db.afetchval("SELECT to_regclass('mine')") is None  # not the last test's
        await loopbridge_db.aexecute("CREATE TABLE mine (x int)")

    @pytest.mark.asyncio(loop_scope="module")
    async def test_loopbridge_db_from_a_module_scoped_loop(self, loopbridge_db: Database) -> None:
        assert (await loopbridge_db.afetchval("SELECT current_schema()")).startswith(PREFIX)
        assert await loopbridge_db.afetchval("SELECT to_regclass('mine')") is None
        await loopbridge_db.aexecute("CREATE TABLE mine (x int)")
        assert loopbridge_db.fetchval("SELECT count(*) FROM mine") == 0  # blocking, inside the loop

    @pytest.mark.asyncio(loop_scope="session")
    async def test_loopbridge_db_from_a_session_scoped_loop(self, loopbridge_db: Database) -> None:
        assert (await loopbridge_db.afetchval("SELECT current_schema()")).startswith(PREFIX)
        assert await loopbridge_db.afetchval("SELECT to_regclass('mine')") is None
        await loopbridge_db.aexecute("CREATE TABLE mine (x int)")

    @pytest.mark.asyncio(loop_scope="module")
    async def test_an_async_fixture_on_a_module_scoped_loop(self, seeded: Database) -> None:
        assert await seeded.afetchval("SELECT n FROM seeded") == 100
        assert await seeded.afetchval("SELECT to_regclass('mine')") is None


@pytest.mark.parametrize("isolation", ["schema", "database"])
def test_generated_names_are_quoted_with_asyncpgs_quoting(
    isolation: str, admin_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any prefix works, quotes and capitals included: the identifiers go through asyncpg's quoting.
    monkeypatch.setattr(pytest_plugin, "PREFIX", 'Odd "Prefix" ')
    catalog = {
        "schema": ("SELECT current_schema()", "SELECT count(*) FROM pg_namespace WHERE nspname = $1"),
        "database": ("SELECT current_database()", "SELECT count(*) FROM pg_database WHERE datname = $1"),
    }[isolation]
    with pytest_plugin._fresh(admin_dsn, isolation) as dsn:
        name = independent(dsn, catalog[0])[0][0]
        assert name.startswith('Odd "Prefix" ')
        assert independent(admin_dsn, catalog[1], name)[0][0] == 1
    assert independent(admin_dsn, catalog[1], name)[0][0] == 0  # dropped


@pytest_asyncio.fixture(loop_scope="module")
async def seeded(loopbridge_db: Database) -> Database:
    """An async fixture on the module's loop, over the (sync, function-scoped) ``loopbridge_db``."""
    await loopbridge_db.aexecute("CREATE TABLE seeded (n int)")
    await loopbridge_db.aexecute("INSERT INTO seeded VALUES (100)")
    return loopbridge_db


@pytest.mark.usefixtures("rolled")
class TestRollbackInARow:
    def test_sync(self, loopbridge_rollback_db: Database) -> None:
        app_code_records(loopbridge_rollback_db, "sync")
        assert loopbridge_rollback_db.fetchval("SELECT count(*) FROM rolled") == 1

    def test_sync_from_other_threads_and_loops(self, loopbridge_rollback_db: Database) -> None:
        # A view in a server thread, a handler on another loop: the same transaction.
        in_thread(lambda: app_code_records(loopbridge_rollback_db, "thread"))
        in_thread(lambda: asyncio.run(app_code_arecords(loopbridge_rollback_db, "loop")))
        assert loopbridge_rollback_db.fetchval("SELECT count(*) FROM rolled") == 2
        assert loopbridge_rollback_db.fetchval("SELECT count(*) FROM rolled WHERE who = 'sync'") == 0

    @pytest.mark.asyncio(loop_scope="function")
    async def test_async_function_loop(self, loopbridge_rollback_db: Database) -> None:
        await app_code_arecords(loopbridge_rollback_db, "function")
        assert await loopbridge_rollback_db.afetchval("SELECT count(*) FROM rolled") == 1

    @pytest.mark.asyncio(loop_scope="module")
    async def test_async_module_loop(self, loopbridge_rollback_db: Database) -> None:
        await app_code_arecords(loopbridge_rollback_db, "module")
        assert await loopbridge_rollback_db.afetchval("SELECT count(*) FROM rolled") == 1

    @pytest.mark.asyncio(loop_scope="session")
    async def test_async_session_loop(self, loopbridge_rollback_db: Database) -> None:
        await app_code_arecords(loopbridge_rollback_db, "session")
        # Blocking calls from inside the test's running loop work too.
        assert loopbridge_rollback_db.fetchval("SELECT count(*) FROM rolled") == 1

    def test_nothing_is_committed_while_the_test_runs(
        self, loopbridge_rollback_db: Database, loopbridge_app_db: Database
    ) -> None:
        app_code_records(loopbridge_rollback_db, "invisible")
        dsn = loopbridge_app_db._info.dsn
        assert independent(dsn, "SELECT count(*) FROM rolled")[0][0] == 0

    def test_transactions_inside_the_test_are_savepoints(self, loopbridge_rollback_db: Database) -> None:
        db = loopbridge_rollback_db

        async def fails_halfway(con: Any) -> None:
            await db.aexecute("INSERT INTO rolled VALUES (1, 'kept')")  # re-enters: same connection
            async with con.transaction():
                await con.execute("INSERT INTO rolled VALUES (1, 'undone')")
                raise LookupError

        with pytest.raises(LookupError):
            db.run(fails_halfway, timeout=WAIT)
        assert [row[0] for row in db.fetch("SELECT who FROM rolled")] == ["kept"]

    def test_after_the_row_all_rows_were_rolled_back(self, loopbridge_app_db: Database) -> None:
        assert loopbridge_app_db.fetchval("SELECT count(*) FROM rolled") == 0
        assert not isinstance(loopbridge_app_db._source, PinnedSource)


# -- a project of its own, finding the plugin through its entry point -------------------------------

APP = """
from loopbridge import Database
from loopbridge._pin import PinnedSource

db = Database(max_size=2)  # $LOOPBRIDGE_DSN, as an application would


def record(who):
    db.execute("INSERT INTO visits VALUES ($1)", who)


async def arecord(who):
    await db.aexecute("INSERT INTO visits VALUES ($1)", who)
"""

CONFTEST = """
import pytest

import app


@pytest.fixture(scope="session")
def loopbridge_app_db():
    return app.db
"""

TESTS = """
import asyncio
import threading

import pytest

import app

pytestmark = pytest.mark.usefixtures("loopbridge_rollback_db")


def test_sync():
    app.record("sync")
    assert app.db.fetchval("SELECT count(*) FROM visits") == 1


def test_from_a_thread():
    thread = threading.Thread(target=app.record, args=("thread",))
    thread.start()
    thread.join(30)
    assert app.db.fetchval("SELECT count(*) FROM visits") == 1


@pytest.mark.asyncio(loop_scope="function")
async def test_function_loop():
    await app.arecord("function")
    assert await app.db.afetchval("SELECT count(*) FROM visits") == 1


@pytest.mark.asyncio(loop_scope="module")
async def test_module_loop():
    await app.arecord("module")
    assert await app.db.afetchval("SELECT count(*) FROM visits") == 1


@pytest.mark.asyncio(loop_scope="session")
async def test_session_loop():
    await asyncio.gather(app.arecord("a"), app.arecord("b"))
    assert await app.db.afetchval("SELECT count(*) FROM visits") == 2


def test_fresh_schema(loopbridge_db):
    print("SCHEMA", loopbridge_db.fetchval("SELECT current_schema()"))
    loopbridge_db.execute("CREATE TABLE t (x int)")


@pytest.mark.asyncio(loop_scope="module")
async def test_fresh_schema_module_loop(loopbridge_db):
    assert await loopbridge_db.afetchval("SELECT to_regclass('t')") is None
    await loopbridge_db.aexecute("CREATE TABLE t (x int)")


@pytest.mark.asyncio(loop_scope="session")
async def test_fresh_schema_session_loop(loopbridge_db):
    assert await loopbridge_db.afetchval("SELECT to_regclass('t')") is None
    await loopbridge_db.aexecute("CREATE TABLE t (x int)")
"""

INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
filterwarnings = error
timeout = 60
"""


def printed(label: str, result: pytest.RunResult) -> str:
    """The name an inner test printed after *label* (with -s, in the middle of the progress line)."""
    found = re.search(rf"{label} (\S+)", result.stdout.str())
    assert found is not None, result.stdout.str()
    return found[1]


@pytest.fixture
def project(pytester: pytest.Pytester, dsn: str, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    independent(dsn, "CREATE TABLE visits (who text NOT NULL)")
    monkeypatch.setenv("LOOPBRIDGE_DSN", dsn)
    pytester.makeini(INI)
    pytester.makepyfile(app=APP, conftest=CONFTEST, test_app=TESTS)
    return pytester


@pytest.mark.slow
class TestInAProjectOfItsOwn:
    def test_the_application_database_is_rolled_back_after_every_test(
        self, project: pytest.Pytester, dsn: str, admin_dsn: str
    ) -> None:
        result = project.runpytest_subprocess(f"--loopbridge-dsn={admin_dsn}", "-s", timeout=120)
        result.assert_outcomes(passed=8)
        assert independent(dsn, "SELECT count(*) FROM visits")[0][0] == 0
        name = printed("SCHEMA", result)
        assert name.startswith(PREFIX)
        gone = independent(admin_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = $1", name)
        assert gone[0][0] == 0  # dropped, with its table

    def test_a_fresh_database_per_test(self, pytester: pytest.Pytester, admin_dsn: str) -> None:
        pytester.makeini(INI)
        pytester.makepyfile(
            test_fresh="""
            import pytest

            def test_one(loopbridge_db):
                name = loopbridge_db.fetchval("SELECT current_database()")
                assert name.startswith("loopbridge_test_")
                print("DATABASE", name)

            @pytest.mark.asyncio
            async def test_two(loopbridge_db):
                name = await loopbridge_db.afetchval("SELECT current_database()")
                assert name.startswith("loopbridge_test_")

            @pytest.mark.asyncio(loop_scope="module")
            async def test_module_loop(loopbridge_db):
                name = await loopbridge_db.afetchval("SELECT current_database()")
                assert name.startswith("loopbridge_test_")

            @pytest.mark.asyncio(loop_scope="session")
            async def test_session_loop(loopbridge_db):
                name = await loopbridge_db.afetchval("SELECT current_database()")
                assert name.startswith("loopbridge_test_")
            """
        )
        result = pytester.runpytest_subprocess(
            f"--loopbridge-dsn={admin_dsn}", "-o", "loopbridge_isolation=database", "-s", timeout=120
        )
        result.assert_outcomes(passed=4)
        name = printed("DATABASE", result)
        assert independent(admin_dsn, "SELECT count(*) FROM pg_database WHERE datname = $1", name)[0][0] == 0

    def test_a_commit_in_the_code_under_test_fails_the_test(self, project: pytest.Pytester, dsn: str) -> None:
        project.makepyfile(
            test_commit="""
            import pytest, app

            pytestmark = pytest.mark.usefixtures("loopbridge_rollback_db")

            def test_commits():
                app.db.execute("COMMIT")
                app.record("escaped")
            """
        )
        result = project.runpytest_subprocess("test_commit.py", timeout=120)
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(["*transaction was ended by the code under test*NOT rolled back*"])
        independent(dsn, "DELETE FROM visits")

    def test_without_a_server_the_error_says_what_to_set(
        self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name in ("LOOPBRIDGE_TEST_DSN", "LOOPBRIDGE_DSN", "DATABASE_URL"):
            monkeypatch.delenv(name, raising=False)
        pytester.makeini(INI)
        pytester.makepyfile(test_none="def test_needs_it(loopbridge_db):\n    pass\n")
        result = pytester.runpytest_subprocess(timeout=120)
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(["*--loopbridge-dsn=postgresql://*LOOPBRIDGE_TEST_DSN*"])

    def test_a_project_not_using_the_fixtures_needs_no_server(
        self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name in ("LOOPBRIDGE_TEST_DSN", "LOOPBRIDGE_DSN", "DATABASE_URL"):
            monkeypatch.delenv(name, raising=False)
        pytester.makeini(INI)
        pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
        result = pytester.runpytest_subprocess("--loopbridge-dsn=postgresql://h:1/x", timeout=120)
        result.assert_outcomes(passed=1)


# -- the pytest plugin guide's recipe with the FastAPI guide's quickstart ----------------------------

FASTAPI_APP = """
from fastapi import FastAPI

from loopbridge import Database
from loopbridge._pin import PinnedSource
from loopbridge.contrib.fastapi import DatabaseDep, lifespan

db = Database()   # reads $LOOPBRIDGE_DSN


async def create_tables(db: Database) -> None:
    await db.aexecute("CREATE TABLE IF NOT EXISTS users (id serial PRIMARY KEY, name text)")


app = FastAPI(lifespan=lifespan(db, setup=create_tables))  # closes db at shutdown


@app.post("/users/{name}")
async def signup(name: str, db: DatabaseDep):
    return {"id": await db.afetchval("INSERT INTO users (name) VALUES ($1) RETURNING id", name)}


@app.get("/count")
def count(db: DatabaseDep):
    return db.fetchval("SELECT count(*) FROM users")
"""

FASTAPI_CONFTEST = """
import atexit

import pytest

from app import db


@pytest.fixture(scope="session")
def loopbridge_app_db():
    yield db
    # Its own teardown may still use it: the plugin closes it only once the session is over.
    with open("app_db_at_teardown.txt", "w") as out:
        out.write(repr(db.fetchval("SELECT 42")))


@atexit.register
def closed_by_then():
    # After pytest is done, before loopbridge's own exit handler (registered earlier, when app imported
    # loopbridge): did the plugin close the app's Database, as its lifespan asked?
    with open("app_db_closed.txt", "w") as out:
        out.write(repr(db.closed))
"""

FASTAPI_TESTS = """
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi.testclient import TestClient

from app import app, db

pytestmark = pytest.mark.usefixtures("loopbridge_rollback_db")


def signup_with_a_test_client(name):
    with TestClient(app) as client:  # runs the lifespan: opens db, creates the table; closes db
        client.post(f"/users/{name}").raise_for_status()
        return client.get("/count").json()


@asynccontextmanager
async def served(app):
    # The lifespan on the test's own loop, and requests through httpx's ASGI transport.
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope, receive, send):
            scope["state"] = dict(state)
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


async def signup_with_an_async_client(name):
    async with served(app) as client:
        (await client.post(f"/users/{name}")).raise_for_status()
        return (await client.get("/count")).json()


def test_sync_first():
    assert signup_with_a_test_client("ada") == 1


def test_sync_second():
    assert signup_with_a_test_client("bob") == 1
    assert db.fetchval("SELECT count(*) FROM users") == 1


@pytest.mark.asyncio(loop_scope="function")
async def test_async_function_loop():
    assert await signup_with_an_async_client("cy") == 1
    assert await db.afetchval("SELECT count(*) FROM users") == 1


@pytest.mark.asyncio(loop_scope="module")
async def test_async_module_loop():
    assert await signup_with_an_async_client("di") == 1


@pytest.mark.asyncio(loop_scope="session")
async def test_async_session_loop_with_a_test_client():
    assert signup_with_a_test_client("ed") == 1
    assert await db.afetchval("SELECT count(*) FROM users") == 1


def test_sync_last():
    assert signup_with_a_test_client("flo") == 1
"""


@pytest.mark.slow
def test_the_readme_recipe_works_with_the_readme_fastapi_quickstart(
    pytester: pytest.Pytester, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: the quickstart's lifespan(db) closed the Database at the end of the first TestClient
    # block, the session-wide one loopbridge_app_db had pinned: every later test raised
    # DatabaseClosedError. The plugin owns its lifetime now, and closes it when the session ends.
    monkeypatch.setenv("LOOPBRIDGE_DSN", dsn)
    pytester.makeini(INI)
    pytester.makepyfile(app=FASTAPI_APP, conftest=FASTAPI_CONFTEST, test_app=FASTAPI_TESTS)
    result = pytester.runpytest_subprocess(timeout=120)
    result.assert_outcomes(passed=6)
    assert (pytester.path / "app_db_at_teardown.txt").read_text() == "42"
    assert (pytester.path / "app_db_closed.txt").read_text() == "True"
    assert independent(dsn, "SELECT to_regclass('users')")[0][0] is None  # created in rolled-back tests


# -- loopbridge_rollback_engine: an application's loopbridge.sqlalchemy Engine, rolled back per test ----

ENGINE_APP = """
from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loopbridge.contrib.fastapi import SessionDep, SyncSessionDep, lifespan
from loopbridge.sqlalchemy import Engine

engine = Engine(pool_size=2, max_overflow=0)  # $LOOPBRIDGE_DSN, as an application would


class Base(DeclarativeBase):
    pass


class Visit(Base):
    __tablename__ = "engine_visits"

    id: Mapped[int] = mapped_column(primary_key=True)
    who: Mapped[str]


COUNT = select(func.count()).select_from(Visit)


async def create_tables(engine):
    await engine.arun_sync(Base.metadata.create_all)


app = FastAPI(lifespan=lifespan(engine, setup=create_tables))  # closes the engine at shutdown


@app.post("/visits/{who}")
async def visit(who: str, session: SessionDep):
    session.add(Visit(who=who))
    await session.flush()
    return {"count": await session.scalar(COUNT)}


@app.get("/count")
def count(session: SyncSessionDep):
    return session.scalar(COUNT)


def record(who):
    with engine.session() as session:
        session.add(Visit(who=who))


async def arecord(who):
    async with engine.session() as session:
        session.add(Visit(who=who))


def visits():
    with engine.session() as session:
        return session.scalar(COUNT)


async def avisits():
    async with engine.session() as session:
        return await session.scalar(COUNT)
"""

ENGINE_CONFTEST = """
import atexit

import pytest
from sqlalchemy import text

import app


@pytest.fixture(scope="session")
def loopbridge_app_engine():
    app.engine.run_sync(app.Base.metadata.create_all)  # committed, before any test's transaction
    yield app.engine
    # Its own teardown may still use it: the plugin closes it only once the session is over.
    with open("engine_at_teardown.txt", "w") as out:
        out.write(repr(app.engine.run_sync(lambda c: c.execute(text("SELECT 42")).scalar())))


@atexit.register
def closed_by_then():
    with open("engine_closed.txt", "w") as out:
        out.write(repr(app.engine.closed))
"""

ENGINE_TESTS = """
import asyncio
import os
import threading

import asyncpg
import pytest
from fastapi.testclient import TestClient

import app

pytestmark = pytest.mark.usefixtures("loopbridge_rollback_engine")


def test_sync_sessions_see_each_others_writes():
    app.record("a")
    app.record("b")
    assert app.visits() == 2


def test_from_a_thread():
    thread = threading.Thread(target=app.record, args=("thread",))
    thread.start()
    thread.join(30)
    assert app.visits() == 1


@pytest.mark.asyncio(loop_scope="function")
async def test_function_loop():
    await app.arecord("function")
    assert await app.avisits() == 1


@pytest.mark.asyncio(loop_scope="module")
async def test_module_loop():
    await app.arecord("module")
    await app.arecord("module again")
    assert await app.avisits() == 2


@pytest.mark.asyncio(loop_scope="session")
async def test_session_loop():
    await app.arecord("session")
    assert app.visits() == 1  # a blocking call inside the test's running loop


def test_a_fastapi_app_driven_by_a_test_client():
    with TestClient(app.app) as client:  # runs the lifespan: setup, and a close the plugin defers
        assert client.post("/visits/ada").json() == {"count": 1}
        assert client.post("/visits/bob").json() == {"count": 2}
        assert client.get("/count").json() == 2


def test_a_second_test_client_on_the_same_engine():
    with TestClient(app.app) as client:
        assert client.post("/visits/cy").json() == {"count": 1}
    assert app.visits() == 1


def test_nothing_is_committed_while_the_test_runs():
    app.record("invisible")

    async def committed():
        con = await asyncpg.connect(os.environ["LOOPBRIDGE_DSN"], timeout=10)
        try:
            return await con.fetchval("SELECT count(*) FROM engine_visits")
        finally:
            await con.close()

    assert asyncio.run(committed()) == 0
"""


@pytest.mark.slow
class TestRollbackEngine:
    def test_the_application_engine_is_rolled_back_after_every_test(
        self, pytester: pytest.Pytester, dsn: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("LOOPBRIDGE_DSN", dsn)
        pytester.makeini(INI)
        pytester.makepyfile(app=ENGINE_APP, conftest=ENGINE_CONFTEST, test_app=ENGINE_TESTS)
        result = pytester.runpytest_subprocess(timeout=120)
        result.assert_outcomes(passed=8)
        assert independent(dsn, "SELECT count(*) FROM engine_visits")[0][0] == 0
        assert (pytester.path / "engine_at_teardown.txt").read_text() == "42"
        assert (pytester.path / "engine_closed.txt").read_text() == "True"  # as the lifespan asked

    def test_the_default_engine_is_on_a_fresh_schema_dropped_afterwards(
        self, pytester: pytest.Pytester, admin_dsn: str
    ) -> None:
        pytester.makeini(INI)
        pytester.makepyfile(
            test_default="""
            import pytest
            from sqlalchemy import text

            def test_first(loopbridge_rollback_engine):
                with loopbridge_rollback_engine.session() as session:
                    print("SCHEMA", session.scalar(text("SELECT current_schema()")))
                    session.execute(text("CREATE TABLE t (x int)"))
                    session.execute(text("INSERT INTO t VALUES (1)"))
                with loopbridge_rollback_engine.session() as session:
                    assert session.scalar(text("SELECT count(*) FROM t")) == 1

            @pytest.mark.asyncio(loop_scope="module")
            async def test_second(loopbridge_rollback_engine):
                async with loopbridge_rollback_engine.session() as session:
                    assert await session.scalar(text("SELECT to_regclass('t')")) is None
            """
        )
        result = pytester.runpytest_subprocess(f"--loopbridge-dsn={admin_dsn}", "-s", timeout=120)
        result.assert_outcomes(passed=2)
        name = printed("SCHEMA", result)
        assert name.startswith(PREFIX)
        gone = independent(admin_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = $1", name)
        assert gone[0][0] == 0

    def test_a_commit_sent_by_the_code_under_test_fails_the_test(
        self, pytester: pytest.Pytester, dsn: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("LOOPBRIDGE_DSN", dsn)
        pytester.makeini(INI)
        pytester.makepyfile(
            app=ENGINE_APP,
            conftest=ENGINE_CONFTEST,
            test_commit="""
            import pytest
            import sqlalchemy.exc
            from sqlalchemy import text

            import app

            pytestmark = pytest.mark.usefixtures("loopbridge_rollback_engine")

            def test_commits():
                with pytest.raises(sqlalchemy.exc.DBAPIError):
                    with app.engine.session() as session:
                        session.add(app.Visit(who="escaped"))
                        session.flush()
                        session.execute(text("COMMIT"))
            """,
        )
        result = pytester.runpytest_subprocess("test_commit.py", timeout=120)
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(["*transaction was ended by the code under test*NOT rolled back*"])
        assert independent(dsn, "SELECT who FROM engine_visits")[0][0] == "escaped"

    def test_a_database_given_as_the_app_engine_says_which_fixture_to_override(
        self, pytester: pytest.Pytester, dsn: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("LOOPBRIDGE_DSN", dsn)
        pytester.makeini(INI)
        pytester.makepyfile(
            conftest="""
            import pytest
            from loopbridge import Database

            @pytest.fixture(scope="session")
            def loopbridge_app_engine():
                return Database()
            """,
            test_wrong="def test_it(loopbridge_rollback_engine):\n    pass\n",
        )
        result = pytester.runpytest_subprocess(timeout=120)
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(
            ["*must return the loopbridge.sqlalchemy.Engine*override loopbridge_app_db*"]
        )
