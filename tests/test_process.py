"""Whole processes: fork (gunicorn --preload, multiprocessing) and exit with calls in flight.

Each scenario runs in a fresh ``python -X dev -W error`` so that the interpreter's own start-up and
shutdown are part of the test, and anything written to stderr (a warning, "Task was destroyed but it is
pending", "Event loop is closed", a ResourceWarning) fails it.
"""

from __future__ import annotations

import json
import textwrap
import time

import pytest

from tests.support import STRICT, independent, run_script

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

    def test_a_child_forked_while_another_thread_made_a_database_makes_its_own(self, dsn: str) -> None:
        # A thread of the parent was making a Database (holding the lock of the shared pools) at the
        # moment another forked: the child has no such thread to release it, and its own first
        # Database must not wait for it forever. The lock is held by hand to catch that moment.
        out = run_script(
            f"""
            {ALLOW_FORK}
            import os, signal, sys, threading
            import loopbridge._source
            from loopbridge import Database
            Database({dsn!r}).fetchval("SELECT 1")  # the parent uses loopbridge before it forks
            held, done = threading.Event(), threading.Event()

            def making_a_database():
                with loopbridge._source._shared_lock:
                    held.set()
                    done.wait(30)

            maker = threading.Thread(target=making_a_database)
            maker.start()
            held.wait(30)
            pid = os.fork()
            if pid == 0:
                signal.alarm(20)  # a deadlock ends the child with SIGALRM instead of hanging the test
                print("child", Database({dsn!r}, min_size=0).fetchval("SELECT 'ok'"), flush=True)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            done.set()
            maker.join(30)
            print("child exit", os.waitstatus_to_exitcode(status))
            """
        )
        assert "child ok" in out
        assert "child exit 0" in out

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


# -- exit with calls in flight, every way a process ends up there -----------------------------------

#: Run by every exit script first: the DSN is the script's first argument; exiting() marks the moment
#: the script's own code is done, from which the interpreter's exit is timed.
PRELUDE = """
import asyncio, os, signal, sys, threading, time
from loopbridge import Bridge, Database, LoopBridgeError
DSN = sys.argv[1]

def exiting():
    # One write: print() writes its pieces one by one, and another thread's print may land between them.
    sys.stdout.write(f"EXITING {time.time()}\\n")
    sys.stdout.flush()
"""

#: Interpreters the exit is tested under: the strictest, warnings as errors alone, and plain python.
FLAGS = [
    pytest.param(("-X", "dev", "-W", "error"), id="dev-mode+warnings-as-errors"),
    pytest.param(("-W", "error"), id="warnings-as-errors"),
    pytest.param((), id="plain"),
]

#: How long an exit with calls in flight may take (docs/production/shutdown.md promises: within 5 s of
#: the script's end).
EXIT_BOUND = 5.0


def exit_in_time(
    body: str, dsn: str, *, flags: tuple[str, ...] = STRICT, env: dict[str, str] | None = None
) -> str:
    """Run PRELUDE + *body* with *dsn*; assert a quiet exit (run_script) within EXIT_BOUND of exiting()."""
    out = run_script(PRELUDE + textwrap.dedent(body), args=(dsn,), flags=flags, env=env, timeout=60)
    ended = time.time()
    marks = [float(line.split()[1]) for line in out.splitlines() if line.startswith("EXITING ")]
    assert marks, f"the script never reached exiting():\n{out}"
    took = ended - max(marks)
    assert took < EXIT_BOUND, f"exit took {took:.1f} s after the script's code was done"
    return out


