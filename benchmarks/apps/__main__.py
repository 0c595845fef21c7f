"""``python -m benchmarks.apps``: whole web apps on real servers, loaded by wrk, loopbridge against each
framework's usual way of reaching PostgreSQL (see docs/performance.md, "Real apps").

Every app serves ``GET <prefix><id>`` with one primary-key lookup (``SELECT id, name FROM items WHERE
id = $1``, a random id among 1,000 rows) on a pool of 16. Each pair's two servers run side by side on
loopback ports; in each round wrk loads A, then B (``-t1 -c32``, after a warm-up), and the app's CPU
time is read from /proc before and after each window. The table lives in a schema of the run's own,
dropped at the end.

It never fails because something is slow; it fails (exit 1) when an app does not start or stops, or a
request fails: a run with failed requests is not a measurement. Exit 2: wrk or PostgreSQL is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import math
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from loopbridge._dsn import parse_dsn
from loopbridge._servers import NoServerError, find_test_server
from loopbridge._servers import Server as TestServer

from ._common import DSN_VARIABLE, POOL_SIZE, ROWS, SCHEMA_VARIABLE
from ._pairs import PAIRS, Pair
from ._report import (
    PairResult,
    Round,
    Run,
    Window,
    evaluate_targets,
    render_markdown,
    write_chart,
    write_json,
)
from ._serve import AppError, Server, free_port, start, stop_all
from ._wrk import INSTALL_HINT, SCRIPT, WrkError, WrkResult, find_wrk, run_wrk, version

HERE = Path(__file__).resolve().parent
CONNECTIONS = 32
#: Bounds on the set-up and tear-down of the run's schema.
SCHEMA_TIMEOUT = 60.0


@dataclass(frozen=True)
class Settings:
    """How every pair is measured."""

    wrk: str
    script: Path  # wrk's Lua script: a random row per request
    dsn: str
    schema: str
    rounds: int
    duration: float
    warmup: float
    connections: int
    bridge_loop: str
    start_timeout: float


_VERSIONS = (
    "asyncpg", "psycopg", "psycopg-pool", "uvicorn", "uvloop", "httptools", "gunicorn", "fastapi",
    "starlette", "flask", "django",
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.apps", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a short run for CI: 1 round, 1 s windows, 0.5 s warm-up"
    )
    parser.add_argument("--rounds", type=_positive_int, help="rounds (A then B in each; default 3, 1 quick)")
    parser.add_argument("--duration", type=_positive, help="seconds per measured window (default 5; 1 quick)")
    parser.add_argument(
        "--warmup", type=_not_negative, help="seconds of warm-up before each window (default 2; 0.5 quick)"
    )
    parser.add_argument(
        "--connections", type=_positive_int, default=CONNECTIONS, help="wrk's connections (-c; default 32)"
    )
    parser.add_argument("--only", nargs="+", choices=[p.key for p in PAIRS], help="only these pairs")
    parser.add_argument(
        "--bridge-loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="the loop of loopbridge's bridge in its apps (LOOPBRIDGE_UVLOOP); default uvloop, as the "
        "servers' own loops and the bare mechanism's",
    )
    parser.add_argument(
        "--start-timeout", type=_positive, default=20.0, help="seconds a server may take to answer"
    )
    parser.add_argument("--dsn", help="PostgreSQL to use (default: the test suite's server)")
    parser.add_argument(
        "--out", type=Path, default=HERE.parent / "results", help="directory for apps.md, apps.json, apps.png"
    )
    args = parser.parse_args(argv)

    wrk = find_wrk()
    if wrk is None:
        print(f"apps: {INSTALL_HINT}", file=sys.stderr)
        return 2
    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration if args.duration is not None else (1.0 if args.quick else 5.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 2.0)
    pairs = [p for p in PAIRS if args.only is None or p.key in args.only]

    server = None
    dsn = args.dsn
    if dsn is None:
        try:
            server = find_test_server()
        except NoServerError as exc:
            print(f"apps: {exc}", file=sys.stderr)
            return 2
        dsn = server.dsn
    fd, name = tempfile.mkstemp(prefix="bench-apps-", suffix=".lua")
    settings = Settings(
        wrk=wrk,
        script=Path(name),
        dsn=dsn,
        schema=f"bench_apps_{secrets.token_hex(4)}",
        rounds=rounds,
        duration=duration,
        warmup=warmup,
        connections=args.connections,
        bridge_loop=args.bridge_loop,
        start_timeout=args.start_timeout,
    )
    run = Run(_meta(argv, settings, server))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(SCRIPT)
        try:
            # One transaction: when it fails there is nothing to drop.
            _run_bounded(_create_schema(dsn, settings.schema))
        except Exception as exc:
            print(f"apps: could not create the table: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        try:
            for pair in pairs:
                result = PairResult(pair)
                run.pairs.append(result)
                _measure(result, settings)
        finally:
            _drop(dsn, settings.schema)
    except (AppError, WrkError) as exc:
        print(f"\napps: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        settings.script.unlink(missing_ok=True)
        if server is not None:
            server.stop()
    run.meta["load_after"] = _load()

    text = render_markdown(run)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "apps.md").write_text(text)
    write_json(args.out / "apps.json", run)
    write_chart(args.out / "apps.png", run)
    print()
    print(text)
    print(f"written: {args.out / 'apps.md'}, apps.json, apps.png")
    missed = [goal for goal, _, met in evaluate_targets(run) if met is False]
    if missed:
        print(f"{len(missed)} target(s) not met on this run (informational; speed never fails the run)")
    problems = run.problems()
    if problems:
        print(
            "\napps: NOT A VALID MEASUREMENT: requests failed, a run with errors measures nothing:",
            file=sys.stderr,
        )
        for problem in problems:
            print(f"apps:   {problem}", file=sys.stderr)
        return 1
    return 0


def _measure(result: PairResult, settings: Settings) -> None:
    """Both servers of the pair up, then the rounds, A then B in each; the servers are always stopped."""
    pair = result.pair
    env = {DSN_VARIABLE: settings.dsn, SCHEMA_VARIABLE: settings.schema}
    bridge = {"LOOPBRIDGE_UVLOOP": "1" if settings.bridge_loop == "uvloop" else "0"}
    servers: list[Server] = []
    try:
        ports: list[int] = []
        while len(ports) < 2:
            port = free_port()
            if port not in ports:
                ports.append(port)
        for app, port in zip((pair.ours, pair.peer), ports, strict=True):
            servers.append(start(app, port, {**env, **bridge} if app.loopbridge else env))
        # Both start at once (their imports overlap); each must answer before the same deadline.
        deadline = time.monotonic() + settings.start_timeout
        for server in servers:
            server.wait_ready(deadline)
        ours, peer = servers
        for number in range(1, settings.rounds + 1):
            a = _window(pair, number, ours, settings)
            b = _window(pair, number, peer, settings)
            result.rounds.append(Round(number, a, b))
            _progress(pair, result.rounds[-1], settings.rounds)
    finally:
        stop_all(servers)


def _window(pair: Pair, number: int, server: Server, settings: Settings) -> Window:
    """The warm-up, then the measured window, with the app's CPU time read just around it."""

    def load(seconds: float) -> WrkResult:
        return run_wrk(
            settings.wrk, server.url, server.app.prefix, ROWS, seconds, settings.connections, settings.script
        )

    server.check()
    warm = load(settings.warmup) if settings.warmup > 0 else None
    server.check()
    before = server.cpu_seconds()
    measured = load(settings.duration)
    after = server.cpu_seconds()
    server.check()
    window = Window(measured, warm, after - before)
    for problem in window.problems():
        # Loudly, at once: a window with failed requests invalidates the run, whatever its numbers.
        print(
            f"apps: !!! {pair.key}, round {number}, {server.app.label}: {problem} -- NOT A VALID MEASUREMENT",
            file=sys.stderr,
            flush=True,
        )
    return window


