"""Verification at the end of a run: the table against the ledger, the server's sessions against the pool.

* **lost**: an acknowledged write or transaction whose row(s) are not in the table;
* **duplicated**: any key whose row appears more than once (the table has no unique constraint, so a
  retried write would show here instead of being refused);
* **torn**: a transaction with one of its two rows only; **phantom**: a row whose key no call wrote;
* **unseen reads**: a read of an acknowledged key that did not see it;
* **hung**: a call that ran past its bound (still running at the end, or returned late), or a forked
  worker that never reported;
* **abandoned**: a transaction (or stream, subscription) the library reported as left open by its
  caller (garbage collected unclosed, or its owner gone): the load closes everything it opens;
* **leaked**: once the load stops, the pool serves its full size again, ``max_size`` calls at once, each
  on a connection of its own, within :data:`FULL_POOL_WITHIN` seconds (a slot it cannot serve counts);
  every server session of the Database must then be one of the pool's idle connections and none ``idle
  in transaction``; every connection back in the pool; and after ``close()``, no session left at all.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from loopbridge import Database
from loopbridge._source import PoolSource
from stress.faults import Target
from stress.ledger import OK, Ledger

__all__ = ["Verdict", "check_bridge", "check_full_pool", "check_leaks", "check_rows"]

#: How long the server and the pool get to settle after the load stops (or after close).
SETTLE = 15.0
#: How long after the load stops the pool must serve all of its connections at once.
FULL_POOL_WITHIN = 20.0


@dataclass
class Verdict:
    acknowledged: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    undocumented: int = 0
    lost: int = 0
    duplicated: int = 0
    torn: int = 0
    phantom: int = 0
    unseen_reads: int = 0
    hung: int = 0
    leaked: int = 0
    abandoned: int = 0
    leak_detail: str = ""
    pool_detail: str = ""
    bridge_alive: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.lost == self.duplicated == self.torn == self.phantom == 0
            and self.unseen_reads == self.hung == self.leaked == self.abandoned == self.undocumented == 0
            and self.bridge_alive
        )

    def line(self) -> str:
        """The one summary line."""
        acked = sum(self.acknowledged.values())
        kinds = ", ".join(f"{kind} {self.acknowledged[kind]}" for kind in ("write", "tx", "block", "read"))
        failures = ", ".join(f"{name} {count}" for name, count in self.failed.most_common())
        return (
            f"stress: {'PASS' if self.ok else 'FAIL'}: acknowledged {acked} ({kinds}); "
            f"failed {sum(self.failed.values())} ({failures or 'none'}); "
            f"lost {self.lost}; duplicated {self.duplicated}; hung {self.hung}; leaked {self.leaked}; "
            f"abandoned {self.abandoned}; "
            f"torn {self.torn}; phantom {self.phantom}; unseen reads {self.unseen_reads}; "
            f"undocumented {self.undocumented}; bridge {'alive' if self.bridge_alive else 'DEAD'}"
        )


def check_rows(verdict: Verdict, ledger: Ledger, rows: list[asyncpg.Record]) -> None:
    """Compare the table's ``(key, part, count)`` rows with the ledger."""
    present: dict[str, dict[int, int]] = {}
    for key, part, count in rows:
        present.setdefault(key, {})[part] = count
    attempted: set[str] = set()
    for attempt in ledger.attempts:
        if attempt.kind == "read":
            continue
        attempted.add(attempt.key)
        parts = present.get(attempt.key, {})
        expected = (0,) if attempt.kind == "write" else (1, 2)
        counts = [parts.get(part, 0) for part in expected]
        verdict.duplicated += sum(count > 1 for count in counts)
        if attempt.outcome == OK:
            verdict.lost += any(count == 0 for count in counts)
        elif len({min(count, 1) for count in counts}) > 1:
            verdict.torn += 1
    verdict.phantom = sum(1 for key in present if key not in attempted)


def check_bridge(verdict: Verdict, db: Database) -> None:
    """The bridge thread is alive and still serves a call."""
    thread = db.bridge.thread
    try:
        served = db.fetchval("SELECT 1", timeout=10) == 1
    except Exception as exc:
        verdict.notes.append(f"final call failed: {type(exc).__name__}: {exc}")
        served = False
    verdict.bridge_alive = thread is not None and thread.is_alive() and db.bridge.stats().running and served


