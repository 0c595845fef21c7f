"""Django's test runners, followed: throwaway Django projects run by ``manage.py test`` and by pytest-django.

Each project's ``DATABASES['default']`` names a real database of its own, holding 303 rows the tests must
never see; ``LOOPBRIDGE`` takes its server from that alias (a Database and a SQLAlchemy Engine). Both
runners create the test database ``test_<name>`` for the ORM; the tests inside assert that loopbridge is
there too (the ORM and loopbridge see the same rows), and afterwards the real database still holds its
303 rows and the test database is gone: Django could drop it, so loopbridge had closed its sessions on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from loopbridge._dsn import parse_dsn
from tests.support import drop_database, independent, on_database, throwaway_database

pytestmark = pytest.mark.slow

#: Rows in the real database: a test that sees them is on the wrong database.
REAL_ROWS = 303

SETTINGS = """
import os

SECRET_KEY = "throwaway"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "proj.urls"
INSTALLED_APPS = ["loopbridge.contrib.django", "shop.apps.ShopConfig"]
MIDDLEWARE = []
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["PROJECT_DB"],
        "HOST": os.environ["PROJECT_HOST"],
        "PORT": os.environ["PROJECT_PORT"],
        "USER": os.environ["PROJECT_USER"],
        "PASSWORD": os.environ["PROJECT_PASSWORD"],
        "OPTIONS": {"application_name": os.environ["PROJECT_DB"], "options": "-c lock_timeout=20s"},
    }
}
LOOPBRIDGE = {
    "default": {"alias": "default", "max_size": 2},
    "orm": {"alias": "default", "kind": "engine", "pool_size": 2, "max_overflow": 0},
}
"""

MANAGE = """
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""

URLS = """
from django.urls import path

from shop import views

urlpatterns = [
    path("sync", views.add_sync),
    path("async", views.add_async),
    path("engine-sync", views.add_engine_sync),
    path("engine-async", views.add_engine_async),
]
"""

# An app that uses loopbridge when Django starts: before either runner creates the test database.
APPS = """
from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "shop"
    early = None

    def ready(self):
        from loopbridge.contrib.django import databases

        ShopConfig.early = databases["default"]
        print("at startup, loopbridge sees", ShopConfig.early.fetchval("SELECT count(*) FROM shop_item"))
"""

MODELS = """
from django.db import models


class Item(models.Model):
    name = models.CharField(max_length=50)
"""

# Each view looks its Database or Engine up where it uses it, as the Django guide says.
VIEWS = """
from django.http import JsonResponse
from sqlalchemy import text

from loopbridge.contrib.django import databases, engines

INSERT = "INSERT INTO shop_item (name) VALUES ($1) RETURNING id"


def add_sync(request):
    return JsonResponse({"id": databases["default"].fetchval(INSERT, "sync view")})


async def add_async(request):
    return JsonResponse({"id": await databases["default"].afetchval(INSERT, "async view")})


def add_engine_sync(request):
    with engines["orm"].session() as session:
        new = session.scalar(text("INSERT INTO shop_item (name) VALUES ('engine sync view') RETURNING id"))
    return JsonResponse({"id": new})


async def add_engine_async(request):
    async with engines["orm"].session() as session:
        new = await session.scalar(
            text("INSERT INTO shop_item (name) VALUES ('engine async view') RETURNING id")
        )
    return JsonResponse({"id": new})
"""

VIEW_NAMES = ["async view", "engine async view", "engine sync view", "sync view"]

