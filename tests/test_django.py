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
import uuid
from collections.abc import Iterator
from typing import Any

import django
import httpx
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import AsyncClient, Client

from loopbridge import Database
from loopbridge.contrib import _held
from loopbridge.contrib.django import Databases, build, databases
from tests.servers import Served, free_port, python, serve
from tests.support import WAIT, independent, run_loop, run_script, with_query

SETTINGS = "tests.apps.djangoproject.settings"
HITS = "CREATE TABLE hits (id serial PRIMARY KEY, kind text NOT NULL)"


@pytest.fixture(scope="session")
def django_dsn(admin_dsn: str) -> Iterator[str]:
    """Django set up once in this process, on a schema of its own for the whole session."""
    schema = f"lbt_django_{uuid.uuid4().hex[:8]}"
    independent(admin_dsn, f"CREATE SCHEMA {schema}")
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
    yield dsn
    databases.close_all()
    independent(admin_dsn, f"DROP SCHEMA {schema} CASCADE")


class TestTestClients:
    def test_the_app_builds_the_databases_of_the_settings(self, django_dsn: str) -> None:
        assert list(databases) == ["default"]
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

    @pytest.mark.asyncio
    async def test_sync_view_under_asgi_runs_in_the_thread_sensitive_executor(self, django_dsn: str) -> None:
        responses = await asyncio.gather(*(AsyncClient().get("/sync") for _ in range(5)))
        bodies = [response.json() for response in responses]
        assert all(body["loop"] is None for body in bodies)  # a worker thread, blocking on the bridge
        assert len({body["id"] for body in bodies}) == 5


class TestSettings:
    def test_each_entry_becomes_a_database_with_its_options(self, admin_dsn: str) -> None:
        built = build({"default": {"dsn": admin_dsn, "max_size": 3}, "other": {"dsn": admin_dsn}})
        assert sorted(built) == ["default", "other"]
        assert built["default"].stats().max_size == 3
        for db in built.values():
            db.close()

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


def hit_both(served: Served, count: int) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=served.url, timeout=WAIT) as client:
            responses = await asyncio.gather(
                *(client.get("/async" if n % 2 else "/sync") for n in range(count))
            )
        assert [response.status_code for response in responses] == [200] * count, served.output()
        return [response.json() for response in responses]

    return run_loop(go, timeout=90)


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
            bodies = hit_both(served, 40)
            served.stop()
            assert "Traceback" not in served.output()
        sync = [body for body in bodies if "bridge_loop_is_this_loop" not in body]
        asynchronous = [body for body in bodies if "bridge_loop_is_this_loop" in body]
        assert all(body["loop"] is None for body in sync)  # the thread-sensitive executor
        assert all(body["loop"] and not body["bridge_loop_is_this_loop"] for body in asynchronous)
        assert kinds(dsn) == [("async", 20), ("sync", 20)]
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
            bodies = hit_both(served, 40)
            assert served.stop() == 0
            assert "Traceback" not in served.output()
        assert all(body.get("bridge_loop_is_this_loop") in (None, False) for body in bodies)
        assert kinds(dsn) == [("async", 20), ("sync", 20)]
        assert no_backends_left(admin_dsn, schema)  # closed at exit, by every worker