def connections_closed(admin_dsn: str, application_name: str) -> None:
    """The server shows no connection of the script left (polled: it may take a moment to notice)."""
    deadline = time.monotonic() + 10
    while backends(admin_dsn, application_name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert backends(admin_dsn, application_name) == set()


class TestExitVariants:
    @pytest.mark.parametrize("flags", FLAGS)
    def test_blocked_threads_waiting_tasks_a_running_loop_and_a_future_at_exit(
        self, dsn: str, admin_dsn: str, schema: str, flags: tuple[str, ...]
    ) -> None:
        out = exit_in_time(
            """
            db = Database(DSN, max_size=8)
            db.execute("SELECT 1")
            started = threading.Barrier(5, timeout=30)

            def blocked_view():
                started.wait()
                db.execute("SELECT pg_sleep(30)")  # no try: exit must not wake it with an error

            def waiting_tasks():
                async def main():
                    started.wait()
                    await asyncio.gather(*(db.aexecute("SELECT pg_sleep(30)") for _ in range(3)))
                asyncio.run(main())

            def running_loop():
                async def main():
                    started.wait()
                    db.execute("SELECT pg_sleep(30)")  # blocks this running loop
                asyncio.run(main())

            for target in (blocked_view, blocked_view, waiting_tasks, running_loop):
                threading.Thread(target=target, daemon=True).start()
            pending = db.bridge.submit(asyncio.sleep, 30)
            started.wait()
            time.sleep(0.3)  # let every call reach the server
            print("in flight:", db.bridge.stats().calls_in_flight, flush=True)
            exiting()
            """,
            dsn,
            flags=flags,
        )
        assert "in flight: 7" in out
        connections_closed(admin_dsn, schema)

    def test_non_daemon_threads_finish_their_calls_then_the_process_exits(
        self, dsn: str, admin_dsn: str, schema: str
    ) -> None:
        """Python waits for non-daemon threads before exit begins: the bridge keeps serving them until
        they are done, so none of their writes is cut off, and exit follows promptly."""
        out = exit_in_time(
            """
            db = Database(DSN)
            db.execute("CREATE TABLE work (who text, n int)")

            def worker(who):
                for n in range(5):
                    db.execute("INSERT INTO work SELECT $1, $2 FROM pg_sleep(0.1)", who, n)
                print(who, "done; rows so far", db.fetchval("SELECT count(*) FROM work"), flush=True)
                exiting()  # the exit is timed from the last worker's end

            def async_worker(who):
                async def main():
                    for n in range(5):
                        await db.aexecute("INSERT INTO work SELECT $1, $2 FROM pg_sleep(0.1)", who, n)
                asyncio.run(main())
                exiting()

            for i in range(3):
                threading.Thread(target=worker, args=(f"thread-{i}",)).start()  # not daemon
            threading.Thread(target=async_worker, args=("loop",)).start()
            print("main thread returns", flush=True)
            """,
            dsn,
        )
        assert out.index("main thread returns") < out.index("done; rows so far")
        assert independent(admin_dsn, f"SELECT count(*) FROM {schema}.work")[0][0] == 4 * 5
        connections_closed(admin_dsn, schema)

    def test_a_foreign_loop_still_running_at_exit(self, dsn: str, admin_dsn: str, schema: str) -> None:
        out = exit_in_time(
            """
            db = Database(DSN)
            db.execute("SELECT 1")
            loop = asyncio.new_event_loop()
            awaiting = threading.Event()

            async def handler():
                awaiting.set()
                try:
                    await db.afetchval("SELECT pg_sleep(30)")
                except LoopBridgeError as exc:
                    print("handler got", type(exc).__name__, flush=True)

            def serve_forever():  # a server's loop: never stops on its own
                asyncio.set_event_loop(loop)
                for _ in range(4):
                    loop.create_task(handler())
                loop.run_forever()

            threading.Thread(target=serve_forever, daemon=True).start()
            awaiting.wait(30)
            time.sleep(0.3)
            exiting()
            """,
            dsn,
        )
        assert "EXITING" in out
        connections_closed(admin_dsn, schema)

    def test_asyncio_run_returning_with_tasks_still_awaiting(
        self, dsn: str, admin_dsn: str, schema: str
    ) -> None:
        out = exit_in_time(
            """
            db = Database(DSN)

            async def main():
                tasks = [asyncio.ensure_future(db.afetchval("SELECT pg_sleep(30)")) for _ in range(5)]
                await asyncio.sleep(0.5)
                print("returning with", sum(not t.done() for t in tasks), "tasks awaiting", flush=True)
                # asyncio.run() cancels them: each cancels its query on the bridge loop

            asyncio.run(main())
            running = db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' "
                "AND state = 'active' AND application_name = current_setting('application_name')")
            print("queries still running:", running, flush=True)
            exiting()
            """,
            dsn,
        )
        assert "returning with 5 tasks awaiting" in out
        assert "queries still running: 0" in out
        connections_closed(admin_dsn, schema)

    def test_a_bridge_of_its_own_and_a_pool_still_opening_at_exit(
        self, dsn: str, admin_dsn: str, schema: str
    ) -> None:
        exit_in_time(
            """
            bridge = Bridge("own")  # not the default bridge, never closed by the script
            db = Database(DSN, bridge=bridge, min_size=4)
            for _ in range(8):  # first calls: the pool is being created while the process exits
                threading.Thread(target=lambda: db.fetchval("SELECT 1"), daemon=True).start()
            exiting()
            """,
            dsn,
        )
        connections_closed(admin_dsn, schema)

    def test_sigterm_handled_with_sys_exit_during_a_blocking_call(
        self, dsn: str, admin_dsn: str, schema: str
    ) -> None:
        """A container stop: SIGTERM, whose handler calls sys.exit(), while the main thread waits on
        the database. SystemExit interrupts the wait, the query is cancelled, the exit is quiet."""
        out = exit_in_time(
            """
            db = Database(DSN)
            db.execute("SELECT 1")

            def on_sigterm(signum, frame):
                exiting()
                sys.exit(0)

            signal.signal(signal.SIGTERM, on_sigterm)
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
            db.execute("SELECT pg_sleep(30)")
            print("not reached", flush=True)
            """,
            dsn,
        )
        assert "not reached" not in out
        connections_closed(admin_dsn, schema)

    @pytest.mark.parametrize("flags", FLAGS)
    def test_daemon_threads_inside_transactions_at_exit_are_ended_quietly_and_promptly(
        self, dsn: str, admin_dsn: str, schema: str, flags: tuple[str, ...]
    ) -> None:
        """Regression: a daemon thread inside ``with db.transaction()`` at exit, running a statement or
        idle between two, held its connection until the pool's close gave up after a full second and
        logged "connections still in use after 1 s; terminating them" (and weakref's exit hook reported
        the transaction as garbage collected). Nothing can give such a connection back at exit: it is
        terminated at once, the server rolls its work back, and nothing is printed."""
        out = exit_in_time(
            """
            db = Database(DSN, min_size=2)
            db.execute("CREATE TABLE t (n int)")
            in_statement, idle = threading.Event(), threading.Event()

            def running_a_statement():
                with db.transaction() as tx:
                    tx.execute("INSERT INTO t VALUES (1)")
                    in_statement.set()
                    tx.execute("SELECT pg_sleep(30)")

            def idle_in_transaction():
                with db.transaction() as tx:
                    tx.execute("INSERT INTO t VALUES (2)")
                    idle.set()
                    time.sleep(30)  # the caller's own work, between two statements

            for target in (running_a_statement, idle_in_transaction):
                threading.Thread(target=target, daemon=True).start()
            assert in_statement.wait(30) and idle.wait(30)
            time.sleep(0.3)  # let the statement reach the server
            print("in transactions:", db.stats().in_use, flush=True)
            exiting()
            """,
            dsn,
            flags=flags,
        )
        assert "in transactions: 2" in out
        connections_closed(admin_dsn, schema)
        assert independent(admin_dsn, f"SELECT count(*) FROM {schema}.t")[0][0] == 0  # rolled back

    def test_sys_exit_in_asyncio_run_with_tasks_awaiting_and_a_daemon_thread_in_a_transaction(
        self, dsn: str, admin_dsn: str, schema: str
    ) -> None:
        run_script(
            PRELUDE
            + textwrap.dedent(
                """
                db = Database(DSN, min_size=2)

                def in_transaction():
                    with db.transaction() as tx:
                        tx.execute("SELECT pg_sleep(30)")

                threading.Thread(target=in_transaction, daemon=True).start()

                async def main():
                    tasks = [asyncio.ensure_future(db.afetchval("SELECT pg_sleep(30)")) for _ in range(3)]
                    await asyncio.sleep(0.5)
                    exiting()
                    sys.exit(0)

                asyncio.run(main())
                """
            ),
            args=(dsn,),
            timeout=60,
        )
        connections_closed(admin_dsn, schema)

    @pytest.mark.parametrize("flags", FLAGS)
    def test_databases_and_bridges_dropped_without_close_are_closed_quietly(
        self, dsn: str, admin_dsn: str, schema: str, flags: tuple[str, ...]
    ) -> None:
        """A notebook re-running ``db = Database(dsn)``, a Bridge dropped with a pool on it: each pool is
        closed on its loop when found unreachable, a dropped bridge's threads end, and neither the
        collection nor the exit that follows prints anything."""
        out = exit_in_time(
            """
            import gc

            def backends():
                return db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = current_setting('application_name')")

            for _ in range(5):  # the re-run cell
                db = Database(DSN, min_size=2, max_size=2)
                db.fetchval("SELECT 1")

            def drop_a_bridge():
                other = Database(DSN, bridge=Bridge("dropped"), min_size=2)
                other.fetchval("SELECT 1")
                return other.bridge.thread

            dropped_thread = drop_a_bridge()
            deadline = time.monotonic() + 30
            while (backends() > 2 or dropped_thread.is_alive()) and time.monotonic() < deadline:
                gc.collect()
                time.sleep(0.05)
            print("backends:", backends(), "dropped bridge alive:", dropped_thread.is_alive(), flush=True)
            names = sorted(t.name for t in threading.enumerate() if t.name.startswith("loopbridge"))
            print("threads:", names)
            exiting()
            """,
            dsn,
            flags=flags,
        )
        assert "backends: 2 dropped bridge alive: False" in out
        assert "threads: ['loopbridge-default', 'loopbridge-default-watchdog']" in out
        connections_closed(admin_dsn, schema)

    def test_uvloop_bridge_exits_quietly_with_calls_in_flight(
        self, dsn: str, admin_dsn: str, schema: str
    ) -> None:
        out = exit_in_time(
            """
            import uvloop
            db = Database(DSN)
            async def loop_type():
                return type(asyncio.get_running_loop()) is uvloop.Loop
            print("bridge loop is uvloop:", db.bridge.run(loop_type), flush=True)
            for _ in range(3):
                threading.Thread(target=lambda: db.execute("SELECT pg_sleep(30)"), daemon=True).start()
            time.sleep(0.5)
            exiting()
            """,
            dsn,
            env={"LOOPBRIDGE_UVLOOP": "1"},
        )
        assert "bridge loop is uvloop: True" in out
        connections_closed(admin_dsn, schema)


#: Scripts that put the fault-injecting proxy (tests/faultproxy.py) between their Database and the
#: server: ``proxy`` and ``THROUGH``, the DSN through it.
PROXY_PRELUDE = """
from tests.faultproxy import FaultProxy
proxy = FaultProxy.in_front_of(DSN).start()
THROUGH = proxy.dsn_for(DSN)
"""


class TestExitWhateverTheServerDoes:
    """Exit stays quiet and within the bound whatever the server does: silent (the pool still opening),
    half-open under calls and a transaction, or refusing connections while asyncpg reconnects."""

    @pytest.mark.parametrize("flags", FLAGS)
    def test_exit_while_the_pool_opens_against_a_silent_server(
        self, dsn: str, admin_dsn: str, schema: str, flags: tuple[str, ...]
    ) -> None:
        """It took 5.1 s and printed "shutdown did not finish within 4.0 s ... Abandoning it", "Exception
        ignored ... Event loop is closed", "coroutine 'Pool._maintain_min_size' was never awaited" and
        three "Task was destroyed but it is pending!": the close waited for the opening, which waited
        for asyncpg's 60 s connect timeout."""
        exit_in_time(
            PROXY_PRELUDE
            + textwrap.dedent(
                """
            proxy.silence()
            db = Database(THROUGH, min_size=2)
            for _ in range(3):
                threading.Thread(target=lambda: db.fetchval("SELECT 1"), daemon=True).start()
            time.sleep(0.5)
            exiting()
            """
            ),
            dsn,
            flags=flags,
        )

    @pytest.mark.parametrize("flags", FLAGS)
    def test_exit_with_calls_and_a_transaction_on_half_open_connections(
        self, dsn: str, admin_dsn: str, schema: str, flags: tuple[str, ...]
    ) -> None:
        exit_in_time(
            PROXY_PRELUDE
            + textwrap.dedent(
                """
            db = Database(THROUGH, min_size=3, max_size=4)
            db.open()
            inside = threading.Event()

            def in_a_transaction():
                with db.transaction() as tx:
                    tx.execute("SELECT 1")
                    inside.set()
                    tx.execute("SELECT 2")  # into the silence, without a timeout

            threading.Thread(target=in_a_transaction, daemon=True).start()
            assert inside.wait(30)
            proxy.silence()
            for _ in range(2):  # statements into the silence, and one waiting for their slots
                threading.Thread(target=lambda: db.fetchval("SELECT 1"), daemon=True).start()
            time.sleep(0.5)
            exiting()
            """
            ),
            dsn,
            flags=flags,
        )
        connections_closed(admin_dsn, schema)  # the proxy's end reset the server's side of each

    def test_exit_while_asyncpg_reconnects_to_a_refusing_server_logs_once_without_traceback(
        self, dsn: str, admin_dsn: str, schema: str
    ) -> None:
        """asyncpg's "Failed to restore the pool connection floor" printed a full traceback at every
        retry: said once per episode, in a line, on the loopbridge logger."""
        out = exit_in_time(
            PROXY_PRELUDE
            + textwrap.dedent(
                """
            import logging
            logging.basicConfig(stream=sys.stdout, format="LOG %(levelname)s %(name)s: %(message)s")
            db = Database(THROUGH, min_size=2)
            db.open()
            proxy.refuse()
            proxy.reset()  # the pool's connections die; asyncpg reconnects to keep min_size, refused
            time.sleep(3.5)  # asyncpg retries after 1 s, then 2 s
            exiting()
            """
            ),
            dsn,
        )
        logged = [line for line in out.splitlines() if line.startswith("LOG ")]
        assert len(logged) == 1, out
        assert logged[0].startswith("LOG WARNING loopbridge: ")
        assert "could not reopen min_size=2 connections in the background" in logged[0]
        assert "Traceback" not in out
