"""``python -m benchmarks``: every case, interleaved, several repetitions, ratios to the same repetition's
baseline. See benchmarks/README.md (and NOTES.md for what the numbers mean on a shared 2-core machine).

It never fails because something is slow; it fails only when a case crashes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

from loopbridge._servers import find_test_server

from .cases import CASES, Case, Measure
from .harness import Sample, Window
from .report import Measurements, evaluate_targets, render_markdown, summarize, write_chart, write_json
from .streaming import MEMORY_CASES, iterate_available, loopbridge_stream, measure_memory, native_stream

HERE = Path(__file__).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a short run for CI: 2 repetitions, short windows"
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 5; 2 with --quick)")
    parser.add_argument("--duration", type=float, help="seconds measured per case (default 1.0; 0.3 quick)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per case (default 0.3; 0.1 quick)")
    parser.add_argument(
        "--slices", type=int, help="slices each case and its baseline alternate in (default 4; 2 quick)"
    )
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4, 16, 64], help="caller counts")
    parser.add_argument("--cases", nargs="+", choices=[c.key for c in CASES], help="only these cases")
    parser.add_argument("--stream-rows", type=int, default=100_000)
    parser.add_argument(
        "--memory-rows", type=int, default=None, help="rows for the peak-memory runs (default 1,000,000)"
    )
    parser.add_argument("--prefetch", type=int, default=1000, help="cursor batch size for streaming")
    parser.add_argument("--dsn", help="PostgreSQL to use (default: the test suite's server)")
    parser.add_argument(
        "--out", type=Path, default=HERE / "results", help="directory for results.md/json and chart.png"
    )
    parser.add_argument("--seed", type=int, default=6, help="seed of the case order in each repetition")
    args = parser.parse_args(argv)

    reps = args.reps or (2 if args.quick else 5)
    window = Window(
        warmup=args.warmup if args.warmup is not None else (0.1 if args.quick else 0.3),
        duration=args.duration if args.duration is not None else (0.3 if args.quick else 1.0),
    )
    slices = args.slices or (2 if args.quick else 4)
    memory_rows = args.memory_rows or 1_000_000
    cases = [c for c in CASES if args.cases is None or c.key in args.cases or c.key == c.baseline]

    server = None
    dsn = args.dsn
    if dsn is None:
        server = find_test_server()
        dsn = server.dsn
    try:
        m = Measurements(meta=_meta(argv, reps, window, slices, args.prefetch), ns=args.n)
        _run(m, cases, dsn, reps, window, slices, args.seed, args.stream_rows, args.prefetch)
        _memory(m, dsn, memory_rows, args.prefetch)
    finally:
        if server is not None:
            server.stop()
    m.meta["load_after"] = _load()

    summary = summarize(m)
    text = render_markdown(m, summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    write_json(args.out / "results.json", m, summary)
    write_chart(args.out / "chart.png", m, summary)
    print()
    print(text)
    print(f"written: {args.out / 'results.md'}, results.json, chart.png")
    missed = [goal for goal, _, met in evaluate_targets(summary) if met is False]
    if missed:
        print(f"{len(missed)} target(s) not met on this run (informational; speed never fails the run)")
    return 0


def _run(
    m: Measurements,
    cases: list[Case],
    dsn: str,
    reps: int,
    window: Window,
    slices: int,
    seed: int,
    stream_rows: int,
    prefetch: int,
) -> None:
    order = random.Random(seed)
    m.stream_rows = stream_rows
    available = iterate_available()
    if not available:
        m.stream_note = "not available on this build (Database.iterate arrives with issue 3)"
    baselines = {case.key: case for case in cases if case.key == case.baseline}
    for rep in range(reps):
        for n in m.ns:
            todo = []
            for case in cases:
                if case.key == case.baseline:
                    continue
                if case.max_n is not None and n > case.max_n:
                    m.skipped[case.key, n] = case.skip_reason
                else:
                    todo.append(case)
            order.shuffle(todo)
            with contextlib.ExitStack() as stack:
                # The baselines' sessions stay open for the whole of this N; each case opens its own.
                base_measures = {
                    key: stack.enter_context(base.session(dsn))
                    for key, base in baselines.items()
                    if any(case.baseline == key for case in todo)
                }
                for case in todo:
                    with case.session(dsn) as measure:
                        sample, base = _paired(measure, base_measures[case.baseline], n, window, slices)
                    m.add(case.key, n, rep, sample)
                    m.add(case.baseline, n, rep, base)
                    m.ratios[case.key, n, rep] = sample.throughput / base.throughput
            _progress(m, rep, reps, n)
        _stream(m, rep, dsn, stream_rows, prefetch, slices, available)


def _stream(m: Measurements, rep: int, dsn: str, rows: int, prefetch: int, slices: int, both: bool) -> None:
    """Streaming in this repetition: the native cursor and db.iterate() alternating (A B B A ...), each
    session opened once; the mean seconds per pass of each."""
    with contextlib.ExitStack() as stack:
        native = stack.enter_context(native_stream(dsn, rows, prefetch))
        ours = stack.enter_context(loopbridge_stream(dsn, rows, prefetch)) if both else None
        native()  # warm up: the statement prepared, the connection's buffers grown
        if ours is not None:
            ours()
        times: dict[str, list[float]] = {"native": [], "lb-iterate": []}
        for i in range(slices):
            order = [("native", native), ("lb-iterate", ours)]
            for key, consume in order if i % 2 == 0 else reversed(order):
                if consume is not None:
                    times[key].append(consume())
    for key, values in times.items():
        if values:
            m.streams[key, rep] = sum(values) / len(values)
    if both:
        ratio = m.streams["native", rep] / m.streams["lb-iterate", rep]
        print(f"  rep {rep + 1}: streaming {rows:,} rows: {ratio:.2f}× native", flush=True)


def _paired(case: Measure, base: Measure, n: int, window: Window, slices: int) -> tuple[Sample, Sample]:
    """Measure *case* and its baseline in alternating slices of the window: A B B A A B ...

    The machine is shared and its speed drifts within seconds; two measurements taken side by side
    in short alternating slices see the same drift, so their ratio holds where absolute numbers do not.
    """
    ours: list[Sample] = []
    theirs: list[Sample] = []
    for i in range(slices):
        part = Window(window.warmup if i == 0 else min(window.warmup, 0.05), window.duration / slices)
        if i % 2 == 0:
            theirs.append(base(n, part))
            ours.append(case(n, part))
        else:
            ours.append(case(n, part))
            theirs.append(base(n, part))
    return Sample.merge(ours), Sample.merge(theirs)


def _memory(m: Measurements, dsn: str, rows: int, prefetch: int) -> None:
    m.memory_rows = rows
    for key in MEMORY_CASES:
        if key == "lb-iterate" and not iterate_available():
            continue
        m.memory[key] = measure_memory(key, dsn, rows, prefetch)
        print(f"  memory, {rows:,} rows, {key}: peak RSS +{m.memory[key] / 1024:,.1f} MiB", flush=True)


def _progress(m: Measurements, rep: int, reps: int, n: int) -> None:
    parts = []
    for case in CASES:
        if case.key == case.baseline:
            sample = m.samples.get((case.key, n, rep))
            if sample is not None:
                parts.append(f"{case.key} {sample.throughput:,.0f}/s")
            continue
        ratio = m.ratios.get((case.key, n, rep))
        if ratio is None:
            continue
        if case.group == "hop":
            parts.append(f"{case.key} {1 / ratio:.2f}×t")
        else:
            parts.append(f"{case.key} {ratio:.2f}")
    print(f"rep {rep + 1}/{reps} N={n}: " + ", ".join(parts), flush=True)


def _meta(argv: list[str] | None, reps: int, window: Window, slices: int, prefetch: int) -> dict[str, object]:
    versions = {}
    for dist in ("asyncpg", "psycopg", "psycopg-pool", "anyio", "uvloop"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "commit": _commit(),
        "versions": versions,
        "repetitions": reps,
        "window": {"warmup": window.warmup, "duration": window.duration, "slices": slices},
        "prefetch": prefetch,
        "load_before": _load(),
    }


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=HERE
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    started = time.monotonic()
    status = main()
    print(f"benchmarks: {time.monotonic() - started:.0f} s")
    sys.exit(status)
