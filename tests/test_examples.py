"""The examples run, each by the one command written at its top (read from the file, so the two cannot
drift apart), against the test server: a schema of the test's own through ``$LOOPBRIDGE_DSN``."""

from __future__ import annotations

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
from tests.support import WAIT

EXAMPLES = ROOT / "examples"


def run_command(example: Path) -> list[str]:
    """The argv of the example's documented command (in its docstring, or its notebook's first cell)."""
    text = example.read_text()
    if example.suffix == ".ipynb":
        text = "".join(json.loads(text)["cells"][0]["source"])
    found = re.search(r"^ {4}((?:[A-Z_]+=\S+ )+)(.+)$", text, re.MULTILINE)
    assert found is not None, f"{example.name} has no one-line command at its top"
    # The DSN set there is replaced by the test's; nothing else may be needed.
    assert [item.split("=", 1)[0] for item in found[1].split()] == ["LOOPBRIDGE_DSN"]
    argv = shlex.split(found[2])
    argv[0] = str(Path(sys.executable).with_name(argv[0]))  # the venv's uvicorn / gunicorn / jupyter
    return argv


@contextmanager
def client_of(argv: list[str], port: int, dsn: str, ready: str) -> Iterator[httpx.Client]:
    with (
        serve(argv, port=port, env={"LOOPBRIDGE_DSN": dsn}, ready=ready) as served,
        httpx.Client(base_url=served.url, timeout=WAIT) as client,
    ):
        yield client


def test_every_example_is_covered() -> None:
    # sqlalchemy_app.py runs in tests/test_sqlalchemy.py::test_the_example_app_runs_and_verifies_its_rows.
    assert sorted(path.name for path in EXAMPLES.iterdir() if path.suffix in (".py", ".ipynb")) == [
        "django_app.py",
        "fastapi_app.py",
        "flask_app.py",
        "notebook.ipynb",
        "sqlalchemy_app.py",
    ]


@pytest.mark.slow
class TestExamples:
    def test_fastapi(self, dsn: str) -> None:
        port = free_port()
        argv = [*run_command(EXAMPLES / "fastapi_app.py"), "--host", "127.0.0.1", "--port", str(port)]
        with client_of(argv, port, dsn, ready="/notes") as client:
            assert client.post("/notes", params={"text": "hello"}).json() == {"id": 1, "text": "hello"}
            assert client.get("/notes").json() == [{"id": 1, "text": "hello"}]

    def test_django_under_asgi(self, dsn: str) -> None:
        port = free_port()
        argv = [*run_command(EXAMPLES / "django_app.py"), "--host", "127.0.0.1", "--port", str(port)]
        with client_of(argv, port, dsn, ready="/visit") as client:
            assert client.get("/avisit").json() == {"visits": 2}
            assert client.get("/visit").json() == {"visits": 3}

    def test_flask_under_gunicorn_preload(self, dsn: str) -> None:
        port = free_port()
        argv = [*run_command(EXAMPLES / "flask_app.py"), "--bind", f"127.0.0.1:{port}"]
        assert "--preload" in argv
        with client_of(argv, port, dsn, ready="/visits") as client:
            for _ in range(4):
                client.post("/visit").raise_for_status()
            assert sum(client.get("/visits").json()["by_worker"].values()) == 4

    def test_notebook(self, dsn: str) -> None:
        proc = subprocess.run(
            run_command(EXAMPLES / "notebook.ipynb"),
            cwd=ROOT,
            env={**os.environ, "LOOPBRIDGE_DSN": dsn, "JUPYTER_PLATFORM_DIRS": "1"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
