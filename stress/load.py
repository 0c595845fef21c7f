"""The mixed load: every kind of caller at once, through one Database, each call writing a unique key.

* ``sync_threads`` plain threads call the blocking methods (Django/Flask views);
* ``loops`` threads each run ``asyncio.run()`` with ``tasks_per_loop`` tasks awaiting the ``a``-twins
  (FastAPI handlers, pytest-asyncio);
* one thread whose event loop is running calls the *blocking* methods from inside it (DDL in a lifespan);
* one forked worker process (see :meth:`Load.fork_worker`) uses the inherited Database itself.

Most calls insert one row; some run a multi-statement transaction inserting two rows, either through
``db.run`` and asyncpg's ``conn.transaction()`` (``tx``) or in a ``with db.transaction()`` /
``async with db.transaction()`` block (``block``); some read back a key they were told was written.
Some calls get a very short timeout and some are cancelled by their caller, at random.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import os
import random
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from loopbridge import Database
from stress.ledger import Attempt, Ledger

__all__ = ["INSERT", "SCHEMA", "Load", "Plan"]

SCHEMA = """
CREATE TABLE writes (
    id bigserial PRIMARY KEY,
    key text NOT NULL,          -- deliberately not unique: a duplicate must be seen, not refused
    caller text NOT NULL,
    part int NOT NULL,          -- 0: a single write; 1 and 2: the two rows of one transaction
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX writes_key ON writes (key);
"""
INSERT = "INSERT INTO writes (key, caller, part) VALUES ($1, $2, $3)"
COUNT = "SELECT count(*) FROM writes WHERE key = $1"

#: Shares of the operations (the rest are single writes) and of the caller behaviours.
READ_SHARE, TX_SHARE, BLOCK_SHARE = 0.15, 0.10, 0.10
SHORT_TIMEOUT_SHARE, CANCEL_SHARE = 0.03, 0.03


@dataclass(frozen=True)
class Plan:
    """What the load does; the defaults are the figures docs/reliability.md documents for a full run."""

    duration: float = 60.0
    sync_threads: int = 64
    loops: int = 4
    tasks_per_loop: int = 32
    call_timeout: float = 15.0
    """Every call is bounded by this timeout (except the deliberately short ones)."""
    hang_bound: float = 25.0
    """A call still running after this many seconds is hung: the library failed to bound it."""
    fork_calls: int = 40
    seed: int = 0


async def transaction(conn: Any, key: str, caller: str) -> None:
    """Two rows and a read in between, all or nothing."""
    async with conn.transaction():
        await conn.execute(INSERT, key, caller, 1)
        await conn.fetchval(COUNT, key)
        await conn.execute(INSERT, key, caller, 2)


@dataclass
class _Op:
    kind: str
    key: str
    caller: str
    target: str
    expected: int


class Load:
    """Runs the callers until the plan's deadline; :meth:`start` returns their threads."""

    def __init__(self, db: Database, ledger: Ledger, plan: Plan) -> None:
        self.db = db
        self.ledger = ledger
        self.plan = plan
        self.deadline = time.monotonic() + plan.duration

    # -- the callers --------------------------------------------------------------------------------

    def start(self) -> list[threading.Thread]:
        plan = self.plan
        targets: list[tuple[str, Callable[[], None]]] = []
        for i in range(plan.sync_threads):
            targets.append((f"stress-sync-{i}", lambda i=i: self._sync_worker(f"s{i}")))  # type: ignore[misc]
        for i in range(plan.loops):
            targets.append((f"stress-loop-{i}", lambda i=i: self._loop_worker(i)))  # type: ignore[misc]
        targets.append(("stress-running-loop", self._running_loop_worker))
        threads = [threading.Thread(target=fn, name=name, daemon=True) for name, fn in targets]
        for thread in threads:
            thread.start()
        return threads

    def _sync_worker(self, caller: str) -> None:
        rng = random.Random(f"{self.plan.seed}-{caller}")
        acked: list[tuple[str, int]] = []
        n = 0
        while time.monotonic() < self.deadline:
            n += 1
            self._sync_call(rng, self._next(rng, caller, n, acked), acked)

    def _running_loop_worker(self) -> None:
        async def main() -> None:
            asyncio.get_running_loop()  # a loop runs in this thread, and every call below blocks it
            self._sync_worker("running-loop")

        asyncio.run(main())

    def _loop_worker(self, index: int) -> None:
        async def main() -> None:
            await asyncio.gather(
                *(self._task(f"l{index}t{t}") for t in range(self.plan.tasks_per_loop)),
                return_exceptions=True,
            )

        asyncio.run(main())

    async def _task(self, caller: str) -> None:
        rng = random.Random(f"{self.plan.seed}-{caller}")
        acked: list[tuple[str, int]] = []
        n = 0
        while time.monotonic() < self.deadline:
            n += 1
            await self._async_call(rng, self._next(rng, caller, n, acked), acked)

    # -- one call -----------------------------------------------------------------------------------

    def _next(self, rng: random.Random, caller: str, n: int, acked: list[tuple[str, int]]) -> _Op:
        key = f"{caller}-{n}"
        draw = rng.random()
        if draw < READ_SHARE and acked:
            target, expected = rng.choice(acked)
            return _Op("read", key, caller, target, expected)
        if draw < READ_SHARE + TX_SHARE:
            return _Op("tx", key, caller, key, 2)
        if draw < READ_SHARE + TX_SHARE + BLOCK_SHARE:
            return _Op("block", key, caller, key, 2)
        return _Op("write", key, caller, key, 1)

    def _sync_call(self, rng: random.Random, op: _Op, acked: list[tuple[str, int]]) -> None:
        behaviour = rng.random()
        short = behaviour < SHORT_TIMEOUT_SHARE
        cancel = SHORT_TIMEOUT_SHARE <= behaviour < SHORT_TIMEOUT_SHARE + CANCEL_SHARE
        timeout = rng.uniform(0.001, 0.05) if short else self.plan.call_timeout
        attempt = self.ledger.begin(op.key, op.kind, self.plan.hang_bound)
        cancelled = False
        try:
            if cancel:
                # A sync caller that gives up: bridge.submit() and cancel the future.
                future = self.db.bridge.submit(self._op, op, timeout)
                time.sleep(rng.uniform(0, 0.03))
                cancelled = future.cancel()
                try:
                    result = future.result(timeout=self.plan.hang_bound)
                except concurrent.futures.TimeoutError:
                    return  # still running: left in flight, counted as hung
            elif op.kind == "write":
                result = self.db.execute(INSERT, op.key, op.caller, 0, timeout=timeout)
            elif op.kind == "tx":
                result = self.db.run(transaction, op.key, op.caller, timeout=timeout)
            elif op.kind == "block":
                with self.db.transaction() as tx:
                    tx.execute(INSERT, op.key, op.caller, 1, timeout=timeout)
                    tx.fetchval(COUNT, op.key, timeout=timeout)
                    result = tx.execute(INSERT, op.key, op.caller, 2, timeout=timeout)
            else:
                result = self.db.fetchval(COUNT, op.target, timeout=timeout)
        except Exception as exc:
            self.ledger.fail(attempt, exc, cancelled_by_caller=cancelled)
            time.sleep(rng.uniform(0.005, 0.05))  # an application would back off a little, too
            return
        self._succeeded(attempt, op, result, acked)

    async def _async_call(self, rng: random.Random, op: _Op, acked: list[tuple[str, int]]) -> None:
        behaviour = rng.random()
        short = behaviour < SHORT_TIMEOUT_SHARE
        cancel = SHORT_TIMEOUT_SHARE <= behaviour < SHORT_TIMEOUT_SHARE + CANCEL_SHARE
        timeout = rng.uniform(0.001, 0.05) if short else self.plan.call_timeout
        attempt = self.ledger.begin(op.key, op.kind, self.plan.hang_bound)
        cancelled = False
        try:
            if cancel:
                task = asyncio.ensure_future(self._op(op, timeout))
                await asyncio.sleep(rng.uniform(0, 0.03))
                cancelled = task.cancel()
                result = await task
            else:
                result = await self._op(op, timeout)
        except (Exception, asyncio.CancelledError) as exc:
            # A CancelledError nobody asked for would come from the library: it is recorded as an
            # undocumented failure, and this task goes on rather than end.
            self.ledger.fail(attempt, exc, cancelled_by_caller=cancelled)
            await asyncio.sleep(rng.uniform(0.005, 0.05))
            return
        self._succeeded(attempt, op, result, acked)

    async def _op(self, op: _Op, timeout: float) -> Any:
        db = self.db
        if op.kind == "write":
            return await db.aexecute(INSERT, op.key, op.caller, 0, timeout=timeout)
        if op.kind == "tx":
            return await db.arun(transaction, op.key, op.caller, timeout=timeout)
        if op.kind == "block":
            async with db.transaction() as tx:
                await tx.aexecute(INSERT, op.key, op.caller, 1, timeout=timeout)
                await tx.afetchval(COUNT, op.target, timeout=timeout)
                return await tx.aexecute(INSERT, op.key, op.caller, 2, timeout=timeout)
        return await db.afetchval(COUNT, op.target, timeout=timeout)

    def _succeeded(self, attempt: Attempt, op: _Op, result: Any, acked: list[tuple[str, int]]) -> None:
        self.ledger.succeed(attempt)
        if op.kind == "read":
            if result != op.expected:  # an acknowledged write that a later read does not see
                self.ledger.bad_read()
        else:
            acked.append((op.key, op.expected))

    # -- the forked worker process ------------------------------------------------------------------

    def fork_worker(self) -> str:
        """Fork a worker process that uses the inherited Database itself; merge what it recorded.

        Called in the parent from a plain thread (not one running an event loop). Returns a short
        outcome for the report; a child that does not finish in time is killed and counted as hung.
        """
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: only this thread exists here
            os.close(read_end)
            code = 70
            try:
                self._child(write_end)
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        payload = _read_all(read_end, self.plan.hang_bound * 2)
        os.close(read_end)
        status = _wait(pid, self.plan.hang_bound)
        if status is None or not payload:
            self.ledger.lost_processes += 1
            return f"child {pid} hung or died (exit {status})"
        report = json.loads(payload)
        attempts = [Attempt(**fields) for fields in report["attempts"]]
        self.ledger.merge(attempts, report["examples"], report["bad_reads"], report["abandoned"])
        return f"child exit {status}, {len(attempts)} calls"

    def _child(self, fd: int) -> None:
        self.ledger = ledger = Ledger()  # the parent's ledger (and its lock) are not ours to use
        rng = random.Random(f"{self.plan.seed}-fork")
        acked: list[tuple[str, int]] = []
        half = self.plan.fork_calls // 2

        async def main() -> None:
            await asyncio.gather(
                *(self._async_call(rng, self._next(rng, "fork-async", n, acked), acked) for n in range(half))
            )

        with ledger.watch_log():
            for n in range(half):
                self._sync_call(rng, self._next(rng, "fork-sync", n, acked), acked)
            asyncio.run(main())
            gc.collect()  # a transaction left unclosed is reported now, not after the report is sent
            self.db.close(timeout=5)
        report = {
            "attempts": [asdict(a) for a in ledger.attempts],
            "examples": ledger.examples,
            "bad_reads": ledger.bad_reads,
            "abandoned": ledger.abandoned,
        }
        data = json.dumps(report).encode()
        while data:
            written = os.write(fd, data)
            data = data[written:]
        os.close(fd)


def _read_all(fd: int, timeout: float) -> bytes:
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _wait(pid: int, timeout: float) -> int | None:
    """The child's exit code, or None if it had to be killed after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None
