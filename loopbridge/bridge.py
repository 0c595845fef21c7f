"""The Bridge: a daemon thread that owns a private event loop, and the one way work reaches it.

Sync code calls :meth:`Bridge.run` and blocks; async code on any other loop awaits :meth:`Bridge.arun`;
anything may :meth:`Bridge.submit` and hold a ``concurrent.futures.Future``. All three build a call and
hand it to the loop thread's single submit path (``loopbridge._loop``); they differ only in how the
caller waits for the outcome.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import inspect
import logging
import os
import sys
import threading
import time
import weakref
from asyncio import _get_running_loop
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

from ._blocking import call_on_running_loop
from ._call import (
    AsyncCall,
    BlockingCall,
    CancelReason,
    FutureCall,
    _raised_during_cancellation,
    describe,
    invoke,
)
from ._limits import call_timeout, seconds
from ._loop import (
    GRACE,
    STOP_MARGIN,
    ForkSafeLock,
    LoopThread,
    Resource,
    abandon,
    park_at_exit,
    renew_after_fork,
)
from .errors import BridgeClosedError, CallTimeoutError, ConfigurationError, DeadlockError
from .stats import BridgeStats

if sys.version_info >= (3, 11):
    from typing import Self, TypeVarTuple, Unpack
else:
    from typing_extensions import Self, TypeVarTuple, Unpack

__all__ = ["Bridge", "default_bridge"]

logger = logging.getLogger("loopbridge")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: The bridge's lifecycle, as CPython's ``asyncio.Runner`` keeps its own: ``created`` (no thread yet, and
#: again in a forked child), ``running`` (a loop thread takes calls), ``closing`` (close() is stopping it),
#: ``closed`` (for good: a closed bridge is never reopened).
_State = Literal["created", "running", "closing", "closed"]


class Bridge:
    """A daemon thread named ``loopbridge-<name>`` running a private asyncio event loop.

    The thread starts on first use (two threads racing the first call start exactly one) and runs
    until :meth:`close`, or until interpreter exit, where every bridge still open is closed
    gracefully. Use it as a context manager to close it at the end of a block.

    :param name: names the thread (``loopbridge-<name>``) and appears in messages.
    :param loop_factory: makes the bridge's event loop (default: ``asyncio.new_event_loop``).
    :param uvloop: run the bridge loop on uvloop: True requires it (the ``loopbridge[uvloop]`` extra),
        False never; None (the default) uses it when it is installed, unless ``LOOPBRIDGE_UVLOOP=0``
        is set (``LOOPBRIDGE_UVLOOP=1`` requires it). uvloop cuts the bridge's own cost per call.
    :param close_timeout: default for :meth:`close`: how long calls in flight may take to finish.
    :param block_threshold: seconds; when code on the bridge loop blocks it for longer (a synchronous
        call hidden in a coroutine), a watchdog thread logs a warning with the loop thread's stack.
        None turns the watchdog off.
    :param warn_blocking: seconds; when a blocking call (``db.fetch()``, ``bridge.run()``) made from code
        running in an event loop (an ``async def`` that meant ``await db.afetch()``) takes longer, a
        warning names the call site and the twin to await, once per call site. None turns it off; it is
        off in IPython kernels, whose cells run on the kernel's loop.
    """

    def __init__(
        self,
        name: str = "bridge",
        *,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
        uvloop: bool | None = None,
        close_timeout: float = 10.0,
        block_threshold: float | None = 1.0,
        warn_blocking: float | None = 0.1,
    ) -> None:
        if loop_factory is not None and uvloop:
            raise ConfigurationError("pass either loop_factory or uvloop=True, not both")
        close_seconds = seconds("close_timeout", close_timeout, allow_none=False)
        assert close_seconds is not None
        self._name = name
        self.warn_blocking = seconds("warn_blocking", warn_blocking)
        self._loop_factory = loop_factory or _loop_factory_for(uvloop)
        self._close_timeout = close_seconds
        self._block_threshold = seconds("block_threshold", block_threshold)
        self._state: _State = "created"
        # The loop thread while running or closing; None before the first start, and once closed.
        self._live: LoopThread | None = None
        self._closed = threading.Event()  # set once closed, for a close() waiting for another
        self._close_deadline = 0.0  # by when the close under way is done at the latest (time.monotonic())
        self._finalizer: weakref.finalize[..., Bridge] | None = None  # stops the thread if self is dropped
        self._lock = threading.Lock()  # guards the state's transitions
        _bridges.add(self)

    # -- properties ---------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def state(self) -> str:
        """``'created'`` (the thread starts on first use), ``'running'``, ``'closing'`` or ``'closed'``."""
        return self._state

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has begun; a closed bridge cannot be reopened."""
        return self._state in ("closing", "closed")

    @property
    def running(self) -> bool:
        """True while the thread is running and taking calls (it starts on first use)."""
        live = self._live
        return self._state == "running" and live is not None and live.accepting and live.pid == os.getpid()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The bridge's event loop (starting the thread if needed). Only for ``call_soon_threadsafe``
        and the like: never run it, close it, or await its futures from another loop."""
        return self._generation().loop

    @property
    def thread(self) -> threading.Thread | None:
        """The loop's thread, or None before first use."""
        live = self._live
        return live.thread if live is not None and live.pid == os.getpid() else None

    def stats(self) -> BridgeStats:
        """Counters and loop lag of the bridge's current thread (all zero before it starts)."""
        live = self._live
        if live is None or live.pid != os.getpid():
            return BridgeStats(self._name, False, 0, 0, 0, 0, 0.0, 0.0, 0)
        ledger, monitor = live.ledger, live.monitor
        return BridgeStats(
            name=self._name,
            running=live.accepting,
            calls_started=ledger.started,
            calls_succeeded=ledger.succeeded,
            calls_failed=ledger.failed,
            calls_in_flight=len(ledger.inflight),
            loop_lag=monitor.current_lag(),
            max_loop_lag=monitor.max_lag,
            blocked_episodes=monitor.blocked_episodes,
            calls_submitted=live.submitted,
        )

    def in_bridge_thread(self) -> bool:
        """True when called on the bridge's own thread (where blocking calls would deadlock), also while
        close() is stopping it."""
        live = self._live
        return live is not None and live.thread_id == threading.get_ident() and live.pid == os.getpid()

    # -- calls --------------------------------------------------------------------------------------

    @overload
    def run(self, fn: Awaitable[T], /, *, timeout: float | None = None) -> T: ...
    @overload
    def run(
        self, fn: Callable[[Unpack[Ts]], Awaitable[T]], /, *args: Unpack[Ts], timeout: float | None = None
    ) -> T: ...
    def run(self, fn: Any, /, *args: Any, timeout: float | None = None) -> Any:  # type: ignore[misc]  # mypy: overloads with TypeVarTuple
        """Run ``fn(*args)`` on the bridge loop and block until it returns; from sync code.

        *fn* is an async function (or any function returning an awaitable), called on the bridge loop.
        An awaitable that no loop owns yet, such as a coroutine object, may be passed instead, with no
        arguments. Whatever binds itself to the loop it is made on must be made on the bridge loop:
        pass the function, ``bridge.run(asyncpg.create_pool, dsn)``, never
        ``bridge.run(asyncpg.create_pool(dsn))``. Pass keyword arguments with ``functools.partial``.

        :param timeout: seconds; on expiry the work is cancelled on the bridge loop.
        :returns: what *fn* returned. Exceptions it raised are raised here unchanged.
        :raises CallTimeoutError: (a ``TimeoutError``) if *timeout* expired.
        :raises DeadlockError: if called on the bridge thread itself (await :meth:`arun` there).
        :raises BridgeClosedError: if the bridge is closed, or closed while the call ran.
        :raises TypeError: for something that cannot be run: not async, or an awaitable bound to another
            event loop (a future or task of that loop, an asyncpg pool made there). Nothing is queued.
        :raises KeyboardInterrupt: re-raised after cancelling the work when Ctrl-C interrupts the wait.
        """
        if _get_running_loop() is None:
            return self._run(fn, args, None, timeout, None)
        return call_on_running_loop(
            self.warn_blocking,
            sys._getframe(1),
            "Bridge.run()",
            "await bridge.arun(...)",
            lambda: self._run(fn, args, None, timeout, None),
        )

    @overload
    async def arun(self, fn: Awaitable[T], /, *, timeout: float | None = None) -> T: ...
    @overload
    async def arun(
        self, fn: Callable[[Unpack[Ts]], Awaitable[T]], /, *args: Unpack[Ts], timeout: float | None = None
    ) -> T: ...
    async def arun(self, fn: Any, /, *args: Any, timeout: float | None = None) -> Any:  # type: ignore[misc]  # mypy: overloads with TypeVarTuple
        """Run ``fn(*args)`` on the bridge loop and await the result; from async code on any loop.

        On the bridge loop itself it simply awaits. Cancelling the awaiting task cancels the work on
        the bridge loop. Same arguments, results and errors as :meth:`run`.
        """
        return await self._arun(fn, args, None, timeout, None)

    @overload
    def submit(self, fn: Awaitable[T], /, *, timeout: float | None = None) -> Future[T]: ...
    @overload
    def submit(
        self, fn: Callable[[Unpack[Ts]], Awaitable[T]], /, *args: Unpack[Ts], timeout: float | None = None
    ) -> Future[T]: ...
    def submit(self, fn: Any, /, *args: Any, timeout: float | None = None) -> Future[Any]:  # type: ignore[misc]  # mypy: overloads with TypeVarTuple
        """Start ``fn(*args)`` on the bridge loop and return a ``concurrent.futures.Future`` at once.

        Cancelling the future cancels the work. Never blocks, so it is safe on the bridge thread too
        (but waiting there for the future's result would deadlock).

        :raises BridgeClosedError: if the bridge is closed.
        """
        label, generation, timeout = self._prepare(fn, args, timeout, None, "Bridge.submit")
        call: FutureCall[Any] = FutureCall(fn, args if callable(fn) else None, None, timeout, label)
        generation.submit(call)
        return call.future

    def _prepare(
        self, fn: Any, args: tuple[Any, ...], timeout: float | None, label: str | None, default: str
    ) -> tuple[str, LoopThread, float | None]:
        """Check a call in the caller's thread (nothing is queued if it cannot work): its label, the live
        loop, and its timeout (None for none: ``inf`` is none too)."""
        label = _label(fn, label, default)
        _check_fn(fn, args, label)
        if timeout is not None:
            timeout = call_timeout(timeout, label)
        generation = self._generation()
        if not callable(fn):
            _check_loop(fn, generation.loop, label)
        return label, generation, timeout

    # The internal entry points below take keyword arguments for fn and a label for messages; the
    # Database facade and friends use them. They are the only two ways into the loop thread.

    def _run(
        self,
        fn: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        timeout: float | None,
        label: str | None,
    ) -> Any:
        label, generation, timeout = self._prepare(fn, args, timeout, label, "Bridge.run")
        if generation.thread_id == threading.get_ident():
            _close_if_coroutine(fn)
            raise DeadlockError(_deadlock_message(label, self._name))
        call: BlockingCall[Any] = BlockingCall(fn, args if callable(fn) else None, kwargs, timeout, label)
        generation.submit(call)
        try:
            # The bridge loop enforces the timeout; waiting a little longer here only bounds the
            # case where the loop itself is blocked and cannot.
            settled = call.wait(None if timeout is None else timeout + GRACE)
            if not settled:
                call.cancel_threadsafe(CancelReason.TIMEOUT)
                settled = call.wait(GRACE)
        except BaseException:  # Ctrl-C (or another signal's exception) while waiting
            call.cancel_threadsafe(CancelReason.CALLER)
            call.wait(GRACE)  # let the work unwind, so its connection is back in the pool
            raise
        if not settled:
            raise CallTimeoutError(_blocked_loop_message(label, timeout))
        return call.outcome()

    async def _arun(
        self,
        fn: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        timeout: float | None,
        label: str | None,
    ) -> Any:
        label, generation, timeout = self._prepare(fn, args, timeout, label, "Bridge.arun")
        caller_loop = asyncio.get_running_loop()
        if caller_loop is generation.loop:
            return await _run_here(fn, args if callable(fn) else None, kwargs, timeout, label)
        call: AsyncCall[Any] = AsyncCall(
            fn,
            args if callable(fn) else None,
            kwargs,
            timeout,
            label,
            caller_loop,
            generation.mailbox(caller_loop),
        )
        generation.submit(call)
        bound = None
        if timeout is not None:  # as in _run: bounds only a blocked bridge loop
            bound = caller_loop.call_later(timeout + GRACE, _wake, call)
        try:
            await call.waiter
        except asyncio.CancelledError:
            call.cancel_threadsafe(CancelReason.CALLER)
            if not call.delivered:
                # Wait (briefly) for the work to unwind so its connection is back in the pool before
                # our caller goes on; a second cancellation stops the wait.
                call.waiter = caller_loop.create_future()
                await asyncio.wait((call.waiter,), timeout=GRACE)
            raise
        finally:
            if bound is not None:
                bound.cancel()
        if not call.settled:  # the bound expired: the bridge loop did not even enforce the timeout
            call.cancel_threadsafe(CancelReason.TIMEOUT)
            call.waiter = caller_loop.create_future()
            await asyncio.wait((call.waiter,), timeout=GRACE)
            if not call.settled:
                raise CallTimeoutError(_blocked_loop_message(label, timeout))
        return call.outcome()

    # -- lifecycle ----------------------------------------------------------------------------------

    def _generation(self) -> LoopThread:
        """The live loop thread, started on first use. The hot path is three attribute reads."""
        live = self._live
        if self._state == "running" and live is not None and live.pid == os.getpid():
            return live
        return self._start()

    def _start(self) -> LoopThread:
        with self._lock:
            live = self._live
            if live is not None and live.pid != os.getpid():  # forked without os.fork's hooks
                self._after_fork()
            if self._state == "running":
                assert self._live is not None
                return self._live
            if self._state == "created":
                install_process_hooks()
                live = LoopThread(self._name, self._loop_factory, self._block_threshold)
                live.start()
                self._live, self._state = live, "running"
                # Dropped without close(): the thread must not run on forever (see _stop_dropped).
                self._finalizer = weakref.finalize(self, _stop_dropped, live, self._close_timeout)
                self._finalizer.atexit = False  # at exit, _close_all_at_exit closes what is left
                return live
        if _exiting and threading.current_thread() is not threading.main_thread():
            park_at_exit()  # a daemon thread calling in while the interpreter exits
        raise BridgeClosedError(
            f"the bridge {self._name!r} is closed; create a new Bridge (or Database), or use "
            "loopbridge.default_bridge(), which replaces a closed default bridge"
        )

    def _refuse_blocking_call(self, label: str, instead: str | None = None) -> None:
        """Raise :class:`DeadlockError` if called on the bridge thread, where *label* (a blocking call)
        would wait forever; for callers that must check before they change any state, and for waits
        that do not cross (a stream's next batch, a subscription's next item). *instead*: what to do
        there (default: await the async twin)."""
        if self.in_bridge_thread():
            raise DeadlockError(_deadlock_message(label, self._name, instead))

    def _register(self, resource: Resource) -> None:
        """Close *resource* on the bridge loop when the bridge closes, or when it becomes unreachable
        (see ``loopbridge._loop.Resources``). Call on the bridge loop.

        Registers with the generation running this loop, also while close() is stopping it: a pool
        first opened by a call racing close() is closed with the rest, never left open on a dead loop.
        """
        live = self._live
        if live is not None:
            live.resources.add(resource)

    def _unregister(self, resource: Resource) -> None:
        live = self._live
        if live is not None:
            live.resources.remove(resource)

    def close(self, timeout: float | None = None) -> None:
        """Close the bridge: let calls in flight finish (up to *timeout* seconds), cancel the rest,
        close every resource registered on it (pools) on the bridge loop, stop the loop and join the
        thread. Safe to call twice: a close() made while another is stopping the bridge returns once
        that one is done, and one made later returns at once. Calls made afterwards raise
        :class:`BridgeClosedError`.

        :raises DeadlockError: if called on the bridge thread (it cannot join itself).
        """
        self._close(timeout, at_exit=False)

    def _close(self, timeout: float | None, *, at_exit: bool) -> None:
        if self.in_bridge_thread():
            raise DeadlockError(
                f"Bridge.close() was called on the bridge thread of {self._name!r}, which it would have "
                "to join: close the bridge from another thread, or await bridge.aclose() elsewhere"
            )
        timeout = self._close_timeout if timeout is None else timeout
        with self._lock:
            state, live = self._state, self._live
            if state == "running" and live is not None:
                self._state = "closing"
                self._close_deadline = time.monotonic() + timeout + STOP_MARGIN
            elif state == "created":
                self._state = "closed"
                self._closed.set()
        if state == "closing":
            # Another close() is stopping the bridge: "closed" means the same to every caller (nothing
            # runs on it any more), so wait for that one, as long as it can take.
            self._closed.wait(max(0.0, self._close_deadline - time.monotonic()))
        if state != "running" or live is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
        try:
            if live.pid != os.getpid():  # forked without os.fork's hooks: not ours to stop
                abandon(live)
            else:
                live.stop(timeout, at_exit=at_exit)
        finally:
            with self._lock:
                self._state, self._live = "closed", None
            self._closed.set()

    async def aclose(self, timeout: float | None = None) -> None:
        """:meth:`close` for async code: runs the blocking close in a worker thread."""
        await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self._state
        thread = self.thread
        where = f" thread={thread.name!r}" if thread is not None else ""
        return f"<Bridge {self._name!r} {state}{where}>"

    def _after_fork(self) -> None:
        # In the child: the loop thread does not exist here. Abandon its generation untouched; the
        # next call starts a fresh thread, loop and pools. A close() the parent was in the middle of
        # does not go on here: the bridge is closed in the child.
        self._lock = threading.Lock()  # another thread may have held it at fork time
        self._closed = threading.Event()
        live, self._live = self._live, None
        if live is not None:
            abandon(live)
        if self._state == "running":
            self._state = "created"
        elif self._state == "closing":
            self._state = "closed"
        if self._state == "closed":
            self._closed.set()


