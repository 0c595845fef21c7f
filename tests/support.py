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
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import asyncpg
import pytest

from loopbridge import Database
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
    * ``running-loop-thread``: code running inside an event loop calls the *blocking* method (the
      DF-501 lifespan case).
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


def with_query(dsn: str, **params: str) -> str:
    """*dsn* with query parameters added (asyncpg passes unknown ones on as server settings)."""
    extra = "&".join(f"{key}={value}" for key, value in params.items())
    return f"{dsn}{'&' if '?' in dsn else '?'}{extra}"


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


_SLOW_CALLBACK = re.compile(r"^Executing <.*> took \d+\.\d+ seconds$")
