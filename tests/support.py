"""Helpers shared by the tests: bounded waits, the three kinds of caller, an independent connection."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from loopbridge import Bridge, Database
from loopbridge._source import PoolSource

T = TypeVar("T")

#: Every wait in a test is bounded by this (seconds) unless the test says otherwise.
WAIT = 30.0

CALLER_KINDS = ("sync-thread", "foreign-loop", "running-loop-thread")


def in_thread(fn: Callable[[], T], *, timeout: float = WAIT, name: str = "test-caller") -> T:
    """Run *fn* in a new thread and return its result; a thread still running after *timeout* fails
    the test (a hang is a bug)."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{name} still running after {timeout} s: a hang")
    if error:
        raise error[0]
    return result[0]


def all_at_once(*callers: Callable[[], object], timeout: float = 120) -> None:
    """Run every caller at once, each in a thread of its own, and wait for all of them: a caller still
    running after *timeout* seconds fails the test (a hang is a bug); the first error raised is re-raised."""
    errors: list[BaseException] = []

    def guarded(caller: Callable[[], object]) -> None:
        try:
            caller()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(caller,), daemon=True) for caller in callers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a caller hung"
    if errors:
        raise errors[0]


def run_loop(coro_fn: Callable[[], Coroutine[Any, Any, T]], *, timeout: float = WAIT) -> T:
    """``asyncio.run(coro_fn())`` in a fresh thread: a brand-new, foreign event loop."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)

    return in_thread(lambda: asyncio.run(bounded()), timeout=timeout + 5, name="test-loop")


class Caller:
    """One kind of caller of a bridged API.

    * ``sync-thread``: a plain thread calls the blocking method (a Django/Flask view);
    * ``foreign-loop``: a coroutine on a loop of its own awaits the ``a``-twin (FastAPI, pytest-asyncio);
    * ``running-loop-thread``: code running inside an event loop calls the *blocking* method (DDL in
      a FastAPI lifespan, a notebook cell).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __repr__(self) -> str:
        return self.kind

    def call(self, obj: object, method: str, *args: Any, **kwargs: Any) -> Any:
        """``obj.method(*args, **kwargs)`` (or ``await obj.a<method>(...)``) as this kind of caller."""
        if self.kind == "sync-thread":
            return in_thread(lambda: getattr(obj, method)(*args, **kwargs))
        if self.kind == "foreign-loop":

            async def awaiting() -> Any:
                return await getattr(obj, f"a{method}")(*args, **kwargs)

            return run_loop(awaiting)

        async def blocking_inside_loop() -> Any:
            asyncio.get_running_loop()  # there is one, and we block it on purpose
            return getattr(obj, method)(*args, **kwargs)

        return run_loop(blocking_inside_loop)


@contextmanager
def loop_held(bridge: Bridge) -> Iterator[None]:
    """The bridge loop kept busy for the block (a call's work waits on an event, on the loop's own
    thread), then let go: what the block queued or caused meanwhile reaches the loop only after."""
    holding, release = threading.Event(), threading.Event()

    async def hold_the_loop() -> None:
        holding.set()
        release.wait(WAIT)

    blocker = bridge.submit(hold_the_loop)
    assert holding.wait(WAIT)
    try:
        yield
    finally:
        release.set()
        blocker.result(WAIT)


def pool_source(db: Database) -> PoolSource:
    """The pool behind *db* (its connection source, not pinned), for figures stats() does not give."""
    source = db._source
    assert isinstance(source, PoolSource), f"{db!r} is pinned"
    return source


def all_released(db: Database, timeout: float = WAIT) -> None:
    """Wait until every connection of *db*'s pool is back: none held, and none still being reset after
    its call (a caller gets its result before the reset, and the slot counts as in use until then)."""
    source = pool_source(db)
    deadline = time.monotonic() + timeout
    while source.leased:
        if time.monotonic() > deadline:
            pytest.fail(f"{source.leased} connection(s) of {db!r} still held after {timeout} s")
        time.sleep(0.01)


