"""The examples run, each by the command(s) written at its top (read from the file, so the two cannot
drift apart), against the test server through ``$LOOPBRIDGE_DSN``.

They run one after another on **one** schema, as a user following the documentation runs them against one
database: an example that reused another's table name (Flask's and Django's both made a ``visits`` table,
with different columns, and whichever ran second answered 500) fails here.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.servers import ROOT, free_port, serve
from tests.support import WAIT, independent, throwaway_schema, with_query

EXAMPLES = ROOT / "examples"

#: The examples in the documentation's order; each keeps to tables named ``example_<name>_...``.
TABLES = {
    "fastapi": ["example_fastapi_notes"],
    "django": ["example_django_visits"],
    "flask": ["example_flask_visits"],
    "notebook": ["example_notebook_readings"],
}


def run_commands(example: Path) -> list[list[str]]:
    """The argvs of the example's documented commands: the indented ``LOOPBRIDGE_DSN=... command`` lines
    of its docstring (or of its notebook's first cell)."""
    text = example.read_text()
    if example.suffix == ".ipynb":
        text = "".join(json.loads(text)["cells"][0]["source"])
    else:
        text = ast.get_docstring(ast.parse(text)) or ""
    commands = []
    for found in re.finditer(r"^ {4}((?:[A-Z_]+=\S+ )+)(.+)$", text, re.MULTILINE):
        # The DSN set there is replaced by the test's; nothing else may be needed.
        assert [item.split("=", 1)[0] for item in found[1].split()] == ["LOOPBRIDGE_DSN"]
        argv = shlex.split(found[2])
        argv[0] = str(Path(sys.executable).with_name(argv[0]))  # the venv's uvicorn / gunicorn / jupyter
        commands.append(argv)
    assert commands, f"{example.name} has no one-line command at its top"
    return commands


def run_command(example: Path, program: str) -> list[str]:
    """The example's one documented command running *program*."""
    found = [argv for argv in run_commands(example) if Path(argv[0]).name == program]
    assert len(found) == 1, f"{example.name} documents {len(found)} commands running {program}"
    return found[0]


def served_on(example: Path, program: str, port: int) -> list[str]:
    """The example's documented *program* command (uvicorn or gunicorn), listening on loopback *port*."""
    argv = run_command(example, program)
    if program == "gunicorn":
        return [*argv, "--bind", f"127.0.0.1:{port}"]
    return [*argv, "--host", "127.0.0.1", "--port", str(port)]


@contextmanager
def client_of(argv: list[str], port: int, dsn: str, ready: str) -> Iterator[httpx.Client]:
    with (
        serve(argv, port=port, env={"LOOPBRIDGE_DSN": dsn}, ready=ready) as served,
        httpx.Client(base_url=served.url, timeout=WAIT) as client,
    ):
        yield client
        served.stop()  # gracefully, within the bound
        assert "Traceback" not in served.output(), served.output()


def tables(dsn: str, schema: str) -> set[str]:
    rows = independent(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    return {row[0] for row in rows}


@pytest.fixture(scope="class")
def one_schema(admin_dsn: str) -> Iterator[tuple[str, str]]:
    """``(dsn, schema)``: one schema for every example in turn, as one database is for a user."""
    with throwaway_schema(admin_dsn, "lbt_examples_") as schema:
        yield with_query(admin_dsn, search_path=schema), schema


def test_every_example_is_covered() -> None:
    assert sorted(path.name for path in EXAMPLES.iterdir() if path.suffix in (".py", ".ipynb")) == [
        "django_app.py",
        "fastapi_app.py",
        "flask_app.py",
        "notebook.ipynb",
        "sqlalchemy_app.py",
    ]


def test_the_django_example_documents_asgi_and_wsgi() -> None:
    programs = [Path(argv[0]).name for argv in run_commands(EXAMPLES / "django_app.py")]
    assert programs == ["uvicorn", "gunicorn"]


@pytest.mark.slow
class TestExamplesOneAfterAnotherOnOneDatabase:
    """In the documentation's order, each example on the tables the ones before it left."""

    def test_fastapi(self, one_schema: tuple[str, str]) -> None:
        dsn, schema = one_schema
        port = free_port()
        argv = served_on(EXAMPLES / "fastapi_app.py", "uvicorn", port)
        with client_of(argv, port, dsn, ready="/notes") as client:
            assert client.post("/notes", params={"text": "hello"}).json() == {"id": 1, "text": "hello"}
            assert client.get("/notes").json() == [{"id": 1, "text": "hello"}]
        assert set(TABLES["fastapi"]) <= tables(dsn, schema)

    def test_django_under_asgi(self, one_schema: tuple[str, str]) -> None:
        dsn, schema = one_schema
        port = free_port()
        argv = served_on(EXAMPLES / "django_app.py", "uvicorn", port)
        with client_of(argv, port, dsn, ready="/visit") as client:
            visits = client.get("/avisit").json()["visits"]
            assert client.get("/visit").json() == {"visits": visits + 1}
        assert set(TABLES["django"]) <= tables(dsn, schema)

    def test_django_under_wsgi(self, one_schema: tuple[str, str]) -> None:
        dsn, _ = one_schema
        port = free_port()
        argv = served_on(EXAMPLES / "django_app.py", "gunicorn", port)
        with client_of(argv, port, dsn, ready="/visit") as client:
            # The async view under WSGI: a loop of its own per request, the same Database.
            visits = client.get("/avisit").json()["visits"]
            assert client.get("/visit").json() == {"visits": visits + 1}
            assert client.get("/avisit").json() == {"visits": visits + 2}

    def test_flask_under_gunicorn_preload(self, one_schema: tuple[str, str]) -> None:
        dsn, schema = one_schema
        port = free_port()
        argv = served_on(EXAMPLES / "flask_app.py", "gunicorn", port)
        assert "--preload" in argv
        with client_of(argv, port, dsn, ready="/visits") as client:
            for _ in range(4):
                client.post("/visit").raise_for_status()
            assert sum(client.get("/visits").json()["by_worker"].values()) == 4
        assert set(TABLES["flask"]) <= tables(dsn, schema)

    def test_notebook(self, one_schema: tuple[str, str]) -> None:
        dsn, schema = one_schema
        proc = subprocess.run(
            run_command(EXAMPLES / "notebook.ipynb", "jupyter"),
            cwd=ROOT,
            env={**os.environ, "LOOPBRIDGE_DSN": dsn, "JUPYTER_PLATFORM_DIRS": "1"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert set(TABLES["notebook"]) <= tables(dsn, schema)

    def test_sqlalchemy(self, one_schema: tuple[str, str]) -> None:
        # Documented as `python examples/sqlalchemy_app.py` (after installing the extra); it drops its
        # tables at the end. Its own test is in tests/test_sqlalchemy.py.
        dsn, _ = one_schema
        proc = subprocess.run(
            [sys.executable, "examples/sqlalchemy_app.py"],
            cwd=ROOT,
            env={**os.environ, "LOOPBRIDGE_DSN": dsn},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.rstrip().endswith("OK"), proc.stdout

    def test_each_example_kept_to_tables_of_its_own(self, one_schema: tuple[str, str]) -> None:
        dsn, schema = one_schema
        assert tables(dsn, schema) <= {table for names in TABLES.values() for table in names}
