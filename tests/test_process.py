"""Whole processes: fork (gunicorn --preload, multiprocessing) and exit with calls in flight.

Each scenario runs in a fresh ``python -X dev -W error`` so that the interpreter's own start-up and
shutdown are part of the test, and anything written to stderr (a warning, "Task was destroyed but it is
pending", "Event loop is closed", a ResourceWarning) fails it.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.support import independent, run_script

pytestmark = pytest.mark.slow

# Forking a process that runs threads is the point here (gunicorn --preload does it); Python 3.12+
# warns about it, which -W error would turn into an exception.
ALLOW_FORK = (
    "import warnings; "
    "warnings.filterwarnings('ignore', message='.*multi-threaded.*fork', category=DeprecationWarning)"
)


def backends(admin_dsn: str, application_name: str) -> set[int]:
    rows = independent(
        admin_dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = $1", application_name
    )
    return {row[0] for row in rows}


class TestFork:
    def test_child_gets_a_fresh_loop_and_pool_and_the_parents_connections_survive(
        self, dsn: str, admin_dsn: str, schema: str
    ) -> None:
        out = run_script(
            f"""
            {ALLOW_FORK}
            import asyncio, json, os, sys, threading
            from loopbridge import Database
            db = Database({dsn!r}, min_size=2)
            parent_backend = db.fetchval("SELECT pg_backend_pid()")
            parent_thread = db.bridge.thread.native_id
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: uses the Database itself, then exits normally (atexit and all)
                os.close(r)
                report = dict(
                    sync=db.fetchval("SELECT 1"),
                    backend=db.fetchval("SELECT pg_backend_pid()"),
                    awaited=asyncio.run(db.afetchval("SELECT 2")),
                    fresh_thread=db.bridge.thread.native_id != parent_thread,
                    threads=[t.name for t in threading.enumerate()],
                )
                os.write(w, json.dumps(report).encode())
                os.close(w)
                sys.exit(0)
            os.close(w)
            with os.fdopen(r) as pipe:
                child = json.loads(pipe.read())
            _, status = os.waitpid(pid, 0)
            child["exit"] = os.waitstatus_to_exitcode(status)
            child["parent_backend"] = parent_backend
            child["parent_after"] = db.fetchval("SELECT pg_backend_pid()")
            child["parent_awaited"] = asyncio.run(db.afetchval("SELECT 3"))
            print(json.dumps(child))
            """
        )
        report = json.loads(out)
        assert report["exit"] == 0
        assert report["sync"] == 1
        assert report["awaited"] == 2
        assert report["fresh_thread"]
        assert report["threads"].count("loopbridge-default") == 1
        assert report["backend"] != report["parent_backend"]
        # The parent's pool kept its connections: the child never closed or terminated them.
        assert report["parent_after"] == report["parent_backend"]
        assert report["parent_awaited"] == 3

    def test_a_forked_child_never_touches_the_parents_connections(
        self, dsn: str, admin_dsn: str, schema: str
    ) -> None:
        out = run_script(
            f"""
            {ALLOW_FORK}
            import os, sys
            from loopbridge import Database
            db = Database({dsn!r}, min_size=3)
            db.open()
            print("ready", flush=True)
            pid = os.fork()
            if pid == 0:
                sys.exit(0)  # exit at once: the inherited pool must not be closed from here
            os.waitpid(pid, 0)
            print("parent still", db.fetchval("SELECT 'ok'"))
            """
        )
        assert "parent still ok" in out

    def test_multiprocessing_fork_workers_use_the_database(self, dsn: str) -> None:
        out = run_script(
            f"""
            {ALLOW_FORK}
            import multiprocessing as mp
            from loopbridge import Database
            db = Database({dsn!r})
            db.execute("CREATE TABLE IF NOT EXISTS work (n int PRIMARY KEY)")

            def job(n):
                db.execute("INSERT INTO work VALUES ($1)", n)
                return db.fetchval("SELECT pg_backend_pid()")

            if __name__ == "__main__":
                with mp.get_context("fork").Pool(2) as pool:
                    pids = pool.map(job, range(20), chunksize=2)
                print("rows", db.fetchval("SELECT count(*) FROM work"))
                print("worker backends", len(set(pids)))
            """
        )
        assert "rows 20" in out
        assert "worker backends 2" in out

    def test_parent_and_child_calling_from_the_forking_thread_each_get_their_own_wakeups(self) -> None:
        # A sync thread waits on an eventfd of its own (Linux); a forked child must not share the
        # parent's, or one process's wakeup could be consumed by the other and a call would hang.
        out = run_script(
            f"""
            {ALLOW_FORK}
            import asyncio, os, sys
            from loopbridge import Bridge
            async def echo(i):
                await asyncio.sleep(0)
                return i
            bridge = Bridge("forked-wakeups")
            assert bridge.run(echo, -1) == -1  # the forking thread has its waiter before the fork
            pid = os.fork()
            ok = all(bridge.run(echo, i) == i for i in range(300))
            if pid == 0:
                os._exit(0 if ok else 1)
            _, status = os.waitpid(pid, 0)
            print("parent", ok, "child", os.waitstatus_to_exitcode(status) == 0)
            bridge.close()
            """
        )
        assert "parent True child True" in out


class TestExit:
    def test_exit_with_calls_in_flight_is_quick_quiet_and_closes_connections(
        self, dsn: str, admin_dsn: str, schema: str
    ) -> None:
        started = time.monotonic()
        out = run_script(
            f"""
            import asyncio, threading
            from loopbridge import Database, LoopBridgeError
            db = Database({dsn!r})
            db.execute("SELECT 1")
            started = threading.Barrier(5)

            def blocked_view():
                started.wait()
                try:
                    db.execute("SELECT pg_sleep(30)")
                except LoopBridgeError:
                    pass  # BridgeClosedError: the process is exiting

            def waiting_loop():
                async def main():
                    started.wait()
                    await asyncio.gather(*(db.aexecute("SELECT pg_sleep(30)") for _ in range(3)),
                                         return_exceptions=True)
                asyncio.run(main())

            for target in (blocked_view,) * 3 + (waiting_loop,):
                threading.Thread(target=target, daemon=True).start()
            started.wait()
            print("exiting with calls in flight", flush=True)
            """,
            timeout=30,
        )
        elapsed = time.monotonic() - started
        assert "exiting with calls in flight" in out
        assert elapsed < 5 + 2, f"exit took {elapsed:.1f} s"  # + interpreter start-up
        deadline = time.monotonic() + 10
        while backends(admin_dsn, schema) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert backends(admin_dsn, schema) == set()

    def test_default_bridge_closes_at_exit_without_noise(self, dsn: str, admin_dsn: str, schema: str) -> None:
        out = run_script(
            f"""
            import asyncio
            from loopbridge import Database
            db = Database({dsn!r}, min_size=2)
            print(db.fetchval("SELECT 'sync'"), asyncio.run(db.afetchval("SELECT 'async'")))
            """
        )
        assert out.split() == ["sync", "async"]
        deadline = time.monotonic() + 10
        while backends(admin_dsn, schema) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert backends(admin_dsn, schema) == set()
