"""Fixtures: a real PostgreSQL (never a mock), a schema per test, bridges, databases, caller kinds.

The server is found once per session, when the first test that needs one runs (the ``server`` fixture),
in this order: ``LOOPBRIDGE_TEST_DSN``; a local server on 127.0.0.1:5432; testcontainers where Docker
answers; the embedded PostgreSQL extra. Tests that need no server (DSN parsing, the public API) run
without one. If none works, every test that needs one fails with a message saying what to set; none is
skipped. The report's header says when the server is looked for, and its summary which one was used.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from loopbridge import Bridge, Database
from loopbridge._servers import NoServerError, Server, find_test_server
from tests.boundary import Driver
from tests.pgcluster import PrivateCluster
from tests.support import CALLER_KINDS, Caller, throwaway_schema, with_query

# pytester runs the pytest plugin in a project of its own (tests/test_pytest_plugin.py).
pytest_plugins = ["pytester"]

_finder_key = pytest.StashKey["ServerFinder"]()
_counter = itertools.count()


class ServerFinder:
    """The session's server, looked for once, when a test first needs it; the outcome is kept, so a
    failure fails every test that needs a server with the same message instead of searching again."""

    def __init__(self) -> None:
        self.server: Server | None = None
        self.problem: str | None = None

    def get(self) -> Server:
        if self.server is None and self.problem is None:
            try:
                self.server = find_test_server()
            except NoServerError as exc:
                self.problem = f"loopbridge tests need PostgreSQL: {exc}"
        if self.server is None:
            assert self.problem is not None
            pytest.fail(self.problem, pytrace=False)
        return self.server

    def describe(self) -> str:
        if self.server is not None:
            return self.server.describe()
        if self.problem is not None:
            return f"none found ({self.problem})"
        return "not needed: no test that ran used one"

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_finder_key] = ServerFinder()


def pytest_unconfigure(config: pytest.Config) -> None:
    finder = config.stash.get(_finder_key, None)
    if finder is not None:
        finder.stop()


def pytest_report_header(config: pytest.Config) -> str:
    return "loopbridge test database: found when first needed (LOOPBRIDGE_TEST_DSN, local, Docker, embedded)"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    terminalreporter.write_line(f"loopbridge test database: {config.stash[_finder_key].describe()}")


@pytest.fixture(scope="session")
def server(pytestconfig: pytest.Config) -> Server:
    """The PostgreSQL server of the session, found on first use (see the module docstring)."""
    return pytestconfig.stash[_finder_key].get()


@pytest.fixture(scope="session")
def admin_dsn(server: Server) -> str:
    """The server's DSN, for a role that may create schemas and databases."""
    return server.dsn


@pytest.fixture(scope="session")
def loopbridge_dsn(admin_dsn: str) -> str:
    """The pytest plugin's fixtures use the server this suite found."""
    return admin_dsn


@pytest.fixture
def schema(admin_dsn: str) -> Iterator[str]:
    """A schema of this test's own, dropped afterwards (even if a session the test left, in a child
    process say, still holds a lock in it)."""
    with throwaway_schema(admin_dsn) as name:
        yield name


@pytest.fixture
def dsn(admin_dsn: str, schema: str) -> str:
    """A DSN whose connections work in this test's schema (and tag themselves for pg_stat_activity)."""
    return with_query(admin_dsn, search_path=schema, application_name=schema)


@pytest.fixture
def bridge() -> Iterator[Bridge]:
    bridge = Bridge(f"test-{next(_counter)}")
    yield bridge
    bridge.close(timeout=5)


@pytest.fixture
def db(dsn: str, bridge: Bridge) -> Iterator[Database]:
    database = Database(dsn, bridge=bridge, max_size=4)
    yield database
    database.close(timeout=5)


@pytest.fixture(params=CALLER_KINDS)
def caller(request: pytest.FixtureRequest) -> Caller:
    """Each test using it runs once per kind of caller (see tests.support.Caller)."""
    return Caller(request.param)


@pytest.fixture(params=CALLER_KINDS)
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    """One kind of caller kept alive across several operations (see tests.boundary.Driver)."""
    worker = Driver(request.param)
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def cluster() -> Iterator[PrivateCluster]:
    """A private cluster with password authentication, which tests may restart."""
    private = PrivateCluster()
    private.start()
    yield private
    private.destroy()