def independent(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run *query* over a connection of its own (not through any bridge): what the server really has."""

    async def go() -> list[asyncpg.Record]:
        con = await asyncpg.connect(dsn, timeout=10)
        try:
            return await con.fetch(query, *args)
        finally:
            await con.close()

    return run_loop(go)


def admin_command(dsn: str, command: str, *args: Any) -> str:
    """Run *command* outside any transaction (CREATE/DROP DATABASE), over a connection of its own."""

    async def go() -> str:
        con = await asyncpg.connect(dsn, timeout=10)
        try:
            status: str = await con.execute(command, *args)
            return status
        finally:
            await con.close()

    return run_loop(go)


def _drop_when_free(admin_dsn: str, drop: str, holders: str, name: str) -> None:
    """Run *drop*; if sessions still hold what it drops (a child process killed in the middle of a
    statement leaves its backend running until the statement ends), end those sessions first."""
    try:
        admin_command(admin_dsn, drop)
    except (asyncpg.LockNotAvailableError, asyncpg.ObjectInUseError):
        terminate = f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {holders}"
        independent(admin_dsn, terminate, name)
        admin_command(admin_dsn, drop)


@contextmanager
def throwaway_schema(admin_dsn: str, prefix: str = "lbt_") -> Iterator[str]:
    """``with throwaway_schema(admin_dsn) as name``: a new schema, dropped afterwards whatever happened,
    even if a session (a child process, a leaked pool) still holds a lock in it."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    independent(admin_dsn, f"CREATE SCHEMA {name}")
    try:
        yield name
    finally:
        # The sessions holding locks on objects of the schema are those whose search_path or
        # application_name is the schema (tests tag their DSNs so), or that block the drop.
        holders = (
            "pid <> pg_backend_pid() AND (application_name = $1 OR pid IN (SELECT l.pid FROM pg_locks l "
            "JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1))"
        )
        # One implicit transaction: the lock timeout holds for the DROP only.
        drop = f"SET LOCAL lock_timeout = '5s'; DROP SCHEMA IF EXISTS {name} CASCADE"
        _drop_when_free(admin_dsn, drop, holders, name)


@contextmanager
def throwaway_database(admin_dsn: str, prefix: str = "lbt_") -> Iterator[str]:
    """``with throwaway_database(admin_dsn) as name``: a new database, dropped afterwards whatever
    happened (the sessions still connected to it are ended first)."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    admin_command(admin_dsn, f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        drop_database(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop database *name* if it exists: no new session may connect to it from now on (a pool left open
    would reconnect), those connected are ended, then it is dropped (bounded)."""
    found = independent(admin_dsn, "SELECT count(*) FROM pg_database WHERE datname = $1", name)[0][0]
    if not found:
        return
    admin_command(admin_dsn, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
    deadline = time.monotonic() + WAIT
    while True:
        independent(
            admin_dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 "
            "AND pid <> pg_backend_pid()",
            name,
        )
        try:
            admin_command(admin_dsn, f'DROP DATABASE IF EXISTS "{name}"')
            return
        except asyncpg.ObjectInUseError:  # a terminated session had not exited yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def on_database(dsn: str, database: str) -> str:
    """*dsn* on another database of the same server."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def with_query(dsn: str, **params: str) -> str:
    """*dsn* with query parameters added (asyncpg passes unknown ones on as server settings)."""
    extra = "&".join(f"{key}={value}" for key, value in params.items())
    return f"{dsn}{'&' if '?' in dsn else '?'}{extra}"


#: What a script that sends itself SIGINT (a test of Ctrl-C) runs first. A process started with SIGINT
#: ignored (``nohup``, ``trap '' INT`` in a script: the test suite run in the background) passes that on
#: to its children, and Python then installs no KeyboardInterrupt handler: the signal would be dropped and
#: the test would wait for its timeout. Each such script says so at its top, in these words.
CTRL_C = "signal.signal(signal.SIGINT, signal.default_int_handler)"

#: The strictest interpreter: asyncio debug mode, ResourceWarnings shown, every warning an error.
STRICT = ("-X", "dev", "-W", "error")


def run_script(
    code: str,
    *,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    flags: tuple[str, ...] = STRICT,
) -> str:
    """Run *code* (dedented) in a fresh ``python -X dev -W error`` (or *flags*) and return its stdout.

    Fails the test if it exits non-zero, takes longer than *timeout*, or writes anything to stderr:
    no warning, no "Task was destroyed", no traceback. The one exception is asyncio debug mode's
    "Executing <...> took 0.123 seconds" report (``-X dev`` turns debug mode on): on this shared, loaded
    machine any callback may take 100 ms, and a sync call from a running loop blocks that loop by design.
    """
    # A script that interrupts itself must not depend on the SIGINT disposition it inherited.
    sends_sigint = "SIGINT" in code and any(send in code for send in _SENDERS)
    assert not sends_sigint or CTRL_C in code, f"a script sending SIGINT must run {CTRL_C} first"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"exit {proc.returncode} after {elapsed:.1f} s\n{proc.stdout}\n{proc.stderr}"
    stderr = "\n".join(line for line in proc.stderr.splitlines() if not _SLOW_CALLBACK.match(line))
    assert stderr == "", f"unexpected stderr:\n{proc.stderr}"
    return proc.stdout


#: How a script may send itself a signal.
_SENDERS = ("pthread_kill", "raise_signal", "os.kill", "killpg", "interrupt_main")

_SLOW_CALLBACK = re.compile(r"^Executing <.*> took \d+\.\d+ seconds$")
