"""``python -m stress``: set up a server, run the load with its faults, verify, print one summary line.

By default the runner starts a private PostgreSQL cluster of its own (``tests/pgcluster.py``: a temporary
directory, a free loopback port, password authentication), so that it may terminate every backend and
restart the server without disturbing anyone. ``--pgbouncer`` puts a PgBouncer in transaction mode in
front of it. ``--dsn`` runs against an existing server instead: no restart, and only the backends this
run opened are terminated (selected by their ``application_name``).

``--faults`` picks the faults (see ``stress/faults.py``): ``terminate`` (backends, every ``--interval``),
``restart`` (once), ``fork`` (once) and ``halfopen`` (silence episodes through the fault-injecting proxy
``tests/faultproxy.py``, which then stands between the Database and the server), comma-separated;
``all`` is every one. The default is ``terminate,restart,fork``.

Exit status: 0 if nothing was lost, duplicated, torn, phantom, hung, leaked or abandoned, every read of
an acknowledged key saw it, every failure was of a documented type and the bridge is alive (see
:class:`~stress.verify.Verdict`); 1 otherwise; 2 if the run could not be set up.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from loopbridge import Bridge, Database
from stress.faults import Faults, SilentEpisodes, Target
from stress.ledger import Ledger
from stress.load import SCHEMA, Load, Plan
from stress.verify import Verdict, check_bridge, check_full_pool, check_leaks, check_rows

if TYPE_CHECKING:
    from tests.faultproxy import FaultProxy

__all__ = ["main", "run"]

logger = logging.getLogger("stress")

#: The faults ``--faults`` chooses from, and those a run injects unless told otherwise.
FAULTS = ("terminate", "restart", "fork", "halfopen")
DEFAULT_FAULTS = ("terminate", "restart", "fork")


@dataclass
class Setup:
    """Where the Database connects, how the faults reach the server, and what to tear down."""

    dsn: str
    admin_dsn: str
    target: Target
    restart: Callable[[], None] | None
    clients: Callable[[], int] | None
    pgbouncer: bool
    server_settings: dict[str, str]
    proxy: FaultProxy | None = None
    """The fault-injecting proxy the Database reaches the server through (``--faults halfopen``)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--pgbouncer", action="store_true", help="through a PgBouncer in transaction mode")
    parser.add_argument("--dsn", help="an existing server instead of a private cluster (no restart)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--sync-threads", type=int, default=64)
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--tasks-per-loop", type=int, default=32)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between terminations")
    parser.add_argument(
        "--faults",
        default=",".join(DEFAULT_FAULTS),
        help=f"comma-separated, from {', '.join(FAULTS)}, or all (default: {','.join(DEFAULT_FAULTS)})",
    )
    parser.add_argument("--no-restart", action="store_true", help="do not restart the server")
    parser.add_argument("--no-fork", action="store_true", help="do not fork a worker process")
    parser.add_argument(
        "--replicas",
        action="store_true",
        help="reads after writes through db.read on two hot standbys, and a failover midway",
    )
    args = parser.parse_args(argv)
    if args.replicas and (args.dsn or args.pgbouncer):
        parser.error("--replicas starts a primary and standbys of its own; drop --dsn and --pgbouncer")
    if args.dsn and args.pgbouncer:
        parser.error("--pgbouncer starts its own PgBouncer in front of a private cluster; drop --dsn")
    if args.duration <= 0:
        parser.error("--duration must be positive")
    chosen = {name.strip() for name in args.faults.split(",") if name.strip()}
    if chosen == {"all"}:
        chosen = set(FAULTS)
    unknown = chosen - set(FAULTS)
    if unknown or not chosen:
        parser.error(f"--faults takes {', '.join(FAULTS)} (comma-separated) or all, not {args.faults!r}")
    if args.no_restart:
        chosen.discard("restart")
    if args.no_fork:
        chosen.discard("fork")
    args.faults = frozenset(chosen)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="stress: %(levelname)s %(name)s: %(message)s")
    # Forking a process with threads is one of the faults; Python 3.12+ warns about exactly that.
    warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    if args.replicas:
        from stress.replicas import run_replicas

        args.seed = seed
        return run_replicas(args)
    plan = Plan(
        duration=args.duration,
        sync_threads=args.sync_threads,
        loops=args.loops,
        tasks_per_loop=args.tasks_per_loop,
        seed=seed,
    )
    try:
        with environment(args) as setup:
            verdict = run(setup, plan, args)
    except SetupError as exc:
        print(f"stress: could not set up: {exc}", file=sys.stderr)
        return 2
    print(verdict.line(), flush=True)
    return 0 if verdict.ok else 1


class SetupError(RuntimeError):
    """The run could not start: no server, no PostgreSQL binaries, no pgbouncer."""


