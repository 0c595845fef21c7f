"""``python -m stress --replicas``: reads after writes on real streaming replication, and a failover midway.

The run starts a private primary and two hot standbys (``tests/pgcluster.py``): ``heir``, a synchronous
standby that takes over at half time, and ``follower``, an asynchronous one. One Database reaches the
primary through a multi-host DSN (the primary, then the heir, ``target_session_attrs=read-write``) and
reads through ``db.read`` from both standbys. Every kind of caller (sync threads, tasks on foreign
loops, a thread whose loop is running) writes a unique key, or a transaction of two rows, and reads it
back at once through ``db.read``, in the same context; now and then it reads an older key of its own.

At half time the primary is stopped (``pg_ctl stop -m immediate``) and the heir promoted (``pg_ctl
promote``): writes must resume on it without restarting anything, and the replica list must adapt (the
heir is a primary now; the follower, left streaming from a primary that is gone, is out of the rotation).

Verified at the end, on the new primary: **lost** (an acknowledged write missing: synchronous
replication must keep every one), **duplicated**, **torn**, **phantom**, **stale reads** (a read after an
acknowledged write that did not see it), **hung** (a call past its bound), **undocumented** failures.
Exit status 0 if all are 0, 1 otherwise, 2 if the run could not be set up.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from loopbridge import Bridge, Database
from stress.ledger import Ledger
from stress.load import INSERT, SCHEMA
from stress.verify import Verdict, check_rows

__all__ = ["run_replicas"]

logger = logging.getLogger("stress")

COUNT = "SELECT count(*) FROM writes WHERE key = $1"
CALL_TIMEOUT = 10.0
HANG_BOUND = 25.0
TX_SHARE, OLD_READ_SHARE = 0.2, 0.2


def run_replicas(args: argparse.Namespace) -> int:
    from tests.pgcluster import PrivateCluster, multi_host_dsn

    try:
        primary = PrivateCluster(settings={"max_connections": "200"})
        primary.start()
    except Exception as exc:
        print(f"stress: could not set up: private cluster: {exc}", flush=True)
        return 2
    try:
        primary.sql("CREATE DATABASE stress")
        asyncio.run(_schema(primary.dsn(database="stress")))
        heir = primary.add_standby("heir", synchronous=True)
        follower = primary.add_standby("follower")
        dsn = multi_host_dsn(primary, heir, target_session_attrs="read-write").replace(
            "/postgres?", "/stress?"
        )
        verdict, line = _run(
            args, primary, heir, dsn, [heir.dsn(database="stress"), follower.dsn(database="stress")]
        )
    finally:
        primary.destroy()
    print(line, flush=True)
    return 0 if verdict.ok else 1


async def _schema(dsn: str) -> None:
    con = await asyncpg.connect(dsn, timeout=10)
    try:
        await con.execute(SCHEMA)
    finally:
        await con.close()


class _Load:
    """Callers that write, then read back through ``db.read``, until the deadline."""

    def __init__(self, db: Database, ledger: Ledger, deadline: float, seed: int) -> None:
        self.db = db
        self.ledger = ledger
        self.deadline = deadline
        self.seed = seed

    def start(self, sync_threads: int, loops: int, tasks_per_loop: int) -> list[threading.Thread]:
        targets: list[tuple[str, Callable[[], None]]] = [
            (f"stress-sync-{i}", lambda i=i: self._sync_worker(f"s{i}"))  # type: ignore[misc]
            for i in range(sync_threads)
        ]
        targets += [
            (f"stress-loop-{i}", lambda i=i: asyncio.run(self._loop(i, tasks_per_loop)))  # type: ignore[misc]
            for i in range(loops)
        ]
        targets.append(("stress-running-loop", lambda: asyncio.run(self._running_loop())))
        threads = [threading.Thread(target=fn, name=name, daemon=True) for name, fn in targets]
        for thread in threads:
            thread.start()
        return threads

    async def _running_loop(self) -> None:
        asyncio.get_running_loop()  # a loop runs in this thread, and every call below blocks it
        self._sync_worker("running-loop")

    async def _loop(self, index: int, tasks: int) -> None:
        await asyncio.gather(*(self._task(f"l{index}t{t}") for t in range(tasks)), return_exceptions=True)

    def _sync_worker(self, caller: str) -> None:
        rng = random.Random(f"{self.seed}-{caller}")
        acked: list[tuple[str, int]] = []
        for n in range(1, 1 << 30):
            if time.monotonic() >= self.deadline:
                return
            key, kind = f"{caller}-{n}", "tx" if rng.random() < TX_SHARE else "write"
            expected = 2 if kind == "tx" else 1
            if self._sync_step(kind, key, functools.partial(self._sync_write, kind, key, caller)):
                acked.append((key, expected))
                self._sync_read(key, expected)
            else:
                time.sleep(rng.uniform(0.01, 0.05))
            if acked and rng.random() < OLD_READ_SHARE:
                self._sync_read(*rng.choice(acked))

    def _sync_write(self, kind: str, key: str, caller: str) -> None:
        if kind == "write":
            self.db.execute(INSERT, key, caller, 0, timeout=CALL_TIMEOUT)
            return
        with self.db.transaction() as tx:
            tx.execute(INSERT, key, caller, 1, timeout=CALL_TIMEOUT)
            tx.execute(INSERT, key, caller, 2, timeout=CALL_TIMEOUT)

    def _sync_step(self, kind: str, key: str, fn: Callable[[], Any]) -> Any:
        attempt = self.ledger.begin(key, "block" if kind == "tx" else kind, HANG_BOUND)
        try:
            result = fn()
        except Exception as exc:
            self.ledger.fail(attempt, exc)
            return None
        self.ledger.succeed(attempt)
        return result if kind == "read" else True

    def _sync_read(self, key: str, expected: int) -> None:
        seen = self._sync_step("read", key, lambda: self.db.read.fetchval(COUNT, key, timeout=CALL_TIMEOUT))
        if seen is not None and seen != expected:
            self.ledger.bad_read()

    async def _task(self, caller: str) -> None:
        rng = random.Random(f"{self.seed}-{caller}")
        acked: list[tuple[str, int]] = []
        for n in range(1, 1 << 30):
            if time.monotonic() >= self.deadline:
                return
            key, kind = f"{caller}-{n}", "tx" if rng.random() < TX_SHARE else "write"
            expected = 2 if kind == "tx" else 1
            if await self._async_step(kind, key, self._async_write(kind, key, caller)):
                acked.append((key, expected))
                await self._async_read(key, expected)
            else:
                await asyncio.sleep(rng.uniform(0.01, 0.05))
            if acked and rng.random() < OLD_READ_SHARE:
                await self._async_read(*rng.choice(acked))

    async def _async_write(self, kind: str, key: str, caller: str) -> None:
        if kind == "write":
            await self.db.aexecute(INSERT, key, caller, 0, timeout=CALL_TIMEOUT)
            return
        async with self.db.transaction() as tx:
            await tx.aexecute(INSERT, key, caller, 1, timeout=CALL_TIMEOUT)
            await tx.aexecute(INSERT, key, caller, 2, timeout=CALL_TIMEOUT)

    async def _async_step(self, kind: str, key: str, work: Any) -> Any:
        attempt = self.ledger.begin(key, "block" if kind == "tx" else kind, HANG_BOUND)
        try:
            result = await work
        except (Exception, asyncio.CancelledError) as exc:
            self.ledger.fail(attempt, exc)
            return None
        self.ledger.succeed(attempt)
        return result if kind == "read" else True

    async def _async_read(self, key: str, expected: int) -> None:
        seen = await self._async_step("read", key, self.db.read.afetchval(COUNT, key, timeout=CALL_TIMEOUT))
        if seen is not None and seen != expected:
            self.ledger.bad_read()


def _run(
    args: argparse.Namespace, primary: Any, heir: Any, dsn: str, replicas: list[str]
) -> tuple[Verdict, str]:
    bridge = Bridge("stress-replicas", block_threshold=2.0)
    db = Database(dsn, replicas=replicas, bridge=bridge, max_size=16, pool_timeout=10, timeout=3)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    sync_threads, loops, tasks = min(args.sync_threads, 16), min(args.loops, 2), min(args.tasks_per_loop, 16)
    print(
        f"stress --replicas: {args.duration:g} s; {sync_threads} sync threads, {loops} loops x {tasks} "
        f"tasks, 1 running-loop thread; primary and 2 standbys (heir synchronous), failover at half time; "
        f"seed {seed}",
        flush=True,
    )
    ledger = Ledger()
    started = time.monotonic()
    deadline = started + args.duration
    load = _Load(db, ledger, deadline, seed)
    failover: dict[str, float] = {}
    try:
        with ledger.watch_log():
            threads = load.start(sync_threads, loops, tasks)
            time.sleep(args.duration / 2)
            failed_at = time.monotonic()
            primary.stop("immediate")
            heir.promote()
            failover["promoted"] = time.monotonic() - failed_at
            failover["resumed"] = _first_write_after(db, failed_at, deadline + HANG_BOUND)
            for thread in threads:
                thread.join(max(0.0, deadline + HANG_BOUND - time.monotonic()))
            stuck = [thread.name for thread in threads if thread.is_alive()]
            verdict = Verdict()
            verdict.acknowledged, verdict.failed, verdict.undocumented = ledger.counts()
            verdict.hung = ledger.hung() + len(stuck)
            verdict.unseen_reads = ledger.bad_reads
            rows = asyncio.run(_rows(heir.dsn(database="stress")))
            check_rows(verdict, ledger, rows)
            stats = db.stats()
            verdict.bridge_alive = bridge.stats().running and db.fetchval("SELECT 1", timeout=10) == 1
            states = ", ".join(
                f"{r.dsn.rsplit('@', 1)[1]}: {r.state} ({r.reads} reads)" for r in stats.replicas
            )
        elapsed = time.monotonic() - started
        calls = sum(verdict.acknowledged.values()) + sum(verdict.failed.values())
        print(
            f"stress --replicas: {calls} calls in {elapsed:.1f} s; promoted in {failover['promoted']:.1f} s, "
            f"writes resumed {failover['resumed']:.1f} s after the primary stopped; reads on the primary "
            f"{stats.reads_on_primary}; replicas: {states}",
            flush=True,
        )
        for name, example in sorted(ledger.examples.items()):
            print(f"stress --replicas: failure {name}: e.g. {example}", flush=True)
        if stuck:
            print(f"stress --replicas: threads still running: {stuck}", flush=True)
    finally:
        bridge.close(timeout=5)
    acked = sum(verdict.acknowledged.values())
    failures = ", ".join(f"{name} {count}" for name, count in verdict.failed.most_common())
    line = (
        f"stress --replicas: {'PASS' if verdict.ok else 'FAIL'}: acknowledged {acked} "
        f"(write {verdict.acknowledged['write']}, tx {verdict.acknowledged['block']}, read "
        f"{verdict.acknowledged['read']}); failed {sum(verdict.failed.values())} ({failures or 'none'}); "
        f"lost {verdict.lost}; duplicated {verdict.duplicated}; stale reads {verdict.unseen_reads}; "
        f"hung {verdict.hung}; torn {verdict.torn}; phantom {verdict.phantom}; undocumented "
        f"{verdict.undocumented}; bridge {'alive' if verdict.bridge_alive else 'DEAD'}"
    )
    return verdict, line


def _first_write_after(db: Database, since: float, deadline: float) -> float:
    """Seconds from *since* until a write succeeded on the new primary (a probe of its own)."""
    while time.monotonic() < deadline:
        try:
            db.execute("SELECT 1 FROM pg_stat_activity LIMIT 0", timeout=2)
            if db.fetchval("SELECT NOT pg_is_in_recovery()", timeout=2):
                return time.monotonic() - since
        except Exception:
            time.sleep(0.05)
    return float("inf")


async def _rows(dsn: str) -> list[asyncpg.Record]:
    con = await asyncpg.connect(dsn, timeout=10)
    try:
        return list(await con.fetch("SELECT key, part, count(*) FROM writes GROUP BY key, part"))
    finally:
        await con.close()
