"""Django: ``loopbridge.contrib.django`` with sync and async views, under WSGI and under ASGI.

In this process through Django's test ``Client`` (WSGI: async views run on a loop of their own per
request) and ``AsyncClient`` (ASGI: sync views run in Django's thread-sensitive executor), and served
by real servers in subprocesses: uvicorn for ASGI, gunicorn (threaded workers) for WSGI.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import django
import httpx
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import AsyncClient, Client

from loopbridge import Database
from loopbridge._dsn import parse_dsn
from loopbridge.contrib import _held
from loopbridge.contrib.django import Databases, Engines, _build, databases, engines
from loopbridge.contrib.django._settings import Entry, alias_dsn
from loopbridge.sqlalchemy import Engine
from tests.servers import Served, free_port, python, serve
from tests.support import WAIT, independent, run_loop, run_script, throwaway_schema, with_query

SETTINGS = "tests.apps.djangoproject.settings"
HITS = "CREATE TABLE hits (id serial PRIMARY KEY, kind text NOT NULL)"


@pytest.fixture(scope="session")
def django_dsn(admin_dsn: str) -> Iterator[str]:
    """Django set up once in this process, on a schema of its own for the whole session."""
    with throwaway_schema(admin_dsn, "lbt_django_") as schema:
        dsn = with_query(admin_dsn, search_path=schema, application_name=schema)
        independent(dsn, HITS)
        # The settings module reads $LOOPBRIDGE_DSN when django.setup() imports it; only then.
        saved = {name: os.environ.get(name) for name in ("LOOPBRIDGE_DSN", "DJANGO_SETTINGS_MODULE")}
        os.environ.update(LOOPBRIDGE_DSN=dsn, DJANGO_SETTINGS_MODULE=SETTINGS)
        try:
            django.setup()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        try:
            yield dsn
        finally:
            databases.close_all()


class TestTestClients:
    def test_the_app_builds_the_databases_and_engines_of_the_settings(self, django_dsn: str) -> None:
        assert list(databases) == ["default"]
        assert list(engines) == ["orm"]
        assert isinstance(engines["orm"], Engine)
        db = databases["default"]
        assert isinstance(db, Database)
        assert "search_path=lbt_django_" in db.dsn

    def test_sync_view_under_wsgi(self, django_dsn: str) -> None:
        body = Client().get("/sync").json()
        assert body["loop"] is None
        assert independent(django_dsn, "SELECT kind FROM hits WHERE id = $1", body["id"])[0][0] == "sync"

    def test_async_view_under_wsgi_runs_on_a_loop_of_its_own(self, django_dsn: str) -> None:
        bodies = [Client().get("/async").json() for _ in range(3)]  # a new loop per request
        assert all(body["loop"] is not None and not body["bridge_loop_is_this_loop"] for body in bodies)
        kinds = independent(django_dsn, "SELECT kind FROM hits WHERE id = ANY($1)", [b["id"] for b in bodies])
        assert [row[0] for row in kinds] == ["async"] * 3

    @pytest.mark.asyncio
    async def test_async_view_under_asgi(self, django_dsn: str) -> None:
        body = (await AsyncClient().get("/async")).json()
        assert body["loop"] is not None
        assert body["bridge_loop_is_this_loop"] is False

    def test_engine_views_under_wsgi(self, django_dsn: str) -> None:
        ids = [Client().get(path).json()["id"] for path in ("/engine-sync", "/engine-async", "/engine-async")]
        rows = independent(django_dsn, "SELECT kind FROM hits WHERE id = ANY($1) ORDER BY id", ids)
        assert [row[0] for row in rows] == ["engine-sync", "engine-async", "engine-async"]

    @pytest.mark.asyncio
    async def test_engine_views_under_asgi(self, django_dsn: str) -> None:
        synced = (await AsyncClient().get("/engine-sync")).json()
        awaited = (await AsyncClient().get("/engine-async")).json()
        assert synced["loop"] is None  # the thread-sensitive executor, blocking on the bridge
        assert awaited["loop"] is not None
        assert awaited["bridge_loop_is_this_loop"] is False
        assert engines["orm"].bridge is databases["default"].bridge  # one bridge thread for both

    @pytest.mark.asyncio
    async def test_sync_view_under_asgi_runs_in_the_thread_sensitive_executor(self, django_dsn: str) -> None:
        responses = await asyncio.gather(*(AsyncClient().get("/sync") for _ in range(5)))
        bodies = [response.json() for response in responses]
        assert all(body["loop"] is None for body in bodies)  # a worker thread, blocking on the bridge
        assert len({body["id"] for body in bodies}) == 5


def build(setting: Any) -> Databases:
    """The Databases (and, through ``Engines(built._registry)``, the Engines) of a LOOPBRIDGE setting."""
    registry = Databases()
    registry.configure(setting)
    return registry


class TestSettings:
    def test_each_entry_becomes_a_database_with_its_options(self, admin_dsn: str) -> None:
        built = build({"default": {"dsn": admin_dsn, "max_size": 3}, "other": {"dsn": admin_dsn}})
        assert sorted(built) == ["default", "other"]
        assert built["default"].stats().max_size == 3
        built.close_all()

    def test_an_entry_of_kind_engine_becomes_a_sqlalchemy_engine(self, dsn: str, schema: str) -> None:
        built = build({"default": {"dsn": dsn}, "orm": {"dsn": dsn, "kind": "engine", "pool_size": 1}})
        engines = Engines(built._registry)
        try:
            assert list(built) == ["default"]
            assert list(engines) == ["orm"]
            assert isinstance(engines["orm"], Engine)
            assert (
                engines["orm"].run_sync(lambda c: c.exec_driver_sql("SELECT current_schema()").scalar())
                == schema
            )
            with pytest.raises(
                KeyError, match=r"builds an Engine \('kind': 'engine'\): use .*engines\['orm'\]"
            ):
                built["orm"]
            with pytest.raises(KeyError, match=r"builds a Database: use .*databases\['default'\]"):
                engines["default"]
            assert "orm" not in built
            assert "orm" in engines
        finally:
            built.close_all()
        assert engines["orm"].closed

    def test_an_entry_without_a_dsn_names_the_setting_to_set(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("LOOPBRIDGE_DSN", raising=False)
        monkeypatch.delenv("DATABASE_URL", raising=False)
        with pytest.raises(ImproperlyConfigured) as caught:
            build({"default": {"max_size": 2}})
        message = str(caught.value)
        assert (
            "settings.LOOPBRIDGE['default'] has no DSN: set settings.LOOPBRIDGE['default']['dsn'] ="
            in message
        )
        assert "settings.LOOPBRIDGE['default']['alias'] = 'default'" in message
        assert "Database(" not in message  # not the library's own advice: this is a Django setting

    @pytest.mark.parametrize(
        ("setting", "message"),
        [
            (None, "must be a dict of named databases"),
            ({}, r"must be a dict of named databases.*\(empty\)"),
            (
                {"default": "postgresql://x@h/db"},
                r"LOOPBRIDGE\['default'\] must be a dict of Database options",
            ),
            ({"default": {"dsn": "mysql://x@h/db"}}, r"LOOPBRIDGE\['default'\]: unsupported DSN scheme"),
            (
                {"default": {"dsn": "postgresql://h/db", "command_timout": 3}},
                "did you mean 'command_timeout'",
            ),
            ({"default": {"dns": "postgresql://h/db"}}, r"has the key 'dns': did you mean 'dsn'\?"),
            ({"default": {"DSN": "postgresql://h/db"}}, r"has the key 'DSN': did you mean 'dsn'\?"),
            ({"default": {"alais": "default"}}, r"has the key 'alais': did you mean 'alias'\?"),
            ({"default": {"engine": True}}, r"has the key 'engine': did you mean 'kind': 'engine'\?"),
            ({"default": {"dsn": "postgresql://h/db", "kind": "orm"}}, r"\['kind'\] is 'orm': it must be"),
            (
                {"default": {"dsn": "postgresql://h/db", "alias": "default"}},
                r"has both 'dsn' and 'alias': give one",
            ),
            ({"default": {"alias": 1}}, r"\['alias'\] must be the name of a DATABASES entry"),
        ],
    )
    def test_a_bad_setting_says_which_entry_and_what_to_do(self, setting: Any, message: str) -> None:
        with pytest.raises(ImproperlyConfigured, match=message):
            build(setting)

    def test_a_password_never_appears_in_the_error(self) -> None:
        with pytest.raises(ImproperlyConfigured) as caught:
            build({"default": {"dsn": "postgresql://u:hunter2secret@h:99999/db"}})
        assert "hunter2secret" not in str(caught.value)

    def test_databases_before_django_starts_says_what_to_do(self) -> None:
        with pytest.raises(
            ImproperlyConfigured, match=r"add 'loopbridge\.contrib\.django' to INSTALLED_APPS"
        ):
            Databases()["default"]

    def test_an_unknown_name_lists_the_configured_ones(self, django_dsn: str) -> None:
        with pytest.raises(KeyError, match="defines 'default'"):
            databases["analytics"]

    def test_an_alias_settings_databases_lacks_lists_the_defined_ones(self, django_dsn: str) -> None:
        with pytest.raises(
            ImproperlyConfigured, match=r"\['alias'\] is 'nope', which settings.DATABASES does not"
        ):
            build({"default": {"alias": "nope"}})

    def test_an_alias_that_is_not_postgresql_is_refused(self, django_dsn: str) -> None:
        # The test project has no ORM database: Django's dummy backend stands in for DATABASES['default'].
        with pytest.raises(
            ImproperlyConfigured, match=r"names DATABASES\['default'\], whose ENGINE is 'django"
        ):
            build({"default": {"alias": "default"}})

    def test_close_all_leaves_the_database_the_pytest_plugin_holds_to_the_plugin(self, dsn: str) -> None:
        # loopbridge_app_db may be a Django app's Database; the plugin closes it when the session ends.
        registry = Databases()
        registry.configure({"default": {"dsn": dsn}, "other": {"dsn": dsn}})
        held, other = registry["default"], registry["other"]
        _held.hold(held)
        try:
            registry.close_all()
            assert not held.closed
            assert held.fetchval("SELECT 1") == 1
            assert other.closed
        finally:
            assert _held.release(held)  # the close it asked for is the plugin's to do now
            held.close()


POSTGRESQL = "django.db.backends.postgresql"
ALIASED = Entry("default", "database", None, "default")


def databases_entry(admin_dsn: str, **changes: Any) -> dict[str, Any]:
    """A DATABASES entry for the test server, as a Django project would write it."""
    info = parse_dsn(admin_dsn)
    entry = {
        "ENGINE": POSTGRESQL,
        "NAME": info.database,
        "HOST": info.hosts[0],
        "PORT": info.ports[0],
        "USER": info.user,
        "PASSWORD": info.password or "",
        "OPTIONS": {},
    }
    return {**entry, **changes}


class TestTheDsnOfAnAlias:
    def test_host_port_user_name_and_options_reach_the_server(self, admin_dsn: str, schema: str) -> None:
        options = {
            "application_name": schema,
            "options": f"-c search_path={schema} --statement-timeout=4000",
            "connect_timeout": "7",
            "sslmode": "disable",
            "isolation_level": 1,  # the ORM's: left to it
            "server_side_binding": True,
        }
        settings_dict = databases_entry(admin_dsn, OPTIONS=options)
        db = _build(ALIASED, settings_dict)
        assert isinstance(db, Database)
        try:
            row = db.fetchrow(
                "SELECT current_database() AS name, current_schema() AS schema, "
                "current_setting('statement_timeout') AS timeout, current_setting('application_name') AS app"
            )
            assert row is not None
            assert dict(row) == {
                "name": settings_dict["NAME"],
                "schema": schema,
                "timeout": "4s",
                "app": schema,
            }
        finally:
            db.close()
        assert alias_dsn(ALIASED, settings_dict)[1] == {"timeout": 7.0}  # connect_timeout: asyncpg's timeout

    @pytest.mark.parametrize(
        ("changes", "dsn"),
        [
            ({}, "postgresql://app@db:5432/shop"),
            ({"PORT": 6432}, "postgresql://app@db:6432/shop"),
            ({"HOST": "", "PORT": ""}, "postgresql://app@/shop"),
            ({"HOST": "", "PORT": "5433"}, "postgresql://app@/shop?port=5433"),
            (
                {"HOST": "/var/run/postgresql"},
                "postgresql://app@/shop?host=%2Fvar%2Frun%2Fpostgresql&port=5432",
            ),
            ({"HOST": "db1,db2", "PORT": ""}, "postgresql://app@db1,db2/shop"),
            ({"HOST": "db1,db2", "PORT": "5432"}, "postgresql://app@db1:5432,db2:5432/shop"),
            ({"HOST": "db1,db2", "PORT": "1,2"}, "postgresql://app@db1:1,db2:2/shop"),
            ({"HOST": "::1"}, "postgresql://app@[::1]:5432/shop"),
            ({"USER": "", "NAME": "a/b c"}, "postgresql://db:5432/a%2Fb%20c"),
            (
                {"OPTIONS": {"target_session_attrs": "read-write"}},
                "postgresql://app@db:5432/shop?target_session_attrs=read-write",
            ),
        ],
    )
    def test_the_dsn_reads_the_entry_as_djangos_backend_does(self, changes: dict[str, Any], dsn: str) -> None:
        settings_dict = {
            "ENGINE": POSTGRESQL,
            "NAME": "shop",
            "HOST": "db",
            "PORT": "5432",
            "USER": "app",
            **changes,
        }
        assert alias_dsn(ALIASED, settings_dict)[0] == dsn

    def test_the_password_is_percent_encoded_and_never_shown(self) -> None:
        secret = "hunter2 s/e@c:r#t"
        settings_dict = {
            "ENGINE": POSTGRESQL,
            "NAME": "shop",
            "HOST": "db",
            "USER": "app",
            "PASSWORD": secret,
        }
        db = _build(ALIASED, settings_dict)
        assert isinstance(db, Database)
        assert parse_dsn(alias_dsn(ALIASED, settings_dict)[0]).password == secret
        assert "hunter2" not in repr(db) + db.dsn
        db.close()
        with pytest.raises(
            ImproperlyConfigured, match=r"LOOPBRIDGE\['default'\] \(the server of DATABASES"
        ) as caught:
            _build(ALIASED, {**settings_dict, "PORT": "99999"})
        assert "hunter2" not in str(caught.value)
        assert "s%2Fe%40c" not in str(caught.value)

    @pytest.mark.parametrize(
        ("changes", "message"),
        [
            (
                {"ENGINE": "django.db.backends.sqlite3"},
                r"whose ENGINE is 'django.db.backends.sqlite3': loopbridge",
            ),
            (
                {"OPTIONS": {"keepalives": 1}},
                r"whose OPTIONS has 'keepalives', which loopbridge cannot pass on",
            ),
            (
                {"OPTIONS": {"options": "-c"}},
                r"OPTIONS\['options'\] is '-c': loopbridge reads '-c name=value'",
            ),
            ({"OPTIONS": {"connect_timeout": "soon"}}, r"\['connect_timeout'\] must be a number of seconds"),
            ({"HOST": "/tmp,db"}, r"HOST'\] mixes socket directories and host names"),
            ({"HOST": "a,b,c", "PORT": "1,2"}, r"lists 3 HOST\(s\) but 2 PORTs"),
        ],
    )
    def test_what_loopbridge_cannot_follow_is_refused_naming_the_setting(
        self, changes: dict[str, Any], message: str
    ) -> None:
        settings_dict = {
            "ENGINE": POSTGRESQL,
            "NAME": "shop",
            "HOST": "db",
            "PORT": "5432",
            "USER": "app",
            **changes,
        }
        with pytest.raises(ImproperlyConfigured, match=message):
            alias_dsn(ALIASED, settings_dict)

    def test_an_engine_gets_connect_timeout_among_its_connect_args(self, admin_dsn: str, schema: str) -> None:
        entry = Entry("orm", "engine", None, "default", {"pool_size": 1})
        engine = _build(
            entry,
            databases_entry(admin_dsn, OPTIONS={"connect_timeout": 3, "options": f"-c search_path={schema}"}),
        )
        assert isinstance(engine, Engine)
        try:
            assert engine._connect_args["timeout"] == 3.0
            assert engine.run_sync(lambda c: c.exec_driver_sql("SELECT current_schema()").scalar()) == schema
        finally:
            engine.close()


AT_EXIT = """
import asyncio, atexit, json, os, time