# manage.py test: Django's own TestCase classes.
DJANGO_TESTS = """
from django.db import connection, transaction
from django.test import AsyncClient, Client, TestCase, TransactionTestCase
from sqlalchemy import text

from loopbridge import DatabaseClosedError
from loopbridge.contrib.django import databases, engines
from shop.apps import ShopConfig
from shop.models import Item


def loopbridge_count():
    return databases["default"].fetchval("SELECT count(*) FROM shop_item")


class OnTheTestDatabase(TransactionTestCase):
    def test_loopbridge_and_the_engine_are_on_the_test_database(self):
        name = connection.settings_dict["NAME"]
        self.assertTrue(name.startswith("test_"), name)
        self.assertEqual(databases["default"].fetchval("SELECT current_database()"), name)
        with engines["orm"].session() as session:
            self.assertEqual(session.scalar(text("SELECT current_database()")), name)
        # OPTIONS reach loopbridge's sessions too.
        self.assertEqual(databases["default"].fetchval("SHOW lock_timeout"), "20s")

    def test_the_orm_and_loopbridge_see_the_same_rows(self):
        Item.objects.create(name="by the orm")
        databases["default"].execute("INSERT INTO shop_item (name) VALUES ('by loopbridge')")
        with engines["orm"].session() as session:
            session.execute(text("INSERT INTO shop_item (name) VALUES ('by the engine')"))
        print(f"ORM sees {Item.objects.count()} | loopbridge sees {loopbridge_count()}", flush=True)
        self.assertEqual(Item.objects.count(), 3)
        self.assertEqual(loopbridge_count(), 3)

    def test_views_write_where_the_orm_reads(self):
        for path in ("/sync", "/async", "/engine-sync", "/engine-async"):
            self.assertEqual(Client().post(path).status_code, 200)
        self.assertEqual(sorted(Item.objects.values_list("name", flat=True)), {view_names!r})

    async def test_async_views_under_asgi(self):
        for path in ("/sync", "/async", "/engine-sync", "/engine-async"):
            self.assertEqual((await AsyncClient().post(path)).status_code, 200)
        self.assertEqual(await databases["default"].afetchval("SELECT count(*) FROM shop_item"), 4)

    def test_the_database_used_before_the_test_database_existed_was_closed_and_replaced(self):
        early = ShopConfig.early
        self.assertTrue(early.closed)
        with self.assertRaises(DatabaseClosedError):
            early.fetchval("SELECT 1")
        self.assertIsNot(databases["default"], early)


class SeparateTransactions(TransactionTestCase):
    def test_atomic_holds_the_orms_writes_only(self):
        with transaction.atomic():
            Item.objects.create(name="not yet committed")
            self.assertEqual(loopbridge_count(), 0)  # another connection: it sees committed rows only
        self.assertEqual(loopbridge_count(), 1)

    def test_rolling_atomic_back_does_not_undo_loopbridge(self):
        try:
            with transaction.atomic():
                databases["default"].execute("INSERT INTO shop_item (name) VALUES ('committed at once')")
                raise LookupError
        except LookupError:
            pass
        self.assertEqual(list(Item.objects.values_list("name", flat=True)), ["committed at once"])


class InsideATestCase(TestCase):
    def test_the_orms_rows_of_a_testcase_are_invisible_to_loopbridge(self):
        Item.objects.create(name="inside the test's transaction")
        self.assertEqual(Item.objects.count(), 1)
        self.assertEqual(loopbridge_count(), 0)
"""

# manage.py test with no test needing a database: Django creates none.
DJANGO_NO_DATABASE = """
from django.test import SimpleTestCase

from loopbridge.contrib.django import databases


class WithoutADatabase(SimpleTestCase):
    def test_loopbridge_refuses_the_real_database(self):
        with self.assertRaisesMessage(RuntimeError, "no test database was created"):
            databases["default"].fetchval("SELECT count(*) FROM shop_item")
"""

# pytest-django: the same project, its tests in pytest's style.
PYTEST_INI = """
[pytest]
DJANGO_SETTINGS_MODULE = proj.settings
asyncio_default_fixture_loop_scope = function
filterwarnings = error
timeout = 90
"""

PYTEST_CONFTEST = """
import pytest


@pytest.fixture(scope="session")
def loopbridge_app_db(django_db_setup):
    # The Django guide's recipe: loopbridge_rollback_db around the Django app's own Database.
    from loopbridge.contrib.django import databases

    return databases["default"]
"""

# Alone in a run, so that pytest-django creates no test database (it runs the tests without database
# access last, once the test database exists, when there are others).
PYTEST_NO_DATABASE = r"""
import pytest

from loopbridge.contrib.django import databases, engines


def test_without_database_access_loopbridge_refuses_the_real_database():
    with pytest.raises(RuntimeError, match="no test database was created"):
        databases["default"].fetchval("SELECT count(*) FROM shop_item")
    with pytest.raises(RuntimeError, match=r"engines\['orm'\] up where you use it"):
        engines["orm"]
"""

PYTEST_TESTS = """
import pytest
from django.db import connection
from sqlalchemy import text

from loopbridge.contrib.django import databases, engines
from shop.models import Item


def loopbridge_count():
    return databases["default"].fetchval("SELECT count(*) FROM shop_item")


@pytest.mark.django_db(transaction=True)
def test_the_orm_and_loopbridge_see_the_same_rows():
    name = connection.settings_dict["NAME"]
    assert name.startswith("test_")
    assert databases["default"].fetchval("SELECT current_database()") == name
    Item.objects.create(name="by the orm")
    with engines["orm"].session() as session:
        session.execute(text("INSERT INTO shop_item (name) VALUES ('by the engine')"))
    print(f"ORM sees {Item.objects.count()} | loopbridge sees {loopbridge_count()}")
    assert Item.objects.count() == loopbridge_count() == 2


@pytest.mark.django_db(transaction=True)
def test_views_write_where_the_orm_reads(client):
    for path in ("/sync", "/async", "/engine-sync", "/engine-async"):
        assert client.post(path).status_code == 200
    assert sorted(Item.objects.values_list("name", flat=True)) == {view_names!r}


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_async_views_under_asgi(async_client):
    for path in ("/sync", "/async", "/engine-sync", "/engine-async"):
        assert (await async_client.post(path)).status_code == 200
    assert await databases["default"].afetchval("SELECT count(*) FROM shop_item") == 4


@pytest.mark.django_db
def test_the_orms_rows_inside_the_tests_transaction_are_invisible_to_loopbridge():
    Item.objects.create(name="inside the test's transaction")
    assert Item.objects.count() == 1
    assert loopbridge_count() == 0


@pytest.mark.usefixtures("loopbridge_rollback_db")
class TestRolledBackByLoopbridge:
    def test_first(self, client):
        assert client.post("/sync").status_code == 200
        assert loopbridge_count() == 1

    def test_second_sees_nothing_of_the_first(self, client):
        assert client.post("/async").status_code == 200
        assert loopbridge_count() == 1
"""


