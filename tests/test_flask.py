"""Flask: ``loopbridge.contrib.flask`` with sync and async views, and under ``gunicorn --preload``.

The gunicorn test is the fork case made real: the app module (``tests/apps/flask_app.py``) uses the
Database in the master, gunicorn forks two sync workers from it, every worker serves queries on a pool
of its own, and the master's connections survive it all, workers restarted and stopped included. The
server's ``pg_stat_activity`` is the witness.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from typing import Any

import httpx
import pytest
from flask import Flask
from sqlalchemy import text

from loopbridge import Bridge, ConfigurationError, Database
from loopbridge.contrib.flask import LoopBridge, get_database, get_engine
from loopbridge.sqlalchemy import Engine
from tests.servers import Served, free_port, python, serve
from tests.support import WAIT, independent


def backends(admin_dsn: str, application_name: str) -> set[int]:
    rows = independent(
        admin_dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = $1", application_name
    )
    return {row[0] for row in rows}


def make_app(dsn: str, **config: Any) -> tuple[Flask, LoopBridge]:
    app = Flask("lbtest")
    app.config.update({"LOOPBRIDGE_DSN": dsn, "LOOPBRIDGE_OPTIONS": {"max_size": 2}, **config})
    lb = LoopBridge(app)

    @app.get("/sync")
    def sync_view() -> dict[str, Any]:
        return {"n": lb.database.fetchval("SELECT 41 + 1"), "same": lb.database is get_database()}

    @app.get("/async")
    async def async_view() -> dict[str, Any]:
        return {"n": await lb.database.afetchval("SELECT 43"), "same": lb.database is get_database()}

    return app, lb


class TestExtension:
    def test_sync_and_async_views_share_one_database(self, dsn: str) -> None:
        app, lb = make_app(dsn)
        db = lb.database
        try:
            client = app.test_client()
            for _ in range(3):  # the async view gets a new loop per request
                assert client.get("/sync").json == {"n": 42, "same": True}
                assert client.get("/async").json == {"n": 43, "same": True}
            assert lb.database is db  # one per process, not per request
        finally:
            db.close()

    def test_options_reach_the_database(self, dsn: str) -> None:
        _, lb = make_app(dsn, LOOPBRIDGE_OPTIONS={"max_size": 3, "pool_timeout": 5})
        assert lb.database.stats().max_size == 3
        lb.database.close()

    def test_the_application_factory_pattern(self, dsn: str) -> None:
        lb = LoopBridge()
        app = Flask("factory")
        app.config["LOOPBRIDGE_DSN"] = dsn
        lb.init_app(app)
        with app.app_context():
            assert lb.database.fetchval("SELECT 1") == 1
            lb.database.close()
        with pytest.raises(RuntimeError, match="outside an application context"):
            lb.database  # noqa: B018

    def test_a_given_database_is_used_as_is(self, db: Database) -> None:
        app = Flask("given")
        assert LoopBridge(app, database=db).database is db

    def test_a_bad_dsn_names_the_config_key_without_the_password(self) -> None:
        app = Flask("bad")
        app.config["LOOPBRIDGE_DSN"] = "mysql://u:hunter2secret@h/db"
        with pytest.raises(ConfigurationError, match="LOOPBRIDGE_DSN") as caught:
            LoopBridge(app)
        assert "hunter2secret" not in str(caught.value)

    def test_options_that_are_not_a_dict_are_refused(self, dsn: str) -> None:
        app = Flask("bad")
        app.config.update(LOOPBRIDGE_DSN=dsn, LOOPBRIDGE_OPTIONS=[("max_size", 2)])
        with pytest.raises(ConfigurationError, match=r"LOOPBRIDGE_OPTIONS'\] must be a dict"):
            LoopBridge(app)

    def test_a_dsn_among_the_options_says_to_use_loopbridge_dsn(self) -> None:
        # Regression: Database(dsn, **{"dsn": ...}) raised a bare TypeError ("multiple values").
        app = Flask("dsn-in-options")
        app.config["LOOPBRIDGE_OPTIONS"] = {"dsn": "postgresql://u:hunter2secret@h/db", "max_size": 2}
        with pytest.raises(ConfigurationError, match=r"goes in app\.config\['LOOPBRIDGE_DSN'\]") as caught:
            LoopBridge(app)
        assert "hunter2secret" not in str(caught.value)
        assert "dsn-in-options" in str(caught.value)

    def test_an_app_without_the_extension_says_what_to_do(self) -> None:
        with Flask("bare").app_context(), pytest.raises(RuntimeError, match=r"call LoopBridge\(app\)"):
            get_database()

    def test_setting_up_an_app_twice_is_refused(self, dsn: str) -> None:
        app, lb = make_app(dsn)
        with pytest.raises(RuntimeError, match="already set up"):
            LoopBridge(app)
        lb.database.close()


NOTE = text("INSERT INTO notes (kind) VALUES (:kind) RETURNING id")


def make_engine_app(dsn: str) -> tuple[Flask, LoopBridge]:
    app = Flask("lbengine")
    app.config.update(
        LOOPBRIDGE_DSN=dsn, LOOPBRIDGE_KIND="engine", LOOPBRIDGE_OPTIONS={"pool_size": 2, "max_overflow": 0}
    )
    lb = LoopBridge(app)

    @app.post("/sync")
    def sync_view() -> dict[str, Any]:
        with lb.engine.session() as session:
            return {"id": session.scalar(NOTE, {"kind": "sync"}), "same": lb.engine is get_engine()}

    @app.post("/async")
    async def async_view() -> dict[str, Any]:
        async with lb.engine.session() as session:
            return {"id": await session.scalar(NOTE, {"kind": "async"}), "same": lb.engine is get_engine()}

    @app.post("/fails")
    def failing_view() -> dict[str, Any]:
        with lb.engine.session() as session:
            session.execute(NOTE, {"kind": "rolled back"})
            raise LookupError("the scope rolls back")

    return app, lb


class TestEngine:
    def test_kind_engine_serves_sync_and_async_views_with_session_scopes(self, dsn: str) -> None:
        independent(dsn, "CREATE TABLE notes (id serial PRIMARY KEY, kind text NOT NULL)")
        app, lb = make_engine_app(dsn)
        engine = lb.engine
        assert isinstance(engine, Engine)
        try:
            client = app.test_client()
            for _ in range(2):  # the async view gets a new loop per request
                assert client.post("/sync").get_json()["same"] is True
                assert client.post("/async").get_json()["same"] is True
            app.testing = False  # the view's error becomes a 500, as in production
            assert client.post("/fails").status_code == 500
            assert lb.engine is engine  # one per process, not per request
        finally:
            engine.close()
        rows = independent(dsn, "SELECT kind FROM notes ORDER BY id")
        assert [row[0] for row in rows] == ["sync", "async", "sync", "async"]

    def test_an_app_with_an_engine_says_so_when_asked_for_a_database(self, dsn: str) -> None:
        app, lb = make_engine_app(dsn)
        try:
            with (
                app.app_context(),
                pytest.raises(RuntimeError, match=r"has a loopbridge.sqlalchemy Engine .*lb\.engine"),
            ):
                get_database()
        finally:
            lb.engine.close()
        app, lb = make_app(dsn)
        try:
            with pytest.raises(
                RuntimeError, match=r"has a loopbridge Database, no Engine: set .*LOOPBRIDGE_KIND"
            ):
                lb.engine  # noqa: B018
        finally:
            lb.database.close()

    def test_a_given_engine_and_database_are_used_as_is(self, db: Database, dsn: str, bridge: Bridge) -> None:
        engine = Engine(dsn, bridge=bridge)
        lb = LoopBridge(Flask("given"), database=db, engine=engine)
        assert lb.database is db
        assert lb.engine is engine

    def test_an_unknown_kind_names_the_config_key(self, dsn: str) -> None:
        app = Flask("bad-kind")
        app.config.update(LOOPBRIDGE_DSN=dsn, LOOPBRIDGE_KIND="sqlalchemy")
        with pytest.raises(
            ConfigurationError, match=r"app.config\['LOOPBRIDGE_KIND'\] is 'sqlalchemy'; it must be"
        ):
            LoopBridge(app)

    def test_an_engine_option_error_names_the_config_keys(self, dsn: str) -> None:
        app = Flask("bad-option")
        app.config.update(LOOPBRIDGE_DSN=dsn, LOOPBRIDGE_KIND="engine", LOOPBRIDGE_OPTIONS={"pool_sise": 2})
        with pytest.raises(ConfigurationError, match=r"LOOPBRIDGE_DSN / LOOPBRIDGE_OPTIONS.*pool_sise"):
            LoopBridge(app)

    @pytest.mark.parametrize("kind", ["database", "engine"])
    def test_no_dsn_at_all_names_the_config_key(self, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("LOOPBRIDGE_DSN", raising=False)
        monkeypatch.delenv("DATABASE_URL", raising=False)
        app = Flask("no-dsn")
        app.config["LOOPBRIDGE_KIND"] = kind
        with pytest.raises(
            ConfigurationError, match=r"has no DSN: set app.config\['LOOPBRIDGE_DSN'\] ="
        ) as caught:
            LoopBridge(app)
        assert "Database(" not in str(caught.value)


def post(served: Served, path: str) -> dict[str, Any]:
    response = httpx.post(served.url + path, timeout=WAIT)
    assert response.status_code == 200, served.output()
    body: dict[str, Any] = response.json()
    return body


def serve_until(served: Served, want: int, excluded: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """Post (8 at a time) until *want* distinct workers not in *excluded* have answered; bounded."""
    answers: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while len({a["worker"] for a in answers} - excluded) < want:
            assert time.monotonic() < deadline, f"only workers {answers} answered\n{served.output()}"
            batch = [pool.submit(post, served, "/sync" if n % 2 else "/async") for n in range(8)]
            answers += [future.result(timeout=WAIT) for future in batch]
    return answers


@pytest.mark.slow
class TestGunicornPreload:
    def test_workers_serve_and_the_masters_connections_survive(
        self, dsn: str, admin_dsn: str, schema: str
    ) -> None:
        port = free_port()
        argv = python(
            "-m", "gunicorn", "tests.apps.flask_app:app", "--preload", "--workers", "2",
            "--worker-class", "sync", "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5",
        )  # fmt: skip
        with serve(argv, port=port, env={"LOOPBRIDGE_DSN": dsn}) as served:
            # Before any query, the only sessions are the master's: the pool it opened at import.
            master_backends = backends(admin_dsn, schema)
            master = httpx.get(f"{served.url}/master", timeout=WAIT).json()
            assert master["pid"] == served.proc.pid
            assert master["backend"] in master_backends
            assert len(master_backends) == 2  # min_size

            answers = serve_until(served, want=2)
            workers = {a["worker"] for a in answers}
            assert master["pid"] not in workers
            worker_backends = {a["backend"] for a in answers}
            assert not worker_backends & master_backends  # each worker has a pool of its own
            assert master_backends <= backends(admin_dsn, schema)  # and the master's are alive

            # A worker that exits (gunicorn replaces it) must not take the master's sessions along.
            os.kill(next(iter(workers)), signal.SIGTERM)
            serve_until(served, want=1, excluded=frozenset(workers))
            assert master_backends <= backends(admin_dsn, schema)

            assert served.stop() == 0
            assert "Traceback" not in served.output()

        # Every answer was a row; the rows of the requests after the restart come on top.
        assert independent(dsn, "SELECT count(*) FROM hits")[0][0] >= len(answers)
        deadline = time.monotonic() + 10
        while backends(admin_dsn, schema) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert backends(admin_dsn, schema) == set()  # everyone closed their pools at exit


@pytest.mark.slow
def test_an_engine_under_gunicorn_preload_serves_from_every_worker(
    dsn: str, admin_dsn: str, schema: str
) -> None:
    port = free_port()
    argv = python(
        "-m", "gunicorn", "tests.apps.flask_engine_app:app", "--preload", "--workers", "2",
        "--worker-class", "sync", "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5",
    )  # fmt: skip
    with serve(argv, port=port, env={"LOOPBRIDGE_DSN": dsn}) as served:
        answers = serve_until(served, want=2)
        assert served.proc.pid not in {a["worker"] for a in answers}  # the master only made the table
        assert served.stop() == 0
        assert "Traceback" not in served.output()
    rows = independent(dsn, "SELECT kind, count(*) FROM engine_hits GROUP BY kind ORDER BY kind")
    assert sum(row[1] for row in rows) == len(answers)
    assert [row[0] for row in rows] == ["async", "sync"]
    deadline = time.monotonic() + 10
    while backends(admin_dsn, schema) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert backends(admin_dsn, schema) == set()  # every worker closed its engine at exit