import asyncpg

from loopbridge.contrib.django import Databases

seen = {}
close_all = Databases.close_all


def watched_close_all(self):
    # The app's own exit hook: it must run while the bridge still runs, before loopbridge's own exit
    # handler closes the bridges (and with them, less gracefully, whatever is still open).
    seen["bridge_running"] = self["default"].bridge.running
    close_all(self)
    seen["closed"] = {name: db.closed for name, db in self.items()}


Databases.close_all = watched_close_all


def last():
    # Registered first, so it runs last: after every hook, what does the server still see?
    async def sessions():
        conn = await asyncpg.connect(os.environ["ADMIN_DSN"])
        try:
            query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
            name, deadline = os.environ["APP_NAME"], time.monotonic() + 10
            while (left := await conn.fetchval(query, name)) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # a backend leaves pg_stat_activity shortly after it ends
            return left
        finally:
            await conn.close()

    print("AT EXIT", json.dumps({**seen, "sessions": asyncio.run(sessions())}), flush=True)


atexit.register(last)

from django.conf import settings

settings.configure(
    INSTALLED_APPS=["loopbridge.contrib.django"],
    LOOPBRIDGE={"default": {"min_size": 2}, "reports": {"max_size": 1}},  # the DSN from $LOOPBRIDGE_DSN
)
import django

