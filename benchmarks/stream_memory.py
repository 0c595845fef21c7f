"""Memory of a row stream is bounded by ``prefetch``, not by the size of the result.

Reads 1,000,000 rows (an int and a 32-character text each) with a consumer slower than the server
(it sleeps 1 ms every 1,000 rows, so an unbounded buffer would fill up), once per ``prefetch`` value,
plus ``db.fetch`` of the same rows for comparison, and prints the growth of the process's peak RSS for
each. Every measurement runs in a fresh subprocess, so that one peak does not
hide the next.

    python benchmarks/stream_memory.py [--dsn postgresql://...] [--rows 1000000]

Uses ``--dsn``, else ``$LOOPBRIDGE_DSN``, else ``postgresql://postgres@127.0.0.1:5432/postgres``.
Not a test: figures depend on the machine; the shape (flat in the row count, growing with prefetch) is
the point.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

QUERY = "SELECT g, md5(g::text) AS h FROM generate_series(1, $1::int) AS g"

CHILD = """
import resource, sys, time
from loopbridge import Database

def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

dsn, rows, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
db = Database(dsn, max_size=1)
db.fetchval("SELECT 1")  # pool, bridge thread and codecs in place before the baseline
before = peak_kib()
count = 0
if mode == "fetch":
    for row in db.fetch(QUERY, rows):
        count += 1
else:
    for row in db.iterate(QUERY, rows, prefetch=int(mode)):
        count += 1
        if count % 1000 == 0:
            time.sleep(0.001)  # slower than the server: the producer must wait
after = peak_kib()
db.close()
assert count == rows, count
print(after - before)
""".replace("QUERY", repr(QUERY))


def measure(dsn: str, rows: int, mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, dsn, str(rows), mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return int(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dsn", default=os.environ.get("LOOPBRIDGE_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"peak RSS growth while reading {args.rows:,} rows ({QUERY!r})")
    print(f"{'how':>28}  {'peak RSS growth':>16}")
    for prefetch in ("100", "1000", "10000", "100000"):
        growth = measure(args.dsn, args.rows, prefetch) / 1024
        print(f"{'iterate(prefetch=' + prefetch + ')':>28}  {growth:>13.1f} MiB")
    growth = measure(args.dsn, args.rows, "fetch") / 1024
    print(f"{'fetch() (all rows at once)':>28}  {growth:>13.1f} MiB")


if __name__ == "__main__":
    main()