# -- helpers ---------------------------------------------------------------------------------------


async def _run_here(
    fn: Any, args: tuple[Any, ...] | None, kwargs: dict[str, Any] | None, timeout: float | None, label: str
) -> Any:
    """arun() on the bridge loop itself: no crossing, just await (with the same timeout semantics)."""
    awaitable = fn if args is None else invoke(label, fn, args, kwargs)
    if timeout is None:
        return await awaitable
    # The work runs in this very task, cancelled when the timeout expires: unlike wait_for(), no inner
    # task whose late error (raised while it unwinds the cancellation) nobody would retrieve.
    task = asyncio.current_task()
    assert task is not None
    expired: list[bool] = []

    def expire() -> None:
        expired.append(True)
        task.cancel()

    timer = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        return await awaitable
    except BaseException as exc:
        if not expired or not _raised_during_cancellation(exc):
            raise
        uncancel = getattr(task, "uncancel", None)  # 3.11+: our cancellation is spent, as with timeout()
        if uncancel is not None:
            uncancel()
        raise CallTimeoutError(f"{label} did not finish within {timeout:g} s; it was cancelled") from (
            None if isinstance(exc, asyncio.CancelledError) else exc
        )
    finally:
        timer.cancel()


def _wake(call: AsyncCall[Any]) -> None:
    if not call.waiter.done():
        call.waiter.set_result(None)


