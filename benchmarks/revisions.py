"""``python -m benchmarks.revisions A B``: loopbridge at two git revisions, same machine, same run.

For a change to the call path: each revision is checked out in a temporary git worktree, and each
measurement runs in a fresh process with that checkout first on ``sys.path``, alternating A, B, A, B
(and the order of the cases shuffled per round), so that both see the same machine. A measurement drives
N callers (sync threads, or tasks on one foreign event loop) calling ``db.fetchval("SELECT 1")`` on a
pool of 16 for a fixed window, and reports calls per second, the process's CPU time per call (all its
threads: the callers' and the bridge's) and, when the server runs on this machine, its processes' CPU
time per call (the pool's sixteen backends, read from ``/proc``). The medians of the rounds are compared
as B / A.

It never fails because something is slow; only when a measurement crashes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: One measurement, run in a child process with the revision's checkout first on sys.path.
MEASURE = r"""
import asyncio, json, os, sys, threading, time
from loopbridge import Bridge, Database

dsn, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
warmup, window = float(sys.argv[4]), float(sys.argv[5])
bridge = Bridge("revisions")
name = f"revisions-{os.getpid()}"
db = Database(dsn, bridge=bridge, min_size=16, max_size=16, server_settings={"application_name": name})
db.fetchval("SELECT 1")
TICK = os.sysconf("SC_CLK_TCK")


def server_cpu() -> float | None:
    # The pool's server processes, when the server runs on this machine: their CPU seconds so far.
    pids = [row[0] for row in db.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1", name)]
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def threads(seconds: float) -> int:
    deadline, counts = time.monotonic() + seconds, []

    def caller() -> None:
        done = 0
        while time.monotonic() < deadline:
            db.fetchval("SELECT 1")
            done += 1
        counts.append(done)

    workers = [threading.Thread(target=caller) for _ in range(n)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts)


def tasks(seconds: float) -> int:
    async def main() -> int:
        deadline = time.monotonic() + seconds

        async def caller() -> int:
            done = 0
            while time.monotonic() < deadline:
                await db.afetchval("SELECT 1")
                done += 1
            return done

        return sum(await asyncio.gather(*(caller() for _ in range(n))))

    return asyncio.run(main())


drive = threads if kind == "sync" else tasks
drive(warmup)
server = server_cpu()
started, cpu = time.monotonic(), time.process_time()
calls = drive(window)
elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
server_after = server_cpu()
db.close()
bridge.close()
server_us = None if server is None or server_after is None else (server_after - server) / calls * 1e6
import loopbridge
print(json.dumps({"rate": calls / elapsed, "cpu_us": cpu / calls * 1e6, "server_us": server_us,
                  "imported": loopbridge.__file__}))
"""


def checkout(revision: str, into: Path) -> Path:
    """A worktree of *revision* (``WORK`` for the working tree as it is)."""
    if revision == "WORK":
        return ROOT
    path = into / revision.replace("/", "_")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), revision],
        check=True,
        capture_output=True,
    )
    return path


def measure(tree: Path, dsn: str, kind: str, n: int, warmup: float, window: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    # In the checkout: `python -c` puts the working directory first on sys.path, before PYTHONPATH.
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, dsn, kind, str(n), str(warmup), str(window)],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=warmup + window + 60,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["imported"].startswith(str(tree)):
        raise RuntimeError(f"the measurement of {tree} imported loopbridge from {result['imported']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.revisions", description=__doc__)
    parser.add_argument("a", help="the base revision (a git revision, or WORK for the working tree)")
    parser.add_argument("b", help="the revision to compare with it")
    parser.add_argument(
        "--dsn",
        default=os.environ.get("LOOPBRIDGE_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=float, default=2.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--cases", nargs="+", default=["sync:1", "sync:16", "async:1", "async:16"])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    cases = [(kind, int(n)) for kind, _, n in (case.partition(":") for case in args.cases)]
    scratch = Path(tempfile.mkdtemp(prefix="loopbridge-revisions-"))
    trees = {}
    try:
        for side in ("a", "b"):
            trees[side] = checkout(getattr(args, side), scratch)
        results: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
        order = random.Random(args.seed)
        for round_ in range(args.rounds):
            shuffled = cases[:]
            order.shuffle(shuffled)
            for kind, n in shuffled:
                sides = ("a", "b") if round_ % 2 == 0 else ("b", "a")  # alternate who goes first too
                for side in sides:
                    sample = measure(trees[side], args.dsn, kind, n, args.warmup, args.window)
                    results.setdefault((kind, n, side), []).append(sample)
                    print(
                        f"round {round_ + 1} {kind} N={n} {side}: {sample['rate']:8.0f} calls/s "
                        f"{sample['cpu_us']:7.1f} us CPU/call",
                        flush=True,
                    )
        print(f"\nmedians of {args.rounds} rounds, b={args.b} against a={args.a}:")
        print(
            "| case | a calls/s | b calls/s | b/a | a CPU µs/call | b CPU µs/call | b/a "
            "| a server µs/call | b server µs/call | b/a |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for kind, n in cases:
            a = results[(kind, n, "a")]
            b = results[(kind, n, "b")]
            rate_a, rate_b = (statistics.median(x["rate"] for x in side) for side in (a, b))
            cpu_a, cpu_b = (statistics.median(x["cpu_us"] for x in side) for side in (a, b))
            servers = [[x["server_us"] for x in side if x.get("server_us") is not None] for side in (a, b)]
            if all(servers):
                srv_a, srv_b = (statistics.median(each) for each in servers)
                server = f"{srv_a:.1f} | {srv_b:.1f} | {srv_b / srv_a:.2f}"
            else:
                server = "– | – | –"  # the server runs elsewhere: its processes are not readable here
            print(
                f"| {kind} N={n} | {rate_a:.0f} | {rate_b:.0f} | {rate_b / rate_a:.2f} | {cpu_a:.1f} | "
                f"{cpu_b:.1f} | {cpu_b / cpu_a:.2f} | {server} |"
            )
    finally:
        for tree in trees.values():
            if tree != ROOT:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
                )
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
