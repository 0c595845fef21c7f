"""Bridge: the thread, the crossing, timeouts, cancellation, errors, deadlock guard and close."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import logging
import threading
import time
import traceback
import weakref
from collections.abc import Awaitable, Generator
from typing import Any

import asyncpg
import pytest

import loopbridge
import loopbridge._wakeup
from loopbridge import (
    Bridge,
    BridgeClosedError,
    CallTimeoutError,
    ConfigurationError,
    Database,
    DeadlockError,
)
from tests.boundary import sessions, wait_until
from tests.support import WAIT, Caller, in_thread, independent, loop_held, run_loop, run_script

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")


async def add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


async def where_am_i() -> str:
    return threading.current_thread().name


async def fail_deep() -> None:
    await asyncio.sleep(0)
    raise ValueError("raised on the bridge")


def collected_until(predicate: Any, timeout: float = WAIT) -> None:
    """Run the garbage collector until *predicate* holds (objects may still be in use for a moment)."""
    wait_until(lambda: gc.collect() >= 0 and predicate(), timeout)


class Recorder:
    """A coroutine that sleeps and records whether it finished or was cancelled (thread-safe)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.finished = threading.Event()

    async def sleep(self, seconds: float) -> str:
        self.started.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.finished.set()
        return "slept"


class Ready(Awaitable[str]):
    """An awaitable that is not a coroutine (like asyncpg's Pool before it is awaited)."""

    def __await__(self) -> Generator[Any, None, str]:
        yield from asyncio.sleep(0).__await__()
        return "awaited"


