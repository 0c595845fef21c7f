"""``python -m benchmarks.replicas``: reads through ``db.read`` on hot standbys against the primary alone.

A private primary and two hot standbys (``tests/pgcluster.py``) on this machine. Each case is measured
next to its baseline in alternating slices, as in ``python -m benchmarks`` (see docs/performance.md, "Read
replicas"), from N sync threads:

* **read throughput**: ``db.read.fetchval(query)`` on a Database with two replicas against
  ``db.fetchval(query)`` on a Database without replicas (the primary alone), for ``SELECT 1`` and for a
  query with some work on the server (``SELECT count(*) FROM generate_series(1, 20000)``);
* **stale reads**: ``db.read.stale.fetchval`` against the primary alone (routing without the
  read-your-writes check);
* **the read-your-writes check per read**: p50 latency of ``db.read.fetchval`` against
  ``db.read.stale.fetchval`` on the same Database, at N=1: when the caller has not written (the check
  only looks at counters), and right after a write of its own (the check asks the primary for its WAL
  position, one round trip, and the read waits until a replica has replayed it).

Every server runs on the same machine, so replicas add no capacity here: the figures show what the
routing costs, not what a replica on a machine of its own would add.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from benchmarks.harness import Sample, Window, drive_threads
from loopbridge import Bridge, Database

__all__ = ["main"]

LIGHT = "SELECT 1"
HEAVY = "SELECT count(*) FROM generate_series(1, 20000)"


def _alongside(calls: list[Callable[[], object]], n: int, window: Window, slices: int) -> list[Sample]:
    parts: list[list[Sample]] = [[] for _ in calls]
    for i in range(slices):
        part = Window(window.warmup if i == 0 else min(window.warmup, 0.05), window.duration / slices)
        order = list(enumerate(calls))
        for j, call in order if i % 2 == 0 else reversed(order):
            parts[j].append(drive_threads(n, call, part))
    return [Sample.merge(p) for p in parts]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.replicas", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=1.0, help="seconds measured per case and N")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=300, help="write-then-read rounds for the check's cost")
    args = parser.parse_args(argv)
    from tests.pgcluster import PrivateCluster

    window = Window(0.2, args.duration)
    with PrivateCluster(settings={"max_connections": "200"}) as primary:
        standbys = [primary.add_standby(), primary.add_standby()]
        bridge = Bridge("bench-replicas")
        alone = Database(primary.dsn(), bridge=bridge, min_size=16, max_size=16)
        with_replicas = Database(
            primary.dsn(), replicas=[s.dsn() for s in standbys], bridge=bridge, min_size=16, max_size=16
        )
        try:
            alone.execute("CREATE TABLE bench (id serial PRIMARY KEY, v int)")
            primary.wait_caught_up()
            with_replicas.read.fetchval(LIGHT)  # the replicas checked and their pools open
            _throughput(args, window, alone, with_replicas)
            _check_cost(args, with_replicas)
        finally:
            bridge.close(timeout=10)


def _throughput(args: argparse.Namespace, window: Window, alone: Database, replicated: Database) -> None:
    print("read throughput, sync threads: ratio to the primary alone (median of reps, min-max), calls/s")
    print("| case | " + " | ".join(f"N={n}" for n in args.n) + " |")
    print("|---|" + "---|" * len(args.n))
    for label, query, reader in (
        ("db.read, 2 replicas, SELECT 1", LIGHT, replicated.read),
        ("db.read.stale, 2 replicas, SELECT 1", LIGHT, replicated.read.stale),
        ("db.read, 2 replicas, 20k-row count", HEAVY, replicated.read),
    ):
        cells = []
        for n in args.n:
            ratios, rates = [], []
            for _ in range(args.reps):
                base, case = _alongside(
                    [lambda q=query: alone.fetchval(q), lambda q=query, r=reader: r.fetchval(q)],  # type: ignore[misc]
                    n,
                    window,
                    4,
                )
                ratios.append(case.throughput / base.throughput)
                rates.append((case.throughput, base.throughput))
            median = statistics.median(ratios)
            rate = statistics.median(r[0] for r in rates)
            base_rate = statistics.median(r[1] for r in rates)
            cells.append(
                f"**{median:.2f}** ({min(ratios):.2f}–{max(ratios):.2f}; {rate:,.0f} vs {base_rate:,.0f}/s)"
            )
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def _check_cost(args: argparse.Namespace, db: Database) -> None:
    """p50 latency of a consistent read against a stale one, at N=1, without and after a write."""
    reader, stale = db.read, db.read.stale
    timings: dict[str, list[float]] = {
        "read": [],
        "stale": [],
        "read after write": [],
        "stale after write": [],
    }
    clock = time.perf_counter
    # First without any write (the check compares counters), then each read right after a write of the
    # same caller (the check asks the primary for its position and waits for a replica to replay it).
    for i in range(args.rounds):
        for name, fn in (
            (("read", reader), ("stale", stale)) if i % 2 else (("stale", stale), ("read", reader))
        ):
            t0 = clock()
            fn.fetchval(LIGHT)
            timings[name].append(clock() - t0)
    for i in range(args.rounds):
        for name, fn in (
            (("read after write", reader), ("stale after write", stale))
            if i % 2
            else (("stale after write", stale), ("read after write", reader))
        ):
            db.execute("INSERT INTO bench (v) VALUES ($1)", i)
            t0 = clock()
            fn.fetchval(LIGHT)
            timings[name].append(clock() - t0)
    p50 = {name: statistics.median(values) * 1e6 for name, values in timings.items()}
    print(f"\nthe read-your-writes check per read, N=1, p50 of {args.rounds} reads each:")
    print("| read | p50 | of which the check |")
    print("|---|---|---|")
    print(f"| db.read.stale, no write before | {p50['stale']:.0f} µs | (baseline) |")
    print(f"| db.read, no write before | {p50['read']:.0f} µs | {p50['read'] - p50['stale']:+.0f} µs |")
    print(f"| db.read.stale, right after a write | {p50['stale after write']:.0f} µs | (baseline) |")
    print(
        f"| db.read, right after a write | {p50['read after write']:.0f} µs | "
        f"{p50['read after write'] - p50['stale after write']:+.0f} µs |"
    )
    stats = db.stats()
    print(
        f"\nreads on the primary: {stats.reads_on_primary}; per replica: {[r.reads for r in stats.replicas]}"
    )


if __name__ == "__main__":
    main()