def _blocked_loop_message(label: str, timeout: float | None) -> str:
    return (
        f"{label} did not finish within {timeout:g} s and the bridge loop did not respond to its "
        "cancellation: something is blocking the bridge loop (synchronous code in a coroutine?)"
    )


def _check_fn(fn: object, args: tuple[Any, ...], label: str) -> None:
    """Refuse, in the caller's thread, what can never work."""
    if callable(fn):
        return
    if not inspect.isawaitable(fn):
        raise TypeError(
            f"{label} needs an async function (or an awaitable), not {type(fn).__name__} {fn!r:.60}"
        )
    if inspect.iscoroutine(fn) and inspect.getcoroutinestate(fn) != inspect.CORO_CREATED:
        raise RuntimeError(
            f"{label} got a coroutine object that was already awaited or started; a coroutine runs once. "
            f"Pass the async function and its arguments instead: {label.split('(')[0]}(fetch_rows, 42), "
            "not (fetch_rows(42))"
        )
    if args:
        _close_if_coroutine(fn)
        raise TypeError(
            f"{label} got an awaitable ({describe(fn)}) and extra arguments {args!r:.60}; pass the "
            f"function and its arguments separately: incorrect: {label.split('(')[0]}(fetch_rows(), 42); "
            f"correct: {label.split('(')[0]}(fetch_rows, 42)"
        )