class TestThread:
    def test_thread_starts_on_first_use_named_and_daemon(self) -> None:
        with Bridge("lazy") as bridge:
            assert not bridge.running
            assert not any(t.name == "loopbridge-lazy" for t in threading.enumerate())
            assert bridge.run(where_am_i) == "loopbridge-lazy"
            thread = bridge.thread
            assert thread is not None
            assert thread.daemon
            assert bridge.running

    def test_threads_racing_the_first_call_start_exactly_one_loop_thread(self) -> None:
        with Bridge("race") as bridge:
            barrier = threading.Barrier(16)

            def first_call() -> str:
                barrier.wait(WAIT)
                return bridge.run(where_am_i)

            threads = [threading.Thread(target=first_call) for _ in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT)
            assert [t.name for t in threading.enumerate()].count("loopbridge-race") == 1

    def test_uvloop_runs_the_bridge_loop_when_asked(self) -> None:
        import uvloop  # the test extra installs loopbridge[uvloop]

        async def loop_type() -> type:
            return type(asyncio.get_running_loop())

        with Bridge("uv", uvloop=True) as bridge:
            assert bridge.run(loop_type) is uvloop.Loop

    def test_uvloop_is_the_default_where_installed_unless_turned_off(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import uvloop

        async def loop_type() -> type:
            return type(asyncio.get_running_loop())

        monkeypatch.delenv("LOOPBRIDGE_UVLOOP", raising=False)
        with Bridge("default-loop") as bridge:
            assert bridge.run(loop_type) is uvloop.Loop
        with Bridge("asked-off", uvloop=False) as bridge:
            assert not issubclass(bridge.run(loop_type), uvloop.Loop)
        monkeypatch.setenv("LOOPBRIDGE_UVLOOP", "0")
        with Bridge("env-off") as bridge:
            assert not issubclass(bridge.run(loop_type), uvloop.Loop)

    def test_loop_factory_and_uvloop_are_exclusive(self) -> None:
        with pytest.raises(ConfigurationError, match="either loop_factory or uvloop"):
            Bridge(loop_factory=asyncio.new_event_loop, uvloop=True)


class TestCalls:
    def test_returns_the_result_for_every_kind_of_caller(self, bridge: Bridge, caller: Caller) -> None:
        assert caller.call(bridge, "run", add, 2, 3) == 5

    def test_the_work_runs_on_the_bridge_thread(self, bridge: Bridge, caller: Caller) -> None:
        assert caller.call(bridge, "run", where_am_i) == f"loopbridge-{bridge.name}"

    def test_accepts_an_awaitable_that_is_not_a_coroutine(self, bridge: Bridge, caller: Caller) -> None:
        assert caller.call(bridge, "run", Ready()) == "awaited"

    def test_runs_asyncpg_create_pool_on_the_bridge_loop(self, bridge: Bridge, dsn: str) -> None:
        # Pass create_pool itself: called on the bridge, the pool binds to the bridge loop.
        pool = bridge.run(asyncpg.create_pool, dsn)
        try:
            assert bridge.run(pool.fetchval, "SELECT 40 + 2") == 42
            assert run_loop(lambda: bridge.arun(pool.fetchval, "SELECT 1")) == 1
        finally:
            bridge.run(pool.close)

    def test_submit_returns_a_concurrent_future(self, bridge: Bridge) -> None:
        future = bridge.submit(add, 20, 22)
        assert future.result(timeout=WAIT) == 42

    def test_contextvars_of_the_caller_are_visible(self, bridge: Bridge, caller: Caller) -> None:
        async def read() -> str:
            return request_id.get()

        def sync_caller() -> str:
            request_id.set("req-7")
            result: str = bridge.run(read)
            return result

        async def foreign_loop() -> str:
            request_id.set("req-7")
            return await bridge.arun(read)

        async def running_loop_thread() -> str:
            request_id.set("req-7")
            return sync_caller()

        if caller.kind == "sync-thread":
            assert in_thread(lambda: contextvars.Context().run(sync_caller)) == "req-7"
        elif caller.kind == "foreign-loop":
            assert run_loop(foreign_loop) == "req-7"
        else:
            assert run_loop(running_loop_thread) == "req-7"

    def test_the_work_runs_as_a_task_in_the_callers_context_and_leaks_nothing(self, bridge: Bridge) -> None:
        # A call's work is a task of its own, in a copy of the caller's context: what it sets there
        # leaves nothing in the next call's.
        async def first_step_only() -> tuple[str, bool]:
            seen = request_id.get()
            request_id.set("set by the first call")
            return seen, asyncio.current_task() is not None

        def caller(value: str) -> tuple[str, bool]:
            def inner() -> tuple[str, bool]:
                if value:
                    request_id.set(value)
                result: tuple[str, bool] = bridge.run(first_step_only)
                return result

            return contextvars.Context().run(inner)

        assert in_thread(lambda: caller("req-1")) == ("req-1", True)
        assert in_thread(lambda: caller("")) == ("unset", True)

    def test_a_call_whose_timeout_expires_at_once_is_cancelled_not_finished(self, bridge: Bridge) -> None:
        recorder = Recorder()
        future = bridge.submit(recorder.sleep, 30, timeout=0.0001)
        with pytest.raises(CallTimeoutError):
            future.result(timeout=WAIT)
        assert not recorder.finished.is_set()

    def test_calls_queued_while_the_loop_is_blocked_all_run(self, bridge: Bridge) -> None:
        # Work that blocks the loop delays the calls queued behind it; once it is done they all run.
        with loop_held(bridge):
            queued = [bridge.submit(add, n, 1) for n in range(50)]
        assert [future.result(WAIT) for future in queued] == [n + 1 for n in range(50)]

    def test_changes_to_contextvars_on_the_bridge_stay_there(self, bridge: Bridge) -> None:
        async def write() -> None:
            request_id.set("changed on the bridge")

        request_id.set("caller")
        bridge.run(write)
        assert request_id.get() == "caller"


class TestResultsBackToForeignLoops:
    """Results for one foreign loop travel back together (one wakeup of that loop per burst)."""

    def test_a_burst_of_results_reaches_every_task_and_skips_a_cancelled_one(self, bridge: Bridge) -> None:
        recorder = Recorder()

        async def main() -> list[int]:
            slow = asyncio.ensure_future(bridge.arun(recorder.sleep, 30))
            burst = asyncio.gather(*(bridge.arun(add, i, i) for i in range(200)))
            await asyncio.to_thread(recorder.started.wait, WAIT)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            return list(await burst)

        assert run_loop(main) == [2 * i for i in range(200)]
        assert recorder.cancelled.wait(WAIT)

    def test_tasks_of_several_loops_each_get_their_own_results(self, bridge: Bridge) -> None:
        def loop_of_tasks(base: int) -> list[int]:
            async def main() -> list[int]:
                return list(await asyncio.gather(*(bridge.arun(add, base, i) for i in range(50))))

            return asyncio.run(main())

        results = [in_thread(functools.partial(loop_of_tasks, base)) for base in (0, 1000, 2000)]
        assert results == [[base + i for i in range(50)] for base in (0, 1000, 2000)]

    def test_the_bridge_keeps_no_finished_caller_loop_alive(self, bridge: Bridge) -> None:
        loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

        async def main() -> int:
            loops.append(weakref.ref(asyncio.get_running_loop()))
            return await bridge.arun(add, 1, 2)

        assert run_loop(main) == 3
        gc.collect()
        assert loops[0]() is None


class TestErrors:
    def test_exceptions_keep_their_type_and_show_where_they_were_raised(
        self, bridge: Bridge, caller: Caller
    ) -> None:
        with pytest.raises(ValueError, match="raised on the bridge") as info:
            caller.call(bridge, "run", fail_deep)
        frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
        assert "fail_deep" in frames

    def test_asyncpg_errors_reach_the_caller_unchanged(self, db: Database, caller: Caller) -> None:
        db.execute("CREATE TABLE t (k int PRIMARY KEY)")
        db.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(asyncpg.UniqueViolationError):
            caller.call(db, "execute", "INSERT INTO t VALUES (1)")

    def test_a_sync_function_gets_a_clear_type_error(self, bridge: Bridge, caller: Caller) -> None:
        def not_async() -> int:
            return 5

        with pytest.raises(TypeError, match=r"not_async\(\) returned int 5, which cannot be awaited"):
            caller.call(bridge, "run", not_async)

    def test_a_non_callable_gets_a_clear_type_error(self, bridge: Bridge) -> None:
        with pytest.raises(TypeError, match="needs an async function"):
            bridge.run(42)  # type: ignore[call-overload]

    def test_an_awaitable_with_arguments_shows_the_correct_call(self, bridge: Bridge) -> None:
        with pytest.raises(TypeError, match=r"correct: Bridge.run\(fetch_rows, 42\)"):
            bridge.run(add(1, 2), 42)  # type: ignore[call-overload]

    def test_an_awaitable_bound_to_another_loop_is_refused_before_anything_is_queued(
        self, bridge: Bridge, caller: Caller, dsn: str
    ) -> None:
        """Regression: ``bridge.run(asyncpg.create_pool(dsn))`` (which the docstring recommended) failed
        on the bridge loop with asyncpg's "Future attached to a different loop"."""
        other = asyncio.new_event_loop()
        try:
            pool = asyncpg.create_pool(dsn, loop=other)  # made in the caller's thread: bound to `other`
            future = other.create_future()
            for awaitable in (pool, future):
                with pytest.raises(TypeError, match="bound to another event loop") as refused:
                    caller.call(bridge, "run", awaitable)
                assert "(asyncpg.create_pool(dsn)); correct: " in str(refused.value)
                assert "(asyncpg.create_pool, dsn)" in str(refused.value)
            assert bridge.stats().calls_started == 0  # nothing was queued
            # Made on the bridge loop, the same pool works.
            made_there = bridge.run(asyncpg.create_pool, dsn)
            assert bridge.run(made_there.fetchval, "SELECT 1") == 1
            bridge.run(made_there.close)
        finally:
            other.close()

    def test_a_future_of_the_bridge_loop_itself_is_accepted(self, bridge: Bridge) -> None:
        async def make_future() -> asyncio.Future[str]:
            future = asyncio.get_running_loop().create_future()
            future.get_loop().call_soon(future.set_result, "resolved")
            return future

        assert bridge.run(bridge.run(make_future)) == "resolved"

    def test_an_already_awaited_coroutine_is_refused(self, bridge: Bridge) -> None:
        coro = add(1, 2)
        assert bridge.run(coro) == 3
        with pytest.raises(RuntimeError, match="already awaited"):
            bridge.run(coro)

    def test_the_bridge_keeps_serving_after_errors(self, bridge: Bridge) -> None:
        for _ in range(3):
            with pytest.raises(ValueError, match="raised on the bridge"):
                bridge.run(fail_deep)
        assert bridge.run(add, 1, 1) == 2


class TestTimeoutsAndCancellation:
    def test_timeout_raises_timeouterror_and_cancels_the_work(self, bridge: Bridge, caller: Caller) -> None:
        recorder = Recorder()
        started = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            caller.call(bridge, "run", recorder.sleep, 30, timeout=0.2)
        assert isinstance(info.value, CallTimeoutError)
        assert "did not finish within 0.2 s" in str(info.value)
        assert recorder.cancelled.wait(WAIT)
        assert time.monotonic() - started < 10

    def test_timeout_cancels_a_running_query(self, db: Database, caller: Caller, dsn: str) -> None:
        with pytest.raises(CallTimeoutError):
            caller.call(db, "execute", "SELECT pg_sleep(30)", timeout=0.3)
        # The connection went back to the pool and works.
        assert db.fetchval("SELECT 1") == 1

    def test_submit_timeout_sets_the_error_on_the_future(self, bridge: Bridge) -> None:
        recorder = Recorder()
        future = bridge.submit(recorder.sleep, 30, timeout=0.2)
        with pytest.raises(CallTimeoutError):
            future.result(timeout=WAIT)
        assert recorder.cancelled.wait(WAIT)

    def test_cancelling_the_awaiting_task_cancels_the_bridge_task(self, bridge: Bridge) -> None:
        recorder = Recorder()

        async def main() -> None:
            task = asyncio.ensure_future(bridge.arun(recorder.sleep, 30))
            await asyncio.to_thread(recorder.started.wait, WAIT)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run_loop(main)
        assert recorder.cancelled.wait(WAIT)
        assert not recorder.finished.is_set()

    def test_cancelling_the_future_cancels_the_bridge_task(self, bridge: Bridge) -> None:
        recorder = Recorder()
        future = bridge.submit(recorder.sleep, 30)
        assert recorder.started.wait(WAIT)
        assert future.cancel()
        assert recorder.cancelled.wait(WAIT)

    def test_a_cancelled_awaiting_task_releases_its_connection(self, db: Database) -> None:
        async def main() -> None:
            task = asyncio.ensure_future(db.aexecute("SELECT pg_sleep(30)"))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run_loop(main)
        assert (
            db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' "
                # Only this test's sessions: the server is shared with other test runs.
                "AND state = 'active' AND application_name = current_setting('application_name')"
            )
            == 0
        )

    def test_ctrl_c_during_a_blocking_run_cancels_the_work_and_reraises(self) -> None:
        out = run_script(
            """
            import asyncio, signal, threading
            signal.signal(signal.SIGINT, signal.default_int_handler)  # see tests.support.CTRL_C
            from loopbridge import Bridge
            cancelled = threading.Event()
            async def sleeper():
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    cancelled.set()
                    raise
            bridge = Bridge("ctrl-c")
            main = threading.main_thread().ident
            threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()
            try:
                bridge.run(sleeper)
            except KeyboardInterrupt:
                print("KeyboardInterrupt re-raised")
            print("bridge task cancelled:", cancelled.wait(5))
            print("bridge still serves:", bridge.run(asyncio.sleep, 0, "yes"))
            bridge.close()
            """
        )
        assert "KeyboardInterrupt re-raised" in out
        assert "bridge task cancelled: True" in out
        assert "bridge still serves: yes" in out


