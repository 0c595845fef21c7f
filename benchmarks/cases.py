"""The cases: ``SELECT 1`` through each way of reaching PostgreSQL, and the bare thread hop.

Each case sets up its own pool (16 connections, opened before the window starts), drives N callers for
one window and closes everything again, so only one case holds connections at a time: the server is
shared, and a case must not be slowed by another's idle pool either.
"""

from __future__ import annotations

import _thread
import asyncio
import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from loopbridge import Bridge, Database

from .harness import Sample, Window, drive_tasks, drive_threads

__all__ = ["CASES", "POOL_SIZE", "QUERY", "Case"]

QUERY = "SELECT 1"
POOL_SIZE = 16
#: A new connection per call opens N connections at once; the server is shared (max_connections 100).
NEW_CONNECTION_MAX_N = 16


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    group: Literal["db", "hop"]
    baseline: str  # the key of the case this one is compared with, in the same repetition
    measure: Callable[[str, int, Window], Sample]
    max_n: int | None = None  # larger N is skipped, and the reason is printed
    skip_reason: str = ""


# -- the baseline: native asyncpg on the caller's own loop ------------------------------------------


def _native(dsn: str, n: int, window: Window) -> Sample:
    async def main() -> Sample:
        async with asyncpg.create_pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE) as pool:
            return await drive_tasks(n, functools.partial(pool.fetchval, QUERY), window)

    return asyncio.run(main())


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


def _loopbridge_sync(uvloop: bool) -> Callable[[str, int, Window], Sample]:
    def measure(dsn: str, n: int, window: Window) -> Sample:
        with _database(dsn, uvloop) as db:
            return drive_threads(n, functools.partial(db.fetchval, QUERY), window)

    return measure


def _loopbridge_async(uvloop: bool) -> Callable[[str, int, Window], Sample]:
    def measure(dsn: str, n: int, window: Window) -> Sample:
        with _database(dsn, uvloop) as db:
            # asyncio.run makes a loop of this thread's own: a foreign loop for the bridge.
            return asyncio.run(drive_tasks(n, functools.partial(db.afetchval, QUERY), window))

    return measure


# -- the alternatives -------------------------------------------------------------------------------


@contextmanager
def _plain_loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """A daemon thread running a plain asyncio loop: what a hand-written bridge looks like."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bench-naive-loop", daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _create_pool(dsn: str) -> asyncpg.Pool:
    # Called on the loop that will own the pool: a Pool binds to the loop current at its creation.
    return await asyncpg.create_pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE)


def _naive_bridge(dsn: str, n: int, window: Window) -> Sample:
    with _plain_loop_thread() as loop:
        pool = asyncio.run_coroutine_threadsafe(_create_pool(dsn), loop).result(30)
        try:

            def call() -> object:
                return asyncio.run_coroutine_threadsafe(pool.fetchval(QUERY), loop).result()

            return drive_threads(n, call, window)
        finally:
            asyncio.run_coroutine_threadsafe(pool.close(), loop).result(30)


def _anyio_portal(dsn: str, n: int, window: Window) -> Sample:
    from anyio.from_thread import start_blocking_portal

    with start_blocking_portal() as portal:
        pool = portal.call(_create_pool, dsn)
        try:
            return drive_threads(n, functools.partial(portal.call, pool.fetchval, QUERY), window)
        finally:
            portal.call(pool.close)


def _psycopg_pool(dsn: str, n: int, window: Window) -> Sample:
    from psycopg_pool import ConnectionPool

    # autocommit: like asyncpg, one statement is one round trip, with no BEGIN/COMMIT around it.
    with ConnectionPool(
        dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, kwargs={"autocommit": True}, open=True
    ) as pool:
        pool.wait(30)

        def call() -> object:
            with pool.connection() as conn:
                return conn.execute(QUERY).fetchone()

        return drive_threads(n, call, window)


def _new_connection(dsn: str, n: int, window: Window) -> Sample:
    async def call() -> object:
        con = await asyncpg.connect(dsn)
        try:
            return await con.fetchval(QUERY)
        finally:
            await con.close()

    return asyncio.run(drive_tasks(n, call, window))


# -- the hop alone: no database ---------------------------------------------------------------------


async def _noop() -> None:
    pass


def _floor(dsn: str, n: int, window: Window) -> Sample:
    # The least any thread-to-loop crossing can cost: one call_soon_threadsafe there, one lock back.
    with _plain_loop_thread() as loop:

        def call() -> None:
            done = _thread.allocate_lock()
            done.acquire()
            loop.call_soon_threadsafe(done.release)
            done.acquire()

        return drive_threads(n, call, window)


def _naive_hop(dsn: str, n: int, window: Window) -> Sample:
    with _plain_loop_thread() as loop:
        return drive_threads(n, lambda: asyncio.run_coroutine_threadsafe(_noop(), loop).result(), window)


def _loopbridge_hop(uvloop: bool) -> Callable[[str, int, Window], Sample]:
    def measure(dsn: str, n: int, window: Window) -> Sample:
        with Bridge("bench-hop", uvloop=uvloop) as bridge:
            return drive_threads(n, functools.partial(bridge.run, _noop), window)

    return measure


def _loopbridge_ahop(dsn: str, n: int, window: Window) -> Sample:
    with Bridge("bench-hop") as bridge:
        return asyncio.run(drive_tasks(n, functools.partial(bridge.arun, _noop), window))


def _skip_new_connection() -> dict[str, Any]:
    return {
        "max_n": NEW_CONNECTION_MAX_N,
        "skip_reason": f"more than {NEW_CONNECTION_MAX_N} connections opened at once on a shared server",
    }


CASES: list[Case] = [
    Case("limit", "native asyncpg pool, caller's loop (limit)", "db", "limit", _native),
    Case("lb-sync", "loopbridge, sync threads", "db", "limit", _loopbridge_sync(uvloop=False)),
    Case("lb-async", "loopbridge, async tasks on a foreign loop", "db", "limit", _loopbridge_async(False)),
    Case("lb-sync-uv", "loopbridge on uvloop, sync threads", "db", "limit", _loopbridge_sync(uvloop=True)),
    Case("lb-async-uv", "loopbridge on uvloop, async tasks", "db", "limit", _loopbridge_async(True)),
    Case("naive", "naive bridge: run_coroutine_threadsafe", "db", "limit", _naive_bridge),
    Case("anyio", "anyio start_blocking_portal + asyncpg", "db", "limit", _anyio_portal),
    Case("psycopg", "psycopg 3 ConnectionPool, sync threads", "db", "limit", _psycopg_pool),
    Case(
        "new-conn",
        "new asyncpg connection per call",
        "db",
        "limit",
        _new_connection,
        **_skip_new_connection(),
    ),
    Case("floor", "floor: call_soon_threadsafe + lock", "hop", "floor", _floor),
    Case("hop", "loopbridge hop, sync threads", "hop", "floor", _loopbridge_hop(uvloop=False)),
    Case("hop-uv", "loopbridge hop on uvloop, sync threads", "hop", "floor", _loopbridge_hop(uvloop=True)),
    Case("ahop", "loopbridge hop, async tasks on a foreign loop", "hop", "floor", _loopbridge_ahop),
    Case("naive-hop", "naive hop: run_coroutine_threadsafe", "hop", "floor", _naive_hop),
]