def _check_loop(awaitable: object, bridge_loop: asyncio.AbstractEventLoop, label: str) -> None:
    """Refuse an awaitable that belongs to another event loop: awaited on the bridge loop it fails deep
    inside ("Future attached to a different loop", or a hang), far from the mistake."""
    if asyncio.isfuture(awaitable):
        loop: object = awaitable.get_loop()
    else:  # an asyncpg Pool not yet awaited keeps the loop it was made on, as others do, in _loop
        loop = getattr(awaitable, "_loop", None)
    if not isinstance(loop, asyncio.AbstractEventLoop) or loop is bridge_loop:
        return
    name = label.split("(")[0]
    raise TypeError(
        f"{label} got an awaitable bound to another event loop than the bridge's ({loop!r}): it was made "
        "in the caller's thread, and only that loop can await it. Pass the function that makes it, with "
        f"its arguments, so that it is made on the bridge loop: incorrect: "
        f"{name}(asyncpg.create_pool(dsn)); correct: {name}(asyncpg.create_pool, dsn)"
    )


def _close_if_coroutine(fn: object) -> None:
    if inspect.iscoroutine(fn):
        fn.close()


def _label(fn: object, label: str | None, default: str) -> str:
    return label if label is not None else f"{default}({describe(fn)})"


def _deadlock_message(label: str, name: str, instead: str | None = None) -> str:
    if instead is None:
        instead = (
            "await the async twin instead (incorrect: db.fetch(...); correct: await db.afetch(...); for "
            "Bridge.run: await bridge.arun(...))"
        )
    return (
        f"{label} is a blocking call, made on the bridge thread of {name!r}: it would wait forever for "
        f"the loop that is running it. On the bridge loop, {instead}"
    )