class TestSyncWaiters:
    @pytest.mark.slow  # waits out timeouts: 2 s or more
    def test_a_late_wakeup_for_an_abandoned_call_does_not_end_the_next_call_early(self) -> None:
        # A thread reuses one waiter for all its calls: the wakeup of a call it gave up waiting for
        # (its loop was blocked) arrives during its next call, which must still wait for its own result.
        async def block_the_loop() -> None:
            time.sleep(3.5)  # noqa: ASYNC251 - longer than the first caller waits (0.1 s + 2 * GRACE)

        async def later(value: str) -> str:
            await asyncio.sleep(0.3)
            return value

        with Bridge("stale-wakeup", block_threshold=None) as bridge:

            def caller() -> str:
                bridge.submit(block_the_loop)
                with pytest.raises(CallTimeoutError, match="did not respond"):
                    bridge.run(add, 1, 2, timeout=0.1)
                result: str = bridge.run(later, "its own result")
                return result

            assert in_thread(caller) == "its own result"

    def test_the_lock_waiter_serves_where_there_is_no_eventfd(
        self, bridge: Bridge, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(loopbridge._wakeup, "_HAVE_EVENTFD", False)
        recorder = Recorder()
        assert in_thread(lambda: bridge.run(add, 2, 3)) == 5
        with pytest.raises(CallTimeoutError):
            in_thread(lambda: bridge.run(recorder.sleep, 30, timeout=0.2))
        assert recorder.cancelled.wait(WAIT)


class TestDeadlockGuard:
    def test_a_blocking_call_on_the_bridge_thread_raises_deadlock_error_at_once(self, bridge: Bridge) -> None:
        async def nested() -> None:
            bridge.run(add, 1, 2)

        started = time.monotonic()
        with pytest.raises(DeadlockError, match=r"await the async twin") as info:
            bridge.run(nested)
        assert isinstance(info.value, RuntimeError)
        assert time.monotonic() - started < 5

    def test_a_blocking_database_call_inside_run_names_the_async_twin(self, db: Database) -> None:
        async def work(conn: Any) -> None:
            db.fetchval("SELECT 1")

        with pytest.raises(DeadlockError, match=r"Database.fetchval\(\) is a blocking call"):
            db.run(work)

    def test_arun_on_the_bridge_loop_just_awaits(self, bridge: Bridge) -> None:
        async def nested() -> int:
            return await bridge.arun(add, 1, 2)

        assert bridge.run(nested) == 3

    def test_closing_from_the_bridge_thread_raises_deadlock_error(self, bridge: Bridge) -> None:
        async def close_myself() -> None:
            bridge.close()

        with pytest.raises(DeadlockError, match="close the bridge from another thread"):
            bridge.run(close_myself)
        # Nothing changed: the bridge still serves, and a close from another thread still closes it.
        assert not bridge.closed
        assert bridge.run(asyncio.sleep, 0, "still serving") == "still serving"
        thread = bridge.thread
        assert thread is not None
        bridge.close()
        assert not thread.is_alive()


class TestClose:
    def test_close_twice_is_fine_and_later_calls_say_what_to_do(self) -> None:
        bridge = Bridge("closing")
        assert bridge.run(add, 1, 1) == 2
        bridge.close()
        bridge.close()
        assert bridge.closed
        assert bridge.thread is None
        with pytest.raises(BridgeClosedError, match="create a new Bridge"):
            bridge.run(add, 1, 1)
        with pytest.raises(BridgeClosedError):
            run_loop(lambda: bridge.arun(add, 1, 1))
        with pytest.raises(BridgeClosedError):
            bridge.submit(add, 1, 1)

    def test_close_joins_the_named_thread(self) -> None:
        bridge = Bridge("joined")
        bridge.run(add, 1, 1)
        thread = bridge.thread
        assert thread is not None
        bridge.close()
        assert not thread.is_alive()

    def test_closing_an_unused_bridge_starts_nothing(self) -> None:
        bridge = Bridge("unused")
        bridge.close()
        assert bridge.thread is None
        assert not any(t.name == "loopbridge-unused" for t in threading.enumerate())

    def test_context_manager_closes(self) -> None:
        with Bridge("ctx") as bridge:
            bridge.run(add, 1, 1)
        assert bridge.closed

    def test_a_bridge_dropped_without_close_stops_its_threads(self) -> None:
        """Regression: a Bridge garbage collected while its thread ran left the loop and watchdog threads
        running for the life of the process."""

        def use_and_drop() -> list[threading.Thread]:
            bridge = Bridge("dropped")
            assert bridge.run(add, 1, 1) == 2
            return [t for t in threading.enumerate() if t.name.startswith("loopbridge-dropped")]

        threads = use_and_drop()
        assert len(threads) == 2  # the loop and its watchdog
        collected_until(lambda: not any(thread.is_alive() for thread in threads))

    def test_a_dropped_bridge_closes_the_pools_on_it(self, dsn: str, admin_dsn: str, schema: str) -> None:
        db = Database(dsn, bridge=Bridge("dropped-with-pool"), min_size=2)
        assert db.fetchval("SELECT 1") == 1
        thread = db.bridge.thread
        assert thread is not None
        del db
        # Collected once its last connection is back (the reset after a call finishes in the background).
        collected_until(lambda: not thread.is_alive())
        assert sessions(admin_dsn, schema) == 0  # closed before the thread ended

    def test_a_bridge_collected_on_its_own_thread_stops_without_blocking_it(self) -> None:
        bridge = Bridge("collected-on-itself")
        bridge.cycle = bridge  # type: ignore[attr-defined]  # only the cyclic collector frees it
        dropped = threading.Event()

        async def collect() -> str:
            await asyncio.to_thread(dropped.wait, WAIT)
            gc.collect()  # on the bridge thread: the Bridge's finalizer runs here, and must not block
            return "collected"

        future = bridge.submit(collect)
        thread = bridge.thread
        assert thread is not None
        del bridge
        dropped.set()
        assert future.result(WAIT) == "collected"
        thread.join(WAIT)
        assert not thread.is_alive()

    def test_calls_in_flight_finish_within_the_close_timeout(self) -> None:
        bridge = Bridge("graceful")
        recorder = Recorder()
        future = bridge.submit(recorder.sleep, 0.3)
        assert recorder.started.wait(WAIT)
        bridge.close(timeout=10)
        assert future.result(timeout=0) == "slept"

    def test_a_concurrent_close_returns_only_once_the_first_has_stopped_the_bridge(self) -> None:
        """Regression: a second close() found the bridge marked closed and returned at once, while the
        first was still letting a call finish and the loop thread still ran."""
        bridge = Bridge("closed-twice-at-once")
        started, release = threading.Event(), threading.Event()

        async def finish_when_released() -> str:
            started.set()
            await asyncio.to_thread(release.wait, WAIT)
            return "finished"

        future = bridge.submit(finish_when_released)
        assert started.wait(WAIT)
        loop_thread = bridge.thread
        assert loop_thread is not None
        first = threading.Thread(target=bridge.close, args=(WAIT,), name="first-close")
        first.start()
        wait_until(lambda: bridge.closed)
        second = threading.Thread(target=bridge.close, args=(WAIT,), name="second-close")
        second.start()
        second.join(0.3)
        assert second.is_alive(), "the second close() returned while the first was still stopping"
        release.set()
        second.join(WAIT)
        assert not second.is_alive()
        assert future.done()
        assert future.result(timeout=0) == "finished"
        assert not loop_thread.is_alive()
        first.join(WAIT)

    def test_a_close_on_the_bridge_thread_while_the_bridge_is_stopping_raises_deadlock_error(self) -> None:
        bridge = Bridge("closing-itself-while-closing")
        started, release = threading.Event(), threading.Event()

        async def close_from_inside() -> str:
            started.set()
            await asyncio.to_thread(release.wait, WAIT)
            try:
                bridge.close()
            except DeadlockError:
                return "refused"
            return "returned"

        future = bridge.submit(close_from_inside)
        assert started.wait(WAIT)
        closer = threading.Thread(target=bridge.close, args=(WAIT,), name="closer")
        closer.start()
        wait_until(lambda: bridge.closed)
        release.set()
        closer.join(WAIT)
        assert future.result(timeout=0) == "refused"

    def test_calls_still_running_after_the_timeout_get_bridge_closed_error(self) -> None:
        bridge = Bridge("impatient")
        recorder = Recorder()
        future = bridge.submit(recorder.sleep, 30)
        assert recorder.started.wait(WAIT)
        started = time.monotonic()
        bridge.close(timeout=0.2)
        assert time.monotonic() - started < 5
        with pytest.raises(BridgeClosedError, match="closed while the call was in flight"):
            future.result(timeout=0)
        assert recorder.cancelled.is_set()

    def test_a_blocked_sync_caller_is_woken_by_close(self) -> None:
        bridge = Bridge("wake")
        recorder = Recorder()
        errors: list[BaseException] = []

        def blocked() -> None:
            try:
                bridge.run(recorder.sleep, 30)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=blocked)
        thread.start()
        assert recorder.started.wait(WAIT)
        bridge.close(timeout=0.1)
        thread.join(WAIT)
        assert not thread.is_alive()
        assert isinstance(errors[0], BridgeClosedError)

    def test_close_closes_registered_pools_on_the_bridge_loop(
        self, dsn: str, admin_dsn: str, schema: str
    ) -> None:
        bridge = Bridge("pools")
        db = Database(dsn, bridge=bridge, min_size=2)
        db.open()
        count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        assert independent(admin_dsn, count, schema)[0][0] == 2
        bridge.close()
        assert independent(admin_dsn, count, schema)[0][0] == 0
        with pytest.raises(BridgeClosedError):
            db.fetchval("SELECT 1")

    def test_aclose_from_async_code(self) -> None:
        bridge = Bridge("aclose")

        async def main() -> None:
            assert await bridge.arun(add, 1, 1) == 2
            await bridge.aclose()

        run_loop(main)
        assert bridge.closed