@contextmanager
def environment(args: argparse.Namespace) -> Iterator[Setup]:
    """The server (and PgBouncer, and the fault-injecting proxy) for one run, with the ``writes`` table;
    torn down afterwards."""
    with _server(args) as setup:
        if "halfopen" not in args.faults:
            yield setup
            return
        from tests.faultproxy import FaultProxy

        try:
            proxy = FaultProxy.in_front_of(setup.dsn).start()
        except Exception as exc:
            raise SetupError(f"fault-injecting proxy: {exc}") from exc
        try:
            setup.proxy = proxy
            setup.dsn = proxy.dsn_for(setup.dsn)
            yield setup
        finally:
            proxy.stop()


@contextmanager
def _server(args: argparse.Namespace) -> Iterator[Setup]:
    if args.dsn:
        yield from _existing_server(args.dsn)
        return
    # The private cluster and PgBouncer helpers are shared with the test suite.
    from tests.pgcluster import PrivateCluster

    try:
        cluster = PrivateCluster(settings={"max_connections": "200"})
        cluster.start()
    except Exception as exc:
        raise SetupError(f"private cluster: {exc}") from exc
    bouncer = None
    try:
        admin = cluster.dsn()
        asyncio.run(_prepare(admin, "stress"))
        dsn = cluster.dsn(database="stress")
        clients = None
        if args.pgbouncer:
            from tests.pgbouncer import PgBouncer

            try:
                bouncer = PgBouncer(cluster, pool_size=8)
                bouncer.start()
            except Exception as exc:
                raise SetupError(f"pgbouncer: {exc}") from exc
            dsn = bouncer.dsn(database="stress")
            clients = _pgbouncer_clients(bouncer, "stress")
        yield Setup(
            dsn=dsn,
            admin_dsn=admin,
            target=Target("datname", "stress"),
            restart=cluster.restart if "restart" in args.faults else None,
            clients=clients,
            pgbouncer=args.pgbouncer,
            server_settings={"application_name": "loopbridge-stress"},
        )
    finally:
        if bouncer is not None:
            bouncer.destroy()
        cluster.destroy()


def _existing_server(dsn: str) -> Iterator[Setup]:
    schema = f"stress_{uuid.uuid4().hex[:10]}"
    name = f"loopbridge-{schema}"

    async def create() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute(f"CREATE SCHEMA {schema}; SET search_path = {schema}; {SCHEMA}")
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        finally:
            await conn.close()

    try:
        asyncio.run(create())
    except Exception as exc:
        raise SetupError(f"{type(exc).__name__}: {exc}") from exc
    try:
        yield Setup(
            dsn=dsn,
            admin_dsn=dsn,
            target=Target("application_name", name),
            restart=None,
            clients=None,
            pgbouncer=False,
            server_settings={"application_name": name, "search_path": schema},
        )
    finally:
        asyncio.run(drop())


async def _prepare(admin_dsn: str, database: str) -> None:
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await conn.execute(f"CREATE DATABASE {database}")
    finally:
        await conn.close()
    conn = await asyncpg.connect(admin_dsn.rsplit("/", 1)[0] + f"/{database}", timeout=10)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()


def _pgbouncer_clients(bouncer: object, database: str) -> Callable[[], int]:
    from tests.pgbouncer import PgBouncer

    assert isinstance(bouncer, PgBouncer)

    def clients() -> int:
        return sum(1 for row in bouncer.show("CLIENTS") if row.get("database") == database)

    return clients


def run(setup: Setup, plan: Plan, args: argparse.Namespace) -> Verdict:
    """The load, the faults and the verification, printing a header, progress and details."""
    bridge = Bridge("stress", block_threshold=2.0)
    db = Database(
        setup.dsn,
        bridge=bridge,
        min_size=4,
        max_size=16,
        pool_timeout=10,
        # Blocks end within their calls' bound whatever the network does (an application worried about
        # silent networks would say so too): see loopbridge.transaction.
        transaction_timeout=TRANSACTION_TIMEOUT,
        pgbouncer=setup.pgbouncer,
        server_settings=setup.server_settings,
    )
    through = " through PgBouncer (transaction mode)" if setup.pgbouncer else ""
    if setup.proxy is not None:
        through += " through a fault-injecting proxy"
    forked = ", 1 forked worker" if "fork" in args.faults else ""
    print(
        f"stress: {plan.duration:g} s; {plan.sync_threads} sync threads, {plan.loops} loops x "
        f"{plan.tasks_per_loop} tasks, 1 running-loop thread{forked}; one Database {db.dsn}{through}; "
        f"faults {','.join(sorted(args.faults))}; seed {plan.seed}",
        flush=True,
    )
    ledger = Ledger()
    try:
        with ledger.watch_log():
            return _run(setup, plan, args, db, ledger)
    finally:
        bridge.close(timeout=5)