def _server_env(admin_dsn: str, name: str) -> dict[str, str]:
    info = parse_dsn(admin_dsn)
    return {
        "PROJECT_DB": name,
        "PROJECT_HOST": info.hosts[0],
        "PROJECT_PORT": info.ports[0],
        "PROJECT_USER": info.user,
        "PROJECT_PASSWORD": info.password or "",
        "DJANGO_SETTINGS_MODULE": "proj.settings",
    }


@pytest.fixture
def project(tmp_path: Path, admin_dsn: str) -> Iterator[tuple[Path, dict[str, str], str]]:
    """``(directory, environment, real database)``: a Django project whose DATABASES['default'] is a
    throwaway database holding 303 rows; it and the test database are dropped afterwards, whatever
    happened."""
    files = {
        "manage.py": MANAGE,
        "proj/__init__.py": "",
        "proj/settings.py": SETTINGS,
        "proj/urls.py": URLS,
        "shop/__init__.py": "",
        "shop/apps.py": APPS,
        "shop/models.py": MODELS,
        "shop/nodb.py": DJANGO_NO_DATABASE,
        "shop/views.py": VIEWS,
        "shop/tests.py": DJANGO_TESTS.replace("{view_names!r}", repr(VIEW_NAMES)),
        "pytest.ini": PYTEST_INI,
        "conftest.py": PYTEST_CONFTEST,
        "test_shop.py": PYTEST_TESTS.replace("{view_names!r}", repr(VIEW_NAMES)),
        "test_nodb.py": PYTEST_NO_DATABASE,
    }
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    with throwaway_database(admin_dsn, "lbt_dj_") as name:
        try:
            real = on_database(admin_dsn, name)
            independent(real, "CREATE TABLE shop_item (id bigserial PRIMARY KEY, name varchar(50) NOT NULL)")
            independent(
                real, "INSERT INTO shop_item (name) SELECT 'real' FROM generate_series(1, $1)", REAL_ROWS
            )
            yield tmp_path, _server_env(admin_dsn, name), name
        finally:
            drop_database(admin_dsn, f"test_{name}")


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run *argv* in the project; its output, and it must have exited 0."""
    proc = subprocess.run(
        argv, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=240, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return output


def after_the_run(admin_dsn: str, name: str) -> None:
    """The real database kept its rows and nothing else; the test database is gone."""
    query = "SELECT count(*), count(*) FILTER (WHERE name = 'real') FROM shop_item"
    assert tuple(independent(on_database(admin_dsn, name), query)[0]) == (REAL_ROWS, REAL_ROWS)
    left = independent(admin_dsn, "SELECT count(*) FROM pg_database WHERE datname = $1", f"test_{name}")
    assert left[0][0] == 0, "the test database was not dropped"


def test_manage_py_test_runs_loopbridge_on_the_test_database(
    project: tuple[Path, dict[str, str], str], admin_dsn: str
) -> None:
    path, env, name = project
    output = run([sys.executable, "manage.py", "test", "shop", "--noinput", "-v", "2"], path, env)
    assert f"at startup, loopbridge sees {REAL_ROWS}" in output  # the app's ready(), on the real database
    assert "Ran 8 tests" in output, output
    assert "ORM sees 3 | loopbridge sees 3" in output, output
    after_the_run(admin_dsn, name)


def test_manage_py_test_without_a_test_database_refuses_the_real_one(
    project: tuple[Path, dict[str, str], str], admin_dsn: str
) -> None:
    path, env, name = project
    output = run([sys.executable, "manage.py", "test", "shop.nodb", "--noinput"], path, env)
    assert "Ran 1 test" in output, output
    after_the_run(admin_dsn, name)


def test_pytest_django_runs_loopbridge_on_the_test_database(
    project: tuple[Path, dict[str, str], str], admin_dsn: str
) -> None:
    path, env, name = project
    env = {**env, "LOOPBRIDGE_TEST_DSN": admin_dsn}
    output = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", "test_shop.py"], path, env)
    assert "6 passed" in output, output
    assert "ORM sees 2 | loopbridge sees 2" in output, output
    after_the_run(admin_dsn, name)


def test_pytest_django_without_a_test_database_refuses_the_real_one(
    project: tuple[Path, dict[str, str], str], admin_dsn: str
) -> None:
    path, env, name = project
    output = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_nodb.py"], path, env)
    assert "1 passed" in output, output
    after_the_run(admin_dsn, name)