class TestDefaultBridge:
    def test_default_bridge_is_shared(self) -> None:
        assert loopbridge.default_bridge() is loopbridge.default_bridge()
        assert loopbridge.default_bridge().name == "default"

    def test_database_uses_the_default_bridge_unless_given_one(self, dsn: str) -> None:
        db = Database(dsn)
        assert db.bridge is loopbridge.default_bridge()
        db.close()

    def test_a_closed_default_bridge_is_replaced(self) -> None:
        first = loopbridge.default_bridge()
        first.run(add, 1, 1)
        first.close()
        second = loopbridge.default_bridge()
        assert second is not first
        assert second.run(add, 2, 2) == 4

    def test_repr_names_the_state(self) -> None:
        bridge = Bridge("shown")
        assert repr(bridge) == "<Bridge 'shown' created>"
        assert bridge.state == "created"
        bridge.run(add, 1, 1)
        assert repr(bridge) == "<Bridge 'shown' running thread='loopbridge-shown'>"
        assert bridge.state == "running"
        bridge.close()
        assert repr(bridge) == "<Bridge 'shown' closed>"
        assert bridge.state == "closed"


class TestStatsAndWatchdog:
    def test_stats_count_calls_by_outcome(self, bridge: Bridge) -> None:
        assert bridge.stats().calls_started == 0
        for _ in range(3):
            bridge.run(add, 1, 1)
        with pytest.raises(ValueError, match="raised on the bridge"):
            bridge.run(fail_deep)
        stats = bridge.stats()
        assert stats.running
        assert (stats.calls_started, stats.calls_succeeded, stats.calls_failed) == (4, 3, 1)
        assert stats.calls_in_flight == 0
        assert stats.name == bridge.name

    def test_stats_see_calls_in_flight(self, bridge: Bridge) -> None:
        recorder = Recorder()
        future = bridge.submit(recorder.sleep, 30)
        assert recorder.started.wait(WAIT)
        assert bridge.stats().calls_in_flight == 1
        future.cancel()
        assert recorder.cancelled.wait(WAIT)

    @pytest.mark.slow  # waits out timeouts: 2 s or more
    def test_a_blocked_loop_is_reported_with_the_blocking_stack(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="loopbridge")
        seen_lag: list[float] = []

        async def hidden_sync_call() -> None:
            time.sleep(2.0)  # noqa: ASYNC251 - the bug the watchdog exists for: blocking the loop

        with Bridge("blocked", block_threshold=0.3) as bridge:
            future = bridge.submit(hidden_sync_call)
            deadline = time.monotonic() + WAIT
            while bridge.stats().blocked_episodes == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            seen_lag.append(bridge.stats().loop_lag)
            future.result(timeout=WAIT)
            assert bridge.run(add, 1, 1) == 2  # and it keeps serving afterwards
            stats = bridge.stats()
        assert stats.blocked_episodes == 1
        assert seen_lag[0] > 0.3
        assert stats.max_loop_lag > 0.3
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "blocked" in r.getMessage()]
        assert len(warnings) == 1
        assert "hidden_sync_call" in warnings[0].getMessage()
        assert "time.sleep(2.0)" in warnings[0].getMessage()

    def test_the_watchdog_can_be_turned_off(self) -> None:
        with Bridge("unwatched", block_threshold=None) as bridge:
            bridge.run(add, 1, 1)
            assert not any(t.name == "loopbridge-unwatched-watchdog" for t in threading.enumerate())

    def test_the_watchdog_thread_stops_with_the_bridge(self) -> None:
        bridge = Bridge("watched")
        bridge.run(add, 1, 1)
        assert any(t.name == "loopbridge-watched-watchdog" for t in threading.enumerate())
        bridge.close()
        assert not any(t.name == "loopbridge-watched-watchdog" for t in threading.enumerate())
