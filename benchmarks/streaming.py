"""Streaming many rows to a consumer: loopbridge's ``db.iterate()`` against a native asyncpg cursor.

The native baseline is what an asyncpg user writes on their own loop: a server-side cursor in a
transaction, fetched in batches of *prefetch* rows. loopbridge's sync consumer iterates
``db.iterate(query, prefetch=...)``, which runs the same cursor on the bridge loop and hands the
batches across.

Peak memory is measured in a fresh process per case (``python -m benchmarks.streaming memory CASE``):
the growth of the peak resident set size while the rows go by, which a bounded stream keeps near
*prefetch* rows, whatever the size of the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg

from loopbridge import Bridge, Database

__all__ = [
    "MEMORY_CASES",
    "STREAM_QUERY",
    "iterate_available",
    "loopbridge_stream",
    "measure_memory",
    "native_stream",
]

STREAM_QUERY = "SELECT g, 'row ' || g AS label FROM generate_series(1, $1::int) AS g"


def iterate_available() -> bool:
    """``Database.iterate`` streams rows; older builds, measured for comparison, have none."""
    return hasattr(Database, "iterate")


@contextmanager
def native_stream(dsn: str, rows: int, prefetch: int) -> Iterator[Callable[[], float]]:
    """A connection on a loop of its own; yields: seconds to consume *rows* rows through a native
    asyncpg cursor (in a transaction) on that loop, the consumer being a task there."""

    async def consume(con: asyncpg.Connection) -> float:
        started = time.perf_counter()
        seen = 0
        async with con.transaction():
            async for _row in con.cursor(STREAM_QUERY, rows, prefetch=prefetch):
                seen += 1
        elapsed = time.perf_counter() - started
        _check(seen, rows)
        return elapsed

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bench-native-stream", daemon=True)
    thread.start()
    try:
        con = asyncio.run_coroutine_threadsafe(asyncpg.connect(dsn), loop).result(60)
        try:
            yield lambda: asyncio.run_coroutine_threadsafe(consume(con), loop).result(600)
        finally:
            asyncio.run_coroutine_threadsafe(con.close(), loop).result(60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextmanager
def loopbridge_stream(dsn: str, rows: int, prefetch: int) -> Iterator[Callable[[], float]]:
    """A Database, opened; yields: seconds for a sync consumer to consume *rows* rows through
    ``db.iterate()``."""
    with Bridge("bench-stream") as bridge, Database(dsn, bridge=bridge, max_size=2) as db:
        iterate: Callable[..., Any] = db.iterate  # type: ignore[attr-defined,unused-ignore]  # older builds

        def consume() -> float:
            started = time.perf_counter()
            seen = 0
            for _row in iterate(STREAM_QUERY, rows, prefetch=prefetch):
                seen += 1
            elapsed = time.perf_counter() - started
            _check(seen, rows)
            return elapsed

        yield consume


def _check(seen: int, rows: int) -> None:
    if seen != rows:
        raise RuntimeError(f"streamed {seen} rows, expected {rows}")


# -- peak memory, one fresh process per case ---------------------------------------------------------


def _memory_native(dsn: str, rows: int, prefetch: int) -> int:
    async def main() -> int:
        con = await asyncpg.connect(dsn)
        try:
            await con.fetchval("SELECT 1")
            before = _peak_rss_kib()
            async with con.transaction():
                async for _row in con.cursor(STREAM_QUERY, rows, prefetch=prefetch):
                    pass
            return _peak_rss_kib() - before
        finally:
            await con.close()

    return asyncio.run(main())


def _memory_loopbridge(dsn: str, rows: int, prefetch: int) -> int:
    with Bridge("bench-memory") as bridge, Database(dsn, bridge=bridge, max_size=2) as db:
        iterate: Callable[..., Any] = db.iterate  # type: ignore[attr-defined,unused-ignore]  # older builds
        db.fetchval("SELECT 1")
        before = _peak_rss_kib()
        for _row in iterate(STREAM_QUERY, rows, prefetch=prefetch):
            pass
        return _peak_rss_kib() - before


def _memory_fetch_all(dsn: str, rows: int, prefetch: int) -> int:
    # The contrast: without streaming, every row is in memory at once.
    with Bridge("bench-memory") as bridge, Database(dsn, bridge=bridge, max_size=2) as db:
        db.fetchval("SELECT 1")
        before = _peak_rss_kib()
        result = db.fetch(STREAM_QUERY, rows)
        _check(len(result), rows)
        del result
        return _peak_rss_kib() - before


def _peak_rss_kib() -> int:
    """The peak resident set size so far, KiB. On Linux from /proc: ``ru_maxrss`` survives exec, so a
    process started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


MEMORY_CASES: dict[str, tuple[str, Callable[[str, int, int], int]]] = {
    "native-cursor": ("native asyncpg cursor", _memory_native),
    "lb-iterate": ("loopbridge db.iterate(), sync consumer", _memory_loopbridge),
    "lb-fetch-all": ("loopbridge db.fetch() of every row (no streaming)", _memory_fetch_all),
}


def measure_memory(case: str, dsn: str, rows: int, prefetch: int) -> int:
    """Peak RSS growth (KiB) of a fresh process streaming *rows* rows the way *case* does."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.streaming", "memory", case, dsn, str(rows), str(prefetch)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory case {case} failed:\n{proc.stdout}\n{proc.stderr}")
    growth: int = json.loads(proc.stdout.strip().splitlines()[-1])["rss_growth_kib"]
    return growth


def main() -> None:
    parser = argparse.ArgumentParser(description="one streaming memory measurement (used by benchmarks)")
    parser.add_argument("what", choices=["memory"])
    parser.add_argument("case", choices=sorted(MEMORY_CASES))
    parser.add_argument("dsn")
    parser.add_argument("rows", type=int)
    parser.add_argument("prefetch", type=int)
    args = parser.parse_args()
    growth = MEMORY_CASES[args.case][1](args.dsn, args.rows, args.prefetch)
    print(json.dumps({"rss_growth_kib": growth}))


if __name__ == "__main__":
    main()