def _progress(pair: Pair, r: Round, rounds: int) -> None:
    def side(w: Window) -> str:
        return (
            f"{w.result.throughput:,.0f}/s, {w.cpu_per_request * 1e6:,.0f} µs CPU/req, "
            f"p50 {w.result.p50 * 1e3:.1f} ms, p99 {w.result.p99 * 1e3:.1f} ms"
        )

    print(
        f"{pair.key} round {r.number}/{rounds}: A {side(r.ours)} | B {side(r.peer)} | "
        f"throughput {r.throughput_ratio:.2f}×, CPU/request {r.cpu_ratio:.2f}×",
        flush=True,
    )


# -- the run's schema -----------------------------------------------------------------------------------


async def _create_schema(dsn: str, schema: str) -> None:
    con = await asyncpg.connect(dsn, timeout=10)
    try:
        async with con.transaction():
            await con.execute(f"CREATE SCHEMA {schema}")
            await con.execute(f"CREATE TABLE {schema}.items (id integer PRIMARY KEY, name text NOT NULL)")
            await con.execute(
                f"INSERT INTO {schema}.items SELECT g, 'item ' || g FROM generate_series(1, $1::int) AS g",
                ROWS,
            )
            await con.execute(f"ANALYZE {schema}.items")
    finally:
        await con.close()


async def _drop_schema(dsn: str, schema: str) -> None:
    con = await asyncpg.connect(dsn, timeout=10)
    try:
        # Bounded: every app has been stopped, but the server is shared and a lock may linger.
        await con.execute("SET lock_timeout = '10s'")
        await con.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await con.close()


def _run_bounded(work: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(work, SCHEMA_TIMEOUT))


def _drop(dsn: str, schema: str) -> None:
    """Drop the run's schema; a failure is reported, not raised (the run's own outcome matters more)."""
    try:
        _run_bounded(_drop_schema(dsn, schema))
    except Exception as exc:
        print(
            f"apps: could not drop the schema {schema} ({type(exc).__name__}: {exc}); "
            f"drop it by hand: DROP SCHEMA {schema} CASCADE",
            file=sys.stderr,
        )


# -- the report's header ----------------------------------------------------------------------------


def _meta(argv: list[str] | None, settings: Settings, server: TestServer | None) -> dict[str, Any]:
    versions = {}
    for dist in _VERSIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.apps " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "commit": _commit(),
        "versions": versions,
        "wrk": version(settings.wrk),
        "server": server.describe() if server is not None else f"--dsn: {parse_dsn(settings.dsn).redacted}",
        "rounds": settings.rounds,
        "duration": settings.duration,
        "warmup": settings.warmup,
        "connections": settings.connections,
        "wrk_threads": 1,
        "pool_size": POOL_SIZE,
        "rows": ROWS,
        "bridge_loop": settings.bridge_loop,
        "load_before": _load(),
    }


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=HERE,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _not_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds ≥ 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


if __name__ == "__main__":
    started = time.monotonic()
    try:
        status = main()
    except KeyboardInterrupt:
        # Every server and wrk was stopped on the way out (the finally blocks); no traceback.
        print("\napps: interrupted", file=sys.stderr)
        status = 130
    print(f"benchmarks.apps: {time.monotonic() - started:.0f} s")
    sys.exit(status)
