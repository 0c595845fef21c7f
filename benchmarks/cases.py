"""The cases: ``SELECT 1`` through each way of reaching PostgreSQL, and the bare thread hop.

A case is a *session*: a context manager that sets up what the case needs (a pool of 16 connections,
opened before anything is timed; a bridge; a loop thread) and yields a function that drives N callers
for one window. The runner opens a case's session next to its baseline's and measures the two in
alternating slices, so that both see the same machine (see ``benchmarks/__main__.py``).
"""

from __future__ import annotations

import _thread
import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import asyncpg

from loopbridge import Bridge, Database

from .harness import Sample, Window, drive_tasks, drive_threads

__all__ = ["CASES", "NO_RESET", "POOL_SIZE", "QUERY", "Case", "Measure", "no_reset"]

T = TypeVar("T")

QUERY = "SELECT 1"
POOL_SIZE = 16
#: A new connection per call opens N connections at once; the server is shared (max_connections 100).
NEW_CONNECTION_MAX_N = 16

#: Drives N callers through one window.
Measure = Callable[[int, Window], Sample]


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    group: Literal["db", "hop"]
    baseline: str  # the key of the case this one is measured alongside and compared with
    session: Callable[[str], AbstractContextManager[Measure]]  # takes the DSN
    max_n: int | None = None  # larger N is skipped, and the reason is printed
    skip_reason: str = ""
    # Further baselines measured alongside this case in the same slices, each giving a ratio of its own.
    also: tuple[str, ...] = ()