django.setup()
from loopbridge.contrib.django import databases

databases["reports"].fetchval("SELECT 1")
query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
print("OPEN", databases["default"].fetchval(query, os.environ["APP_NAME"]), flush=True)
"""


def test_the_apps_exit_hook_closes_every_database_and_the_server_sees_its_sessions_end(
    dsn: str, admin_dsn: str, schema: str
) -> None:
    out = run_script(AT_EXIT, env={"LOOPBRIDGE_DSN": dsn, "ADMIN_DSN": admin_dsn, "APP_NAME": schema})
    assert "OPEN 3" in out  # default's two, reports' one
    report = json.loads(out.split("AT EXIT ", 1)[1])
    assert report == {"bridge_running": True, "closed": {"default": True, "reports": True}, "sessions": 0}


def test_the_dsn_defaults_to_loopbridge_dsn_then_database_url(
    dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LOOPBRIDGE_DSN", raising=False)
    monkeypatch.setenv("DATABASE_URL", dsn)
    db = build({"default": {"max_size": 1}})["default"]
    try:
        assert db.fetchval("SELECT current_schema()") == schema
    finally:
        db.close()
    monkeypatch.setenv("LOOPBRIDGE_DSN", "postgresql://first@h/wins")
    db = build({"default": {}})["default"]
    assert db.dsn == "postgresql://first@h/wins"
    db.close()


@pytest.fixture
def django_env(dsn: str) -> dict[str, str]:
    independent(dsn, HITS)
    return {"LOOPBRIDGE_DSN": dsn, "DJANGO_SETTINGS_MODULE": SETTINGS}


def no_backends_left(admin_dsn: str, application_name: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
    while independent(admin_dsn, query, application_name)[0][0]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def kinds(dsn: str) -> list[tuple[str, int]]:
    rows = independent(dsn, "SELECT kind, count(*) FROM hits GROUP BY kind ORDER BY kind")
    return [(row[0], row[1]) for row in rows]


PATHS = ("/sync", "/async", "/engine-sync", "/engine-async")


def hit_all(served: Served, count: int) -> list[dict[str, Any]]:
    """*count* requests at once, spread over the four views."""

    async def go() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=served.url, timeout=WAIT) as client:
            responses = await asyncio.gather(*(client.get(PATHS[n % len(PATHS)]) for n in range(count)))
        assert [response.status_code for response in responses] == [200] * count, served.output()
        return [response.json() for response in responses]

    return run_loop(go, timeout=90)


EVERY_VIEW_TEN_TIMES = [("async", 10), ("engine-async", 10), ("engine-sync", 10), ("sync", 10)]


@pytest.mark.slow
class TestServers:
    def test_asgi_under_uvicorn(
        self, django_env: dict[str, str], dsn: str, admin_dsn: str, schema: str
    ) -> None:
        port = free_port()
        argv = python(
            "-m", "uvicorn", "tests.apps.djangoproject.asgi:application", "--host", "127.0.0.1",
            "--port", str(port), "--lifespan", "off", "--no-access-log",
        )  # fmt: skip
        with serve(argv, port=port, env=django_env) as served:
            bodies = hit_all(served, 40)
            served.stop()
            assert "Traceback" not in served.output()
        sync = [body for body in bodies if "bridge_loop_is_this_loop" not in body]
        asynchronous = [body for body in bodies if "bridge_loop_is_this_loop" in body]
        assert all(body["loop"] is None for body in sync)  # the thread-sensitive executor
        assert all(body["loop"] and not body["bridge_loop_is_this_loop"] for body in asynchronous)
        assert kinds(dsn) == EVERY_VIEW_TEN_TIMES
        assert no_backends_left(admin_dsn, schema)  # closed at exit, by every worker

    def test_wsgi_under_gunicorn(
        self, django_env: dict[str, str], dsn: str, admin_dsn: str, schema: str
    ) -> None:
        port = free_port()
        argv = python(
            "-m", "gunicorn", "tests.apps.djangoproject.wsgi:application", "--bind", f"127.0.0.1:{port}",
            "--workers", "2", "--worker-class", "gthread", "--threads", "4", "--graceful-timeout", "5",
        )  # fmt: skip
        with serve(argv, port=port, env=django_env) as served:
            bodies = hit_all(served, 40)
            assert served.stop() == 0
            assert "Traceback" not in served.output()
        assert all(body.get("bridge_loop_is_this_loop") in (None, False) for body in bodies)
        assert kinds(dsn) == EVERY_VIEW_TEN_TIMES
        assert no_backends_left(admin_dsn, schema)  # closed at exit, by every worker
