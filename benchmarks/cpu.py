"""``python -m benchmarks.cpu``: what each case costs this process per call, in CPU time and context
switches, rather than in wall-clock time.

On a machine shared with other work, CPU time and context switches per call drift much less than
wall-clock throughput, and when the machine is saturated (every case from N=4 on, on 2 cores shared
with the PostgreSQL backends) throughput is simply the inverse of CPU per call. This is the evidence
behind docs/performance.md. The server's own CPU is not counted: it is the same for every case that
sends the same statements.
"""

from __future__ import annotations

import argparse
import resource
import statistics

from loopbridge._servers import find_test_server

from .cases import CASES
from .harness import Window

DEFAULT_CASES = [
    "floor",
    "hop",
    "hop-uv",
    "limit",
    "limit-noreset",
    "lb-sync",
    "lb-async",
    "lb-sync-uv",
    "lb-async-uv",
    "psycopg",
]


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_nvcsw + r.ru_nivcsw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=[c.key for c in CASES])
    parser.add_argument("--duration", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="the median of this many windows is shown")
    parser.add_argument("--dsn")
    args = parser.parse_args(argv)
    server = None if args.dsn else find_test_server()
    dsn = args.dsn or (server.dsn if server else "")
    by_key = {case.key: case for case in CASES}
    print("| case | N | CPU µs/call (user + system) | system share | context switches/call |")
    print("|---|---|---|---|---|")
    try:
        for n in args.n:
            for key in args.cases:
                with by_key[key].session(dsn) as measure:
                    measure(n, Window(0.2, 0.2))  # warm up
                    cpu, sys_share, switches = [], [], []
                    for _ in range(args.rounds):
                        u0, s0, c0 = _usage()
                        sample = measure(n, Window(0.0, args.duration))
                        u1, s1, c1 = _usage()
                        cpu.append((u1 - u0 + s1 - s0) / sample.calls * 1e6)
                        sys_share.append((s1 - s0) / max(1e-9, u1 - u0 + s1 - s0))
                        switches.append((c1 - c0) / sample.calls)
                print(
                    f"| {by_key[key].label} | {n} | {statistics.median(cpu):,.1f} | "
                    f"{statistics.median(sys_share):.0%} | {statistics.median(switches):.2f} |",
                    flush=True,
                )
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