@contextmanager
def _loop_thread(name: str) -> Iterator[asyncio.AbstractEventLoop]:
    """A daemon thread running a plain asyncio loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=name, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coro, loop).result(120)


async def _create_pool(dsn: str, *, reset: bool = True) -> asyncpg.Pool:
    # Called on the loop that will own the pool: a Pool binds to the loop current at its creation.
    return await asyncpg.create_pool(
        dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, reset=None if reset else no_reset
    )


async def no_reset(con: asyncpg.Connection) -> None:
    """A pool's ``reset=`` that sends nothing: a call is one round trip instead of two.

    asyncpg (0.30 and later: ``create_pool(reset=...)``) still runs ``Connection._reset()`` before this,
    which rolls back an open transaction and drops listeners without a round trip when there is none;
    what is skipped is the reset *query* (``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL``). Session state a statement set (``SET``, ``LISTEN``, advisory locks) would then reach
    the connection's next user: fine for ``SELECT 1``, not for a general-purpose pool.
    """


# -- the baselines: native asyncpg, N tasks on the loop that owns the pool ---------------------------


def _native(reset: bool) -> Callable[[str], AbstractContextManager[Measure]]:
    @contextmanager
    def session(dsn: str) -> Iterator[Measure]:
        # The loop runs in a thread of its own only so that the session can stay open between slices;
        # the N tasks run on it, with the pool: the caller's own loop. The runner's thread just waits.
        with _loop_thread("bench-native" if reset else "bench-native-noreset") as loop:
            pool = _on(loop, _create_pool(dsn, reset=reset))
            try:
                yield lambda n, window: _on(
                    loop, drive_tasks(n, functools.partial(pool.fetchval, QUERY), window)
                )
            finally:
                _on(loop, pool.close())

    return session


# -- loopbridge -------------------------------------------------------------------------------------


@contextmanager
def _database(dsn: str, uvloop: bool) -> Iterator[Database]:
    bridge = Bridge("bench-uvloop" if uvloop else "bench", uvloop=uvloop)
    db = Database(dsn, bridge=bridge, min_size=POOL_SIZE, max_size=POOL_SIZE)
    try:
        db.open()
        yield db
    finally:
        db.close()
        bridge.close()


def _loopbridge_sync(uvloop: bool) -> Callable[[str], AbstractContextManager[Measure]]:
    @contextmanager
    def session(dsn: str) -> Iterator[Measure]:
        with _database(dsn, uvloop) as db:
            yield lambda n, window: drive_threads(n, functools.partial(db.fetchval, QUERY), window)

    return session


def _loopbridge_async(uvloop: bool) -> Callable[[str], AbstractContextManager[Measure]]:
    @contextmanager
    def session(dsn: str) -> Iterator[Measure]:
        with _database(dsn, uvloop) as db:
            # asyncio.run makes a loop of the runner thread's own: a foreign loop for the bridge.
            yield lambda n, window: asyncio.run(
                drive_tasks(n, functools.partial(db.afetchval, QUERY), window)
            )

    return session


# -- the alternatives -------------------------------------------------------------------------------


@contextmanager
def _naive_bridge(dsn: str) -> Iterator[Measure]:
    # What a hand-written bridge looks like: a daemon loop thread and run_coroutine_threadsafe.
    with _loop_thread("bench-naive") as loop:
        pool = _on(loop, _create_pool(dsn))

        def call() -> object:
            return asyncio.run_coroutine_threadsafe(pool.fetchval(QUERY), loop).result()

        try:
            yield lambda n, window: drive_threads(n, call, window)
        finally:
            _on(loop, pool.close())


@contextmanager
def _anyio_portal(dsn: str) -> Iterator[Measure]:
    from anyio.from_thread import start_blocking_portal

    with start_blocking_portal() as portal:
        pool = portal.call(_create_pool, dsn)
        try:
            yield lambda n, window: drive_threads(
                n, functools.partial(portal.call, pool.fetchval, QUERY), window
            )
        finally:
            portal.call(pool.close)


@contextmanager
def _psycopg_pool(dsn: str) -> Iterator[Measure]:
    from psycopg_pool import ConnectionPool

    # autocommit: like asyncpg, one statement is one round trip, with no BEGIN/COMMIT around it.
    with ConnectionPool(
        dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, kwargs={"autocommit": True}, open=True
    ) as pool:
        pool.wait(30)

        def call() -> object:
            with pool.connection() as conn:
                return conn.execute(QUERY).fetchone()

        yield lambda n, window: drive_threads(n, call, window)


@contextmanager
def _new_connection(dsn: str) -> Iterator[Measure]:
    # The usual workaround for a pool bound to another loop: a fresh connection for every piece of
    # work, on the caller's loop.
    async def call() -> object:
        con = await asyncpg.connect(dsn)
        try:
            return await con.fetchval(QUERY)
        finally:
            await con.close()

    yield lambda n, window: asyncio.run(drive_tasks(n, call, window))


# -- the hop alone: no database ---------------------------------------------------------------------


async def _noop() -> None:
    pass


@contextmanager
def _floor(dsn: str) -> Iterator[Measure]:
    # The least any thread-to-loop crossing can cost: one call_soon_threadsafe there, one lock back.
    with _loop_thread("bench-floor") as loop:

        def call() -> None:
            done = _thread.allocate_lock()
            done.acquire()
            loop.call_soon_threadsafe(done.release)
            done.acquire()

        yield lambda n, window: drive_threads(n, call, window)


@contextmanager
def _naive_hop(dsn: str) -> Iterator[Measure]:
    with _loop_thread("bench-naive") as loop:

        def call() -> object:
            return asyncio.run_coroutine_threadsafe(_noop(), loop).result()

        yield lambda n, window: drive_threads(n, call, window)


def _loopbridge_hop(uvloop: bool) -> Callable[[str], AbstractContextManager[Measure]]:
    @contextmanager
    def session(dsn: str) -> Iterator[Measure]:
        with Bridge("bench-hop", uvloop=uvloop) as bridge:
            yield lambda n, window: drive_threads(n, functools.partial(bridge.run, _noop), window)

    return session


@contextmanager
def _loopbridge_ahop(dsn: str) -> Iterator[Measure]:
    with Bridge("bench-hop") as bridge:
        yield lambda n, window: asyncio.run(drive_tasks(n, functools.partial(bridge.arun, _noop), window))


#: The native pool without the reset query: one round trip per call, as loopbridge's caller sees it
#: (loopbridge hands the result over before the reset). loopbridge's own cases are measured against it
#: too, in the same slices as against the limit. Listed after the earlier cases, so that the table and
#: the chart keep their order and colours.
NO_RESET = "limit-noreset"

CASES: list[Case] = [
    Case("limit", "native asyncpg pool, caller's loop (limit)", "db", "limit", _native(reset=True)),
    Case(
        "lb-sync",
        "loopbridge, sync threads",
        "db",
        "limit",
        _loopbridge_sync(uvloop=False),
        also=(NO_RESET,),
    ),
    Case(
        "lb-async",
        "loopbridge, async tasks on a foreign loop",
        "db",
        "limit",
        _loopbridge_async(False),
        also=(NO_RESET,),
    ),
    Case(
        "lb-sync-uv",
        "loopbridge on uvloop, sync threads",
        "db",
        "limit",
        _loopbridge_sync(uvloop=True),
        also=(NO_RESET,),
    ),
    Case(
        "lb-async-uv",
        "loopbridge on uvloop, async tasks",
        "db",
        "limit",
        _loopbridge_async(True),
        also=(NO_RESET,),
    ),
    Case("naive", "naive bridge: run_coroutine_threadsafe", "db", "limit", _naive_bridge),
    Case("anyio", "anyio start_blocking_portal + asyncpg", "db", "limit", _anyio_portal),
    Case("psycopg", "psycopg 3 ConnectionPool, sync threads", "db", "limit", _psycopg_pool),
    Case(
        "new-conn",
        "new asyncpg connection per call",
        "db",
        "limit",
        _new_connection,
        max_n=NEW_CONNECTION_MAX_N,
        skip_reason=f"more than {NEW_CONNECTION_MAX_N} connections opened at once on a shared server",
    ),
    Case(
        NO_RESET,
        "native asyncpg pool released without the reset query, caller's loop",
        "db",
        "limit",
        _native(reset=False),
    ),
    Case("floor", "floor: call_soon_threadsafe + lock", "hop", "floor", _floor),
    Case("hop", "loopbridge hop, sync threads", "hop", "floor", _loopbridge_hop(uvloop=False)),
    Case("hop-uv", "loopbridge hop on uvloop, sync threads", "hop", "floor", _loopbridge_hop(uvloop=True)),
    Case("ahop", "loopbridge hop, async tasks on a foreign loop", "hop", "floor", _loopbridge_ahop),
    Case("naive-hop", "naive hop: run_coroutine_threadsafe", "hop", "floor", _naive_hop),
]