def _run(setup: Setup, plan: Plan, args: argparse.Namespace, db: Database, ledger: Ledger) -> Verdict:
    """The load and the faults, then the verification; *ledger* counts abandoned objects meanwhile."""
    db.open()
    load = Load(db, ledger, plan)
    started = time.monotonic()
    faults = Faults(
        admin_dsn=setup.admin_dsn,
        target=setup.target,
        deadline=load.deadline,
        interval=args.interval,
        terminate="terminate" in args.faults,
        restart=setup.restart,
        restart_at=started + plan.duration * 0.5,
        fork=load.fork_worker if "fork" in args.faults else None,
        fork_at=started + plan.duration * 0.3,
    )
    episodes = None
    if setup.proxy is not None:
        # The last episode heals a few seconds before the load ends: the load itself then meets what
        # the silence left behind, as an application would.
        episodes = SilentEpisodes(setup.proxy, load.deadline - QUIET_TAIL, plan.seed)
    threads = load.start()
    faults.start()
    if episodes is not None:
        episodes.start()
    _watch(ledger, load.deadline, started)
    join_deadline = time.monotonic() + plan.hang_bound + 10
    for thread in threads:
        thread.join(max(0.0, join_deadline - time.monotonic()))
    stuck = [thread.name for thread in threads if thread.is_alive()]
    faults_done = faults.join(max(1.0, join_deadline - time.monotonic()))
    if episodes is not None:
        faults_done = episodes.join(max(1.0, join_deadline - time.monotonic())) and faults_done
    elapsed = time.monotonic() - started

    # Anything a caller dropped unclosed is reported now (it would hold a connection in the leak check).
    gc.collect()

    verdict = Verdict()
    verdict.acknowledged, verdict.failed, verdict.undocumented = ledger.counts()
    verdict.hung = ledger.hung()
    verdict.unseen_reads = ledger.bad_reads
    rows = asyncio.run(_rows(setup.admin_dsn if not args.dsn else setup.dsn, setup))
    check_rows(verdict, ledger, rows)
    check_bridge(verdict, db)
    stats = db.bridge.stats()
    check_full_pool(verdict, db)
    check_leaks(verdict, db, setup.admin_dsn, setup.target, setup.clients)
    verdict.abandoned = ledger.abandoned  # after the leak check: the bridge has run every release
    calls = sum(verdict.acknowledged.values()) + sum(verdict.failed.values())
    silent = ""
    if episodes is not None:
        silent = (
            f", {episodes.episodes} half-open episodes ({episodes.silent_seconds:.1f} s silent, "
            f"{db.stats().discarded} connections discarded)"
        )
    print(
        f"stress: {calls} calls in {elapsed:.1f} s ({calls / elapsed:.0f}/s); faults: "
        f"{faults.terminated} backends terminated in {faults.rounds} rounds, {faults.restarts} restart "
        f"({faults.restart_seconds:.1f} s), fork: {faults.fork_outcome}{silent}; bridge: max loop lag "
        f"{stats.max_loop_lag:.2f} s, {stats.blocked_episodes} blocked episodes",
        flush=True,
    )
    print(f"stress: pool: {verdict.pool_detail}", flush=True)
    print(f"stress: leak check: {verdict.leak_detail}", flush=True)
    if stuck or not faults_done:
        verdict.notes.append(f"threads still running: {stuck or ['stress-faults']}")
    for name, example in sorted(ledger.examples.items()):
        print(f"stress: failure {name}: e.g. {example}", flush=True)
    if ledger.undocumented:
        print(f"stress: UNDOCUMENTED failures: {', '.join(sorted(ledger.undocumented))}", flush=True)
    for example in ledger.abandoned_examples:
        print(f"stress: ABANDONED: {example}", flush=True)
    for note in verdict.notes:
        print(f"stress: note: {note}", flush=True)
    return verdict


#: Every block of the load is bounded by this (``Database(transaction_timeout=...)``), within the calls'
#: hang bound whatever the network does.
TRANSACTION_TIMEOUT = 12.0
#: Seconds of the load after the last half-open episode healed.
QUIET_TAIL = 4.0


def _watch(ledger: Ledger, deadline: float, started: float) -> None:
    """Until the deadline: note hung calls as they happen, and print progress every 10 s."""
    next_report = started + 10
    while (now := time.monotonic()) < deadline:
        for attempt in ledger.overdue():
            logger.warning(
                "call %s (%s) running for over %.0f s: hung", attempt.key, attempt.kind, attempt.bound
            )
        if now >= next_report:
            acknowledged, failed, _ = ledger.counts()
            print(
                f"stress: {now - started:.0f} s: {sum(acknowledged.values())} acknowledged, "
                f"{sum(failed.values())} failed, {len(ledger.inflight)} in flight, "
                f"{threading.active_count()} threads",
                flush=True,
            )
            next_report += 10
        time.sleep(min(0.5, max(0.0, deadline - now)))


async def _rows(dsn: str, setup: Setup) -> list[asyncpg.Record]:
    # Straight to the server (not through PgBouncer or the Database under test): what it really has.
    if setup.target.column == "datname":
        dsn = dsn.rsplit("/", 1)[0] + f"/{setup.target.value}"
    conn = await asyncpg.connect(dsn, timeout=10, server_settings=_search_path(setup))
    try:
        return list(await conn.fetch("SELECT key, part, count(*) FROM writes GROUP BY key, part"))
    finally:
        await conn.close()


def _search_path(setup: Setup) -> dict[str, str]:
    path = setup.server_settings.get("search_path")
    return {"search_path": path} if path else {}
