"""Helpers for the tests of what spans several calls: transactions, streams, subscriptions, COPY.

A driver: one kind of caller, kept alive across several operations, so a test's body is written once.

``Caller`` (tests.support) runs one call per thread or loop. A transaction, a stream or a subscription
spans several calls made by the *same* caller (its owner), with the test checking the server in
between. A :class:`Driver` owns a worker of the given kind for the length of a test:

* ``sync-thread``: a plain thread calls the blocking methods;
* ``foreign-loop``: a thread running an event loop awaits the ``a``-twins (``async with``, ``async for``);
* ``running-loop-thread``: a thread running an event loop calls the *blocking* methods from inside it.

Each operation is sent to the worker and waited for (at most ``WAIT`` seconds); what it raises is raised
in the test. :meth:`Driver.stop` ends the worker as an owner would go away: the thread ends, or the loop
is closed without running anything left pending.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from loopbridge import Database
from tests.support import WAIT, independent

T = TypeVar("T")

_STOP = object()
_EXHAUSTED = object()


class Driver:
    """Runs operations as one kind of caller, in a worker of its own."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.is_async = kind == "foreign-loop"
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        ready = threading.Event()
        target = self._serve_thread if kind == "sync-thread" else self._serve_loop
        self.thread = threading.Thread(target=target, args=(ready,), name=f"driver-{kind}", daemon=True)
        self.thread.start()
        ready.wait(WAIT)

    def __repr__(self) -> str:
        return self.kind

    # -- the worker

    def _serve_thread(self, ready: threading.Event) -> None:
        ready.set()
        while (job := self._jobs.get()) is not _STOP:
            fn, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            del job, fn, future  # hold no reference to what the test drops

    def _serve_loop(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            # Like a loop closed by hand: whatever is pending there is simply dropped, never finished.
            loop.close()

    # -- sending work

    def do(self, sync: Callable[[], T], async_: Callable[[], Awaitable[T]]) -> T:
        """Run *sync* (blocking kinds) or ``await async_()`` (foreign-loop) in the worker."""
        if self.kind == "sync-thread":
            future: concurrent.futures.Future[T] = concurrent.futures.Future()
            self._jobs.put((sync, future))
            return _wait(future)
        loop = self._loop
        assert loop is not None

        async def job() -> T:
            if self.is_async:
                return await async_()
            asyncio.get_running_loop()  # inside a running loop, blocking it on purpose
            return sync()

        return _wait(asyncio.run_coroutine_threadsafe(job(), loop))

    def call(self, obj: object, method: str, *args: Any, **kwargs: Any) -> Any:
        """``obj.method(...)``, or ``await obj.amethod(...)``."""
        return self.do(
            lambda: getattr(obj, method)(*args, **kwargs), lambda: getattr(obj, f"a{method}")(*args, **kwargs)
        )

    def enter(self, cm: Any) -> Any:
        return self.do(cm.__enter__, cm.__aenter__)

    def exit(self, cm: Any, error: BaseException | None = None) -> None:
        exc_info = (None, None, None) if error is None else (type(error), error, error.__traceback__)
        self.do(lambda: cm.__exit__(*exc_info), lambda: cm.__aexit__(*exc_info))

    @contextlib.contextmanager
    def block(self, cm: Any) -> Iterator[Any]:
        """``with cm as x:`` (or ``async with``) whose body is the test's: an exception raised in the
        body reaches ``__exit__`` in the worker, as the caller's own code between statements would."""
        value = self.enter(cm)
        try:
            yield value
        except BaseException as exc:
            self.exit(cm, exc)
            raise
        else:
            self.exit(cm)

    def next(self, iterator: Any) -> Any:
        """``next(it)`` / ``await it.__anext__()``; raises StopIteration at the end for both."""

        def sync() -> Any:
            return next(iterator, _EXHAUSTED)

        async def async_() -> Any:
            try:
                return await iterator.__anext__()
            except StopAsyncIteration:  # a coroutine may not raise StopIteration (PEP 479)
                return _EXHAUSTED

        item = self.do(sync, async_)
        if item is _EXHAUSTED:
            raise StopIteration
        return item

    def drain(self, iterable: Any) -> list[Any]:
        """``list(it)`` / ``[x async for x in it]``."""

        async def collect() -> list[Any]:
            return [item async for item in iterable]

        return self.do(lambda: list(iterable), collect)

    def stop(self) -> None:
        """End the worker as an owner goes away: the thread returns, or the loop is closed with whatever
        it had pending left unfinished."""
        if self.kind == "sync-thread":
            self._jobs.put(_STOP)
        elif self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._loop.stop)
        self.thread.join(WAIT)
        if self.thread.is_alive():
            pytest.fail(f"driver {self.kind} did not stop within {WAIT} s")


def _wait(future: concurrent.futures.Future[T]) -> T:
    # Not future.result(WAIT) alone: its TimeoutError cannot be told from a CallTimeoutError raised by
    # the operation itself.
    concurrent.futures.wait((future,), WAIT)
    if not future.done():
        future.cancel()
        pytest.fail(f"an operation did not finish within {WAIT} s: a hang")
    return future.result()


async def iterate(items: list[T]) -> AsyncIterator[T]:
    """An async iterable over *items*, for APIs that take one."""
    for item in items:
        await asyncio.sleep(0)
        yield item


def wait_until(predicate: Callable[[], object], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll *predicate* until it is true; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout} s")
        time.sleep(0.02)


def sessions(admin_dsn: str, application_name: str, state: str | None = None) -> int:
    """Server sessions of a test (its DSN sets application_name), optionally in one *state*."""
    rows = independent(
        admin_dsn,
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name = $1 AND ($2::text IS NULL OR state = $2)",
        application_name,
        state,
    )
    count: int = rows[0][0]
    return count


def terminate(admin_dsn: str, application_name: str, state: str | None = None, query: str = "%") -> list[int]:
    """pg_terminate_backend the test's sessions (in *state*, last query LIKE *query*); returns their pids
    once they are gone."""
    rows = independent(
        admin_dsn,
        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = $1 AND ($2::text IS NULL OR state = $2) AND query LIKE $3 "
        "AND pid <> pg_backend_pid()",
        application_name,
        state,
        query,
    )
    pids = [row[0] for row in rows]
    assert pids, f"no session of {application_name} to terminate (state {state}, query {query})"
    wait_until(
        lambda: not independent(admin_dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids),
        what=f"backends {pids} gone",
    )
    return pids


def settled(db: Database, admin_dsn: str, application_name: str) -> None:
    """Wait until nothing is held: no connection in use (every open one idle in the pool), none idle in
    transaction on the server."""

    def free() -> bool:
        stats = db.stats()
        return stats.in_use == 0 and stats.idle == stats.size

    wait_until(free, what="every connection back in the pool")
    wait_until(
        lambda: sessions(admin_dsn, application_name, "idle in transaction") == 0,
        what="no session idle in transaction",
    )
