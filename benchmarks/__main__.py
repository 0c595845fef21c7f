"""``python -m benchmarks``: every case, interleaved, several repetitions, ratios to the same repetition's
baseline. See docs/performance.md (the method, and what the numbers mean on a shared 2-core machine).

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
    cases = _selected(args.cases)

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


def _selected(keys: list[str] | None) -> list[Case]:
    """The cases to run: those asked for (every one by default), the baselines, and the further
    baselines the chosen cases are measured against (which run as cases of their own too)."""
    if keys is None:
        return list(CASES)
    wanted = set(keys)
    for case in CASES:
        if case.key in keys:
            wanted.update(case.also)
    return [c for c in CASES if c.key in wanted or c.key == c.baseline]


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
        m.stream_note = "not available on this build (it has no Database.iterate)"
    by_key = {case.key: case for case in cases}
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
                # The baselines' sessions (and those of the further baselines some cases are measured
                # against too) stay open for the whole of this N; each case opens its own, unless it is
                # one of those further baselines, already open.
                needed = {case.baseline for case in todo} | {key for case in todo for key in case.also}
                base_measures = {
                    key: stack.enter_context(by_key[key].session(dsn)) for key in by_key if key in needed
                }
                for case in todo:
                    others = [case.baseline, *case.also]
                    with contextlib.ExitStack() as own:
                        measure = base_measures.get(case.key)
                        if measure is None:
                            measure = own.enter_context(case.session(dsn))
                        sample, *bases = _alongside(
                            measure, [base_measures[key] for key in others], n, window, slices
                        )
                    m.add(case.key, n, rep, sample)
                    for key, base in zip(others, bases, strict=True):
                        m.add(key, n, rep, base)
                    m.ratios[case.key, n, rep] = sample.throughput / bases[0].throughput
                    for key, base in zip(case.also, bases[1:], strict=True):
                        m.also_ratios[case.key, key, n, rep] = sample.throughput / base.throughput
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


def _alongside(case: Measure, bases: list[Measure], n: int, window: Window, slices: int) -> list[Sample]:
    """Measure *case* and its baselines in alternating slices of the window: B A A B B A ... for one
    baseline, B C A A C B ... for two; the samples of *case*, then of each baseline in order.

    The machine is shared and its speed drifts within seconds; measurements taken side by side in
    short alternating slices see the same drift, so their ratios hold where absolute numbers do not.
    """
    measures = [*bases, case]
    parts: list[list[Sample]] = [[] for _ in measures]
    for i in range(slices):
        part = Window(window.warmup if i == 0 else min(window.warmup, 0.05), window.duration / slices)
        order = list(enumerate(measures))
        for j, measure in order if i % 2 == 0 else reversed(order):
            parts[j].append(measure(n, part))
    samples = [Sample.merge(p) for p in parts]
    return [samples[-1], *samples[:-1]]


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
            further = "".join(
                f" ({m.also_ratios[case.key, key, n, rep]:.2f} to {key})"
                for key in case.also
                if (case.key, key, n, rep) in m.also_ratios
            )
            parts.append(f"{case.key} {ratio:.2f}{further}")
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