def _loop_factory_for(uvloop: bool | None) -> Callable[[], asyncio.AbstractEventLoop]:
    """The bridge loop's factory: uvloop where asked for, or by default where it is installed."""
    if uvloop is None:
        setting = os.environ.get("LOOPBRIDGE_UVLOOP", "")
        if setting == "0":
            return asyncio.new_event_loop
        if setting == "":
            try:
                import uvloop as module
            except ImportError:
                return asyncio.new_event_loop
            factory: Callable[[], asyncio.AbstractEventLoop] = module.new_event_loop
            return factory
        uvloop = True
    return _uvloop_factory() if uvloop else asyncio.new_event_loop


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        raise ConfigurationError("uvloop=True needs uvloop: pip install 'loopbridge[uvloop]'") from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


# -- the process-wide default bridge, exit and fork ------------------------------------------------

_bridges: weakref.WeakSet[Bridge] = weakref.WeakSet()
_default: Bridge | None = None
_default_lock = ForkSafeLock()
_exiting = False
#: At interpreter exit, calls still in flight get this long to finish before they are cancelled.
EXIT_TIMEOUT = 1.0


def default_bridge() -> Bridge:
    """The process-wide bridge (thread ``loopbridge-default``), shared by every Database that is not
    given a bridge of its own. It is closed gracefully at interpreter exit. If it was closed
    explicitly, the next call makes a new one.

    It runs on uvloop where uvloop is installed (``LOOPBRIDGE_UVLOOP=0`` turns that off).
    """
    global _default
    bridge = _default
    if bridge is not None and not bridge.closed:
        return bridge
    with _default_lock:
        if _default is None or (_default.closed and not _exiting):
            _default = Bridge("default")
        return _default


