"""FastAPI and Starlette: the lifespan helper and dependency, and the app served by a real uvicorn.

The server tests run ``tests/apps/fastapi_app.py`` under uvicorn in a subprocess (on uvloop when it is
installed, as uvicorn chooses by itself) and talk to it over loopback with httpx. What the app did is
checked on the server from an independent connection, never trusted from its own answers.
"""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loopbridge import Database, DatabaseClosedError
from loopbridge.contrib.fastapi import (
    DatabaseDep,
    EngineDep,
    SessionDep,
    SyncSessionDep,
    get_database,
    lifespan,
)
from tests.marked import fenced_block
from tests.servers import Served, free_port, python, serve
from tests.support import WAIT, independent, pool_source, run_loop

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


def tables(dsn: str, schema: str) -> set[str]:
    rows = independent(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    return {row[0] for row in rows}


def backends(admin_dsn: str, application_name: str) -> set[int]:
    rows = independent(
        admin_dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = $1", application_name
    )
    return {row[0] for row in rows}


def wait_until_no_backends(admin_dsn: str, application_name: str, timeout: float = 10) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := backends(admin_dsn, application_name)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def uvicorn_app(dsn: str) -> Iterator[Served]:
    port = free_port()
    argv = python(
        "-m", "uvicorn", "tests.apps.fastapi_app:app", "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log",
    )  # fmt: skip
    with serve(argv, port=port, env={"LOOPBRIDGE_DSN": dsn}) as served:
        yield served


@pytest.mark.slow
class TestUvicorn:
    def test_lifespan_ddl_creates_the_tables(self, uvicorn_app: Served, dsn: str, schema: str) -> None:
        # The lifespan's DDL, seen from an independent connection, not from a "table ensured" log line.
        assert tables(dsn, schema) == {"organization", "hits"}

    def test_the_server_loop_never_owns_the_pool(self, uvicorn_app: Served) -> None:
        info = httpx.get(f"{uvicorn_app.url}/info", timeout=WAIT).json()
        assert info["bridge_loop_is_server_loop"] is False
        assert info["bridge_thread"] == "loopbridge-default"
        if HAS_UVLOOP:  # uvicorn picks uvloop by itself when it is installed
            assert info["server_loop"] == "uvloop.Loop"

    def test_async_and_sync_handlers(self, uvicorn_app: Served, dsn: str) -> None:
        with httpx.Client(base_url=uvicorn_app.url, timeout=WAIT) as client:
            answered = client.post("/async/1").json()
            threaded = client.post("/sync/2").json()
            assert client.get("/count").json() == {"hits": 2}
        assert answered["thread"] == "MainThread"  # on uvicorn's loop
        assert threaded["thread"] != "MainThread"  # in Starlette's threadpool
        rows = independent(dsn, "SELECT kind, n FROM hits ORDER BY id")
        assert [tuple(row) for row in rows] == [("async", 1), ("sync", 2)]

    def test_200_concurrent_requests(self, uvicorn_app: Served, dsn: str) -> None:
        async def hammer() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
            async with httpx.AsyncClient(base_url=uvicorn_app.url, timeout=WAIT, limits=limits) as client:
                return await asyncio.gather(
                    *(client.post(f"/{'async' if n % 2 else 'sync'}/{n}") for n in range(200))
                )

        responses = run_loop(hammer, timeout=120)
        assert [response.status_code for response in responses] == [200] * 200
        assert len({response.json()["id"] for response in responses}) == 200
        rows = independent(
            dsn, "SELECT kind, count(*), count(DISTINCT n) FROM hits GROUP BY kind ORDER BY kind"
        )
        assert [tuple(row) for row in rows] == [("async", 100, 100), ("sync", 100, 100)]

    def test_shutdown_closes_the_pool_quietly(self, uvicorn_app: Served, admin_dsn: str, schema: str) -> None:
        httpx.post(f"{uvicorn_app.url}/async/1", timeout=WAIT).raise_for_status()
        assert backends(admin_dsn, schema)
        # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully.
        assert uvicorn_app.stop() in (0, -signal.SIGTERM)
        output = uvicorn_app.output()
        assert "Application shutdown complete" in output
        assert "Traceback" not in output
        assert "ERROR" not in output
        assert wait_until_no_backends(admin_dsn, schema) == set()


@pytest.mark.slow
def test_the_guides_quickstart_runs_as_written_and_a_missing_user_is_a_404(
    tmp_path: Path, dsn: str, schema: str
) -> None:
    (tmp_path / "app.py").write_text(fenced_block("fastapi-quickstart"))
    port = free_port()
    argv = python(
        "-m", "uvicorn", "app:app", "--app-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log",
    )  # fmt: skip
    with serve(argv, port=port, env={"LOOPBRIDGE_DSN": dsn}, ready="/count") as served:
        with httpx.Client(base_url=served.url, timeout=WAIT) as client:
            missing = client.get("/users/1")
            assert (missing.status_code, missing.json()) == (404, {"detail": "no user 1"})
            ada = independent(dsn, "INSERT INTO users (name) VALUES ('ada') RETURNING id")[0][0]
            assert client.get(f"/users/{ada}").json() == {"id": ada, "name": "ada"}
            assert client.get("/count").json() == 1
        assert served.stop() in (0, -signal.SIGTERM)
        assert "Traceback" not in served.output(), served.output()
    assert tables(dsn, schema) == {"users"}  # the lifespan's setup, seen from an independent connection


def app_with(database: Database | Any, **options: Any) -> FastAPI:
    app = FastAPI(lifespan=lifespan(database, **options))

    @app.get("/n")
    async def n(db: DatabaseDep) -> int:
        return int(await db.afetchval("SELECT 42"))

    @app.get("/sync")
    def sync(db: DatabaseDep) -> int:
        return int(db.fetchval("SELECT 43"))

    return app


class TestLifespanHelper:
    """The helper's contract, through FastAPI's TestClient (whose app runs on a loop of its own)."""

    def test_a_given_database_is_opened_handed_out_and_closed(self, dsn: str) -> None:
        db = Database(dsn, max_size=2)
        with TestClient(app_with(db)) as client:
            assert db.bridge.run(lambda: _pool_open(db))
            assert client.get("/n").json() == 42
            assert client.get("/sync").json() == 43
        assert db.closed

    def test_a_closed_database_cannot_start_the_lifespan_again_and_says_why(self, dsn: str) -> None:
        db = Database(dsn, max_size=2)
        app = app_with(db)
        with TestClient(app):
            pass
        with pytest.raises(DatabaseClosedError, match="pass a factory"), TestClient(app):
            pass

    def test_a_factory_gives_every_startup_a_fresh_database(self, dsn: str) -> None:
        made: list[Database] = []

        def make() -> Database:
            made.append(Database(dsn, max_size=2))
            return made[-1]

        app = app_with(make)
        for _ in range(2):
            with TestClient(app) as client:
                assert client.get("/n").json() == 42
        assert len(made) == 2
        assert all(db.closed for db in made)

    def test_close_false_leaves_the_database_open_for_the_next_startup(self, dsn: str) -> None:
        db = Database(dsn, max_size=2)
        try:
            app = app_with(db, close=False)
            for _ in range(2):
                with TestClient(app) as client:
                    assert client.get("/sync").json() == 43
            assert not db.closed
        finally:
            db.close()

    def test_sync_and_async_setup_both_run_before_the_first_request(self, dsn: str, schema: str) -> None:
        def sync_setup(db: Database) -> None:
            db.execute("CREATE TABLE made_sync (x int)")

        async def async_setup(db: Database) -> None:
            await db.aexecute("CREATE TABLE made_async (x int)")

        for setup in (sync_setup, async_setup):
            with TestClient(app_with(lambda: Database(dsn, max_size=2), setup=setup)):
                pass
        assert tables(dsn, schema) == {"made_sync", "made_async"}

    def test_a_failing_setup_stops_the_startup_and_closes_the_database(self, dsn: str) -> None:
        db = Database(dsn, max_size=2)

        async def broken(db: Database) -> None:
            await db.aexecute("CREATE TABLE broken (x int,")

        with pytest.raises(Exception, match="syntax error"), TestClient(app_with(db, setup=broken)):
            pass
        assert db.closed

    def test_the_dependency_without_the_lifespan_says_what_to_do(self) -> None:
        app = FastAPI()

        @app.get("/")
        async def index(db: DatabaseDep) -> None:
            pass

        with pytest.raises(RuntimeError, match=r"lifespan=loopbridge\.contrib\.starlette\.lifespan\(db\)"):
            TestClient(app).get("/")

    def test_lifespan_refuses_what_is_not_a_database(self) -> None:
        with pytest.raises(
            TypeError, match=r"takes a loopbridge\.Database or loopbridge\.sqlalchemy\.Engine"
        ):
            lifespan("postgresql://nope")  # type: ignore[arg-type]

    def test_get_database_is_usable_from_starlette(self, dsn: str) -> None:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def index(request: Request) -> JSONResponse:
            db = await get_database(request)
            return JSONResponse(await db.afetchval("SELECT 7"))

        app = Starlette(routes=[Route("/", index)], lifespan=lifespan(lambda: Database(dsn, max_size=2)))
        with TestClient(app) as client:
            assert client.get("/").json() == 7


async def _pool_open(db: Database) -> bool:
    return pool_source(db).pool is not None


class TestEngineLifespan:
    """lifespan(engine) and the per-request session dependencies, for a loopbridge.sqlalchemy.Engine."""

    def make_app(self, engine: Any, close: bool = True) -> FastAPI:
        async def create_tables(engine: Any) -> None:
            await engine.arun_sync(_Base.metadata.create_all)

        app = FastAPI(lifespan=lifespan(engine, setup=create_tables, close=close))

        @app.post("/notes/{text}")
        async def add(text: str, session: SessionDep) -> dict[str, Any]:  # on the server's loop
            note = _Note(text=text)
            session.add(note)
            await session.flush()
            return {"id": note.id}

        @app.post("/sync-notes/{text}")
        def add_sync(text: str, session: SyncSessionDep) -> dict[str, Any]:  # in the threadpool
            note = _Note(text=text)
            session.add(note)
            session.flush()
            return {"id": note.id}

        @app.get("/notes")
        def notes(session: SyncSessionDep) -> list[str]:
            return list(session.scalars(select(_Note.text).order_by(_Note.id)))

        @app.post("/fail")
        async def fail(session: SessionDep) -> None:
            session.add(_Note(text="never"))
            await session.flush()
            raise RuntimeError("the handler failed")

        @app.get("/engine")
        async def which(engine: EngineDep) -> str:
            return repr(engine)

        return app

    def test_sessions_per_request_commit_for_async_and_sync_handlers(self, dsn: str) -> None:
        from loopbridge.sqlalchemy import Engine

        engine = Engine(dsn, pool_size=2)
        with TestClient(self.make_app(engine), raise_server_exceptions=False) as client:
            assert client.post("/notes/a").json() == {"id": 1}
            assert client.post("/sync-notes/b").json() == {"id": 2}
            assert client.post("/fail").status_code == 500  # rolled back
            assert client.get("/notes").json() == ["a", "b"]
            assert "Engine" in client.get("/engine").json()
        assert engine.closed  # closed at shutdown
        rows = independent(dsn, "SELECT text FROM lb_notes ORDER BY id")
        assert [row[0] for row in rows] == ["a", "b"]

    def test_a_factory_makes_a_fresh_engine_per_startup(self, dsn: str) -> None:
        from loopbridge.sqlalchemy import Engine

        made: list[Engine] = []

        def make() -> Engine:
            made.append(Engine(dsn, pool_size=1))
            return made[-1]

        app = self.make_app(make)
        for text in ("x", "y"):
            with TestClient(app) as client:
                assert client.post(f"/notes/{text}").status_code == 200
        assert len(made) == 2
        assert all(engine.closed for engine in made)


class _Base(DeclarativeBase):
    pass


class _Note(_Base):
    __tablename__ = "lb_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]