def check_full_pool(verdict: Verdict, db: Database) -> None:
    """The pool serves its full size: ``max_size`` calls at once, each holding a connection of its own
    at the same moment (a slot lost to a connection that never came back would leave one of them
    waiting for another's). Calls that meet a connection the faults left behind fail (it is then
    replaced), and the round is tried again, until :data:`FULL_POOL_WITHIN` seconds have passed; the
    slots still missing then count as leaked."""
    size = db.stats().max_size
    started = time.monotonic()
    rounds = 0
    met: Counter[str] = Counter()  # what the calls of the rounds before met
    while True:
        rounds += 1
        served, failures = _all_at_once(db, size)
        elapsed = time.monotonic() - started
        if served == size:
            earlier = f"; before that: {', '.join(f'{n} {name}' for name, n in met.items())}" if met else ""
            verdict.pool_detail = (
                f"served all {size} connections at once after {elapsed:.1f} s ({rounds} round(s){earlier})"
            )
            return
        met.update(failures)
        if elapsed > FULL_POOL_WITHIN:
            verdict.leaked += size - served
            verdict.pool_detail = (
                f"served only {served} of {size} connections at once after {elapsed:.1f} s (met: {dict(met)})"
            )
            return
        time.sleep(0.5)


async def _occupy(con: object, hold: float) -> tuple[float, float]:
    """On a pooled connection: prove it answers, then hold it *hold* seconds; when it was held."""
    await con.fetchval("SELECT 1")  # type: ignore[attr-defined]
    began = time.monotonic()
    await asyncio.sleep(hold)
    return began, time.monotonic()


def _all_at_once(db: Database, size: int) -> tuple[int, Counter[str]]:
    """How many of *size* simultaneous calls held a connection at the same moment (0 to *size*), and
    what the others failed with. Counted on the client: behind PgBouncer, several of them share a
    server connection."""
    held: list[tuple[float, float]] = []
    failures: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(size, timeout=30)

    def call() -> None:
        try:
            barrier.wait()
            span = db.run(_occupy, 1.0, timeout=5)
        except Exception as exc:  # a connection the faults left behind, now replaced; or the barrier broke
            with lock:
                failures[type(exc).__name__] += 1
            return
        with lock:
            held.append(span)

    threads = [threading.Thread(target=call, name=f"stress-full-pool-{n}") for n in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if not held:
        return 0, failures
    # Those that held theirs while the first to let go still held its own: at the same moment.
    first_end = min(end for _, end in held)
    return sum(1 for began, _ in held if began < first_end), failures


async def _pool_sizes(db: Database) -> tuple[int, int]:
    # On the bridge loop: the pool's own figures (open connections, idle connections).
    source = db._source
    assert isinstance(source, PoolSource)
    pool = source.pool
    if pool is None:
        return 0, 0
    return pool.get_size(), pool.get_idle_size()


async def _sessions(admin_dsn: str, target: Target) -> Counter[str]:
    query = (
        "SELECT coalesce(state, '?'), count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
        f"AND pid <> pg_backend_pid() AND {target.column} = $1 GROUP BY 1"
    )
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        return Counter({row[0]: row[1] for row in await conn.fetch(query, target.value)})
    finally:
        await conn.close()


def check_leaks(
    verdict: Verdict,
    db: Database,
    admin_dsn: str,
    target: Target,
    clients: Callable[[], int] | None = None,
) -> None:
    """Sessions against the pool, then close and check that nothing is left.

    :param clients: behind PgBouncer, counts the Database's client connections at PgBouncer (the
        server's sessions are PgBouncer's own, so they are only checked for ``idle in transaction``).
    """
    detail = ""
    deadline = time.monotonic() + SETTLE
    while True:
        size, idle = db.bridge.run(_pool_sizes, db, timeout=10)
        sessions = asyncio.run(_sessions(admin_dsn, target))
        in_transaction = sessions["idle in transaction"] + sessions["idle in transaction (aborted)"]
        busy = sum(count for state, count in sessions.items() if state != "idle")
        if clients is None:
            connected = sum(sessions.values())
        else:
            connected = clients()
            busy = in_transaction
        leased = db._source.leased if isinstance(db._source, PoolSource) else 0
        settled = connected == idle and size == idle and busy == 0 and leased == 0
        detail = (
            f"pool: {size} open, {idle} idle; {'PgBouncer clients' if clients else 'server sessions'} "
            f"{connected}; server states {dict(sessions)}; leased {leased}"
        )
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    if not settled:
        verdict.leaked += abs(connected - idle) + (size - idle) + busy + leased
    db.close(timeout=10)
    deadline = time.monotonic() + SETTLE
    while True:
        left = clients() if clients is not None else sum(asyncio.run(_sessions(admin_dsn, target)).values())
        if left == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    verdict.leaked += left
    verdict.leak_detail = f"{detail}; after close: {left}"