def _close_all_at_exit() -> None:
    # Runs after the interpreter has joined non-daemon threads, so nobody legitimate still needs the
    # bridges; closing them gracefully closes the pools (the server sees clean disconnects) and
    # leaves no pending task to complain about.
    global _exiting
    _exiting = True
    for bridge in list(_bridges):
        try:
            bridge._close(min(bridge._close_timeout, EXIT_TIMEOUT), at_exit=True)
        except Exception:  # pragma: no cover - close() logs its own problems
            logger.exception("error while closing %r at exit", bridge)
    # Bridges dropped without close() are stopping by themselves: let them finish closing their pools.
    deadline = time.monotonic() + EXIT_TIMEOUT + STOP_MARGIN
    for generation in list(_dropped):
        generation.thread.join(max(0.0, deadline - time.monotonic()))


#: Generations whose Bridge was garbage collected while they ran, until their threads end.
_dropped: weakref.WeakSet[LoopThread] = weakref.WeakSet()
#: Generations to stop once the garbage collection in progress is over (see _stop_dropped).
_to_stop: list[tuple[LoopThread, float]] = []
_collecting = False


def _stop_dropped(generation: LoopThread, timeout: float) -> None:
    """A Bridge was garbage collected without close(): stop its thread, without blocking whoever
    collected it (any thread, the bridge's own included).

    During a collection, not before it is over: the collector runs this (a weakref callback) before the
    finalizers of the same garbage, among them those of the Databases on this bridge, which hand
    them to the loop to be closed (``loopbridge._loop.Resources``). Stopping at once could seal the
    loop's shutdown before they arrive, leaving their pools open.
    """
    if generation.pid != os.getpid() or not generation.accepting:
        return
    _dropped.add(generation)
    if _collecting:
        _to_stop.append((generation, timeout))
    else:
        generation.stop_soon(timeout)


def _on_collection(phase: str, info: dict[str, int]) -> None:
    global _collecting
    _collecting = phase == "start"
    while not _collecting and _to_stop:
        generation, timeout = _to_stop.pop()
        generation.stop_soon(timeout)


def _after_fork_in_child() -> None:
    renew_after_fork()
    for bridge in list(_bridges):
        bridge._after_fork()


_hooks_installed = False
_hooks_lock = threading.Lock()


def install_process_hooks() -> None:
    """Close the bridges at exit, stop dropped ones after a collection, reset them in a forked child.

    Installed when the first bridge starts, never at import: importing loopbridge changes nothing in the
    process. Once per process (a forked child inherits them).
    """
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        atexit.register(_close_all_at_exit)
        gc.callbacks.append(_on_collection)
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hooks_installed = True
