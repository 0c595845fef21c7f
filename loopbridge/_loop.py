"""The bridge's daemon thread and its private event loop.

A :class:`LoopThread` is one generation of a bridge: the thread, its loop, the queue of calls waiting to
start, the calls in flight and the resources (pools) that live on the loop. A ``Bridge`` owns at most one
live generation; after ``os.fork()`` the child abandons the parent's generation (see :func:`abandon`)
and starts a fresh one on first use. A generation whose ``Bridge`` was garbage collected stops itself
(:meth:`LoopThread.stop_soon`), and a resource that nothing but the bridge holds any more is closed
(:class:`Resources`): dropping either never leaks a thread or a pool.

Every call enters through :meth:`LoopThread.submit` — the one crossing point. A burst of calls costs one
wakeup of the loop: callers append to a deque, and only the first caller after a drain schedules
``_drain`` with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import os
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Final, Literal, NoReturn, Protocol

from ._call import Call, CancelReason, Ledger, Mailbox
from .errors import BridgeClosedError

__all__ = [
    "GRACE",
    "STOP_MARGIN",
    "ClosedWhenUnreachable",
    "ForkSafeLock",
    "LoopThread",
    "Resource",
    "abandon",
    "bridge_threads",
    "closing_log_level",
    "park_at_exit",
    "renew_after_fork",
    "stranded_log_level",
]

logger = logging.getLogger("loopbridge")

#: How long close() waits for cancelled work and stray tasks to unwind, beyond its own timeout.
GRACE = 1.0
#: How much longer than its timeout :meth:`LoopThread.stop` takes at most: the shutdown's own bound,
#: then joining the watchdog and the loop thread.
STOP_MARGIN = 5 * GRACE

#: Set in the shutdown task once no call runs and none can start any more. A connection still leased
#: then is held across calls (an open transaction, a row stream) by a caller the bridge will never
#: serve again, so nothing can give it back, and a pool that closes need not wait for it. The value is
#: the level at which ending such connections is logged: a warning on close(), which cut the holder's
#: work short; debug at interpreter exit, where the holders are daemon threads the interpreter stops.
stranded_log_level: ContextVar[int | None] = ContextVar("loopbridge_stranded_log_level", default=None)

#: Set in the shutdown task: the level at which closing a resource reports what it had to cut short
#: (connections still in use, or not answering their close). Debug at interpreter exit, where nobody can
#: act on it any more and the exit must stay quiet; a warning otherwise (the default).
closing_log_level: ContextVar[int] = ContextVar("loopbridge_closing_log_level", default=logging.WARNING)


#: The threads running a bridge loop now (their idents): what runs there is loopbridge's to report.
bridge_threads: set[int] = set()


class Resource(Protocol):
    """Something that lives on the bridge loop and must be closed there (a Database's pool)."""

    async def _aclose_on_bridge(self, timeout: float) -> None:
        """Close gracefully within *timeout* seconds, then forcibly. Runs on the bridge loop."""

    def _forget_after_fork(self) -> list[object]:
        """In a forked child: drop every reference to loop-bound state without touching it.

        Returns the objects dropped, which the caller keeps alive forever (see :func:`abandon`).
        """


class Resources:
    """The resources registered on one generation, held so that one nobody else holds is still closed.

    The registry holds each resource weakly, so that the bridge never keeps an unused pool open (a
    notebook that re-runs ``db = Database(dsn)`` drops the previous Database each time). A resource
    that becomes unreachable is finalized (:class:`ClosedWhenUnreachable`'s ``__del__``, at once when
    its last reference goes, or by the cyclic collector) while still intact, and hands itself to the
    loop, where it is closed gracefully (a log line at info level says so); the loop's reference keeps
    it alive until then. A resource that a call in flight, an open transaction or stream, or the caller
    still refers to is reachable, and stays open. Closing the bridge closes every live one.
    """

    #: The attribute on a resource that says which registry to hand it to when it becomes unreachable.
    REGISTRY = "_loopbridge_registry"
    #: How long the close of an unreachable resource may let work on it finish.
    CLOSE_TIMEOUT = 10.0

    def __init__(self, generation: LoopThread) -> None:
        self._generation = generation
        # By id(), in the order registered: weak references, or a _Strong one for a resource that
        # cannot close itself when unreachable (not a ClosedWhenUnreachable).
        self._refs: dict[int, Callable[[], Resource | None]] = {}
        self.closing: set[asyncio.Task[None]] = set()  # unreachable resources being closed
        self.sealed = False  # the shutdown is past closing resources: no new close may start

    def add(self, resource: Resource) -> None:
        ref = self._refs.get(id(resource))
        if ref is not None and ref() is resource:
            return
        self._prune()
        if isinstance(resource, ClosedWhenUnreachable):
            self._refs[id(resource)] = weakref.ref(resource)
            resource.__dict__[self.REGISTRY] = self
        else:  # held strongly, closed with the bridge
            self._refs[id(resource)] = _Strong(resource)

    def remove(self, resource: Resource) -> None:
        ref = self._refs.get(id(resource))
        if ref is not None and ref() is resource:
            del self._refs[id(resource)]
            if isinstance(resource, ClosedWhenUnreachable):
                resource.__dict__.pop(self.REGISTRY, None)  # closed normally: nothing left to do

    def __contains__(self, resource: object) -> bool:
        ref = self._refs.get(id(resource))
        return ref is not None and ref() is resource

    def live(self) -> list[Resource]:
        """The resources still registered and alive, in the order registered."""
        return [resource for resource in (ref() for ref in list(self._refs.values())) if resource is not None]

    def _prune(self) -> None:
        # Entries of resources that went away (handed to the loop, or collected): dead weak references.
        for key in [key for key, ref in self._refs.items() if ref() is None]:
            del self._refs[key]

    def clear(self) -> None:
        for resource in self.live():
            self.remove(resource)
        self._refs.clear()

    def close_unreachable(self, resource: Resource) -> None:
        """From a resource's ``__del__``, on any thread: close *resource* on the loop, without waiting."""
        ref = self._refs.get(id(resource))
        if ref is not None and ref() is resource:
            # Out of the registry before it is resurrected: the bridge's close must not close it too.
            del self._refs[id(resource)]
        generation = self._generation
        if generation.pid != os.getpid():  # a forked child: the parent's pool is not ours to close
            _immortalize(resource)
            return
        try:
            generation.loop.call_soon_threadsafe(self._start_closing, resource)
        except RuntimeError:  # the loop is closed: the bridge's close closed the resource
            pass

    def _start_closing(self, resource: Resource) -> None:
        if self.sealed:
            # Found unreachable in the last moments of the bridge's shutdown, too late for a task to
            # run: its connections end with the process (or when the server notices). Never freed, so
            # that nothing of it is torn down on a loop that no longer runs.
            logger.debug(
                "%s was garbage collected as its bridge stopped; left to the process's end", repr(resource)
            )
            _immortalize(resource)
            return
        # The log record gets the repr, not the resource: a handler that keeps records (pytest's does)
        # must not keep the resource, and with it its bridge, alive.
        logger.info("%s was garbage collected while open; closing it on the bridge loop", repr(resource))
        task = self._generation.loop.create_task(self._close(resource))
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)

    async def _close(self, resource: Resource) -> None:
        try:
            await resource._aclose_on_bridge(self.CLOSE_TIMEOUT)
        except Exception:
            logger.exception("error while closing %s, which was garbage collected while open", repr(resource))


class ClosedWhenUnreachable:
    """A resource that closes itself on its bridge loop once nothing refers to it any more.

    ``__del__`` runs when the last reference goes (or when the cyclic collector frees a cycle it is
    part of, PEP 442) with the object still intact; handing itself to the loop resurrects it until its
    close is done. ``__del__`` runs once per object, so the second end of its life is a plain one.
    """

    __slots__ = ()

    def __del__(self) -> None:
        registry = self.__dict__.pop(Resources.REGISTRY, None)
        if registry is not None:
            try:
                registry.close_unreachable(self)
            except Exception:  # pragma: no cover - e.g. during interpreter finalization
                pass


class _Strong:
    """A reference that never dies, in place of a ``weakref.ref``."""

    __slots__ = ("obj",)

    def __init__(self, obj: Resource) -> None:
        self.obj = obj

    def __call__(self) -> Resource:
        return self.obj


#: A generation's state. ``running``: it takes calls. ``stopping``: close() (or, for a dropped Bridge,
#: the loop itself) is shutting it down; calls are refused with BridgeClosedError. ``exiting``: the same at
#: interpreter exit, where the daemon threads still calling are parked rather than woken with an error.
#: ``abandoned``: a forked child's copy, never touched again (see :func:`abandon`).
GenerationState = Literal["running", "stopping", "exiting", "abandoned"]
RUNNING: Final = "running"


class LoopThread:
    """One thread running one event loop, taking calls from any other thread."""

    def __init__(
        self,
        name: str,
        loop_factory: Callable[[], asyncio.AbstractEventLoop],
        block_threshold: float | None = None,
    ) -> None:
        self.name = name
        self.pid = os.getpid()
        self.state: GenerationState = RUNNING
        self.ledger = Ledger()
        self.inflight = self.ledger.inflight
        self.resources = Resources(self)
        self.monitor = LagMonitor(name, block_threshold)
        self.thread_id = -1
        self.loop: asyncio.AbstractEventLoop
        self.thread: threading.Thread
        self._loop_factory = loop_factory
        self._queue: deque[Call[Any]] = deque()
        self._wakeup_pending = False
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = (
            weakref.WeakKeyDictionary()
        )

    def start(self) -> None:
        """Start the thread and return once its loop exists. Raises what the loop factory raised."""
        ready = threading.Event()
        failure: list[BaseException] = []
        self.thread = threading.Thread(
            target=self._main, args=(ready, failure), name=f"loopbridge-{self.name}", daemon=True
        )
        self.thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        self.monitor.start(self.loop, self.thread_id)

    def _main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        try:
            loop = self._loop_factory()
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            return
        self.loop = loop
        self.thread_id = threading.get_ident()
        loop.set_exception_handler(_exception_handler)
        asyncio.set_event_loop(loop)
        bridge_threads.add(self.thread_id)
        ready.set()
        try:
            loop.run_forever()
        finally:
            asyncio.set_event_loop(None)
            loop.close()
            bridge_threads.discard(self.thread_id)

    @property
    def accepting(self) -> bool:
        """Whether it still takes calls."""
        return self.state == RUNNING

    @property
    def at_exit(self) -> bool:
        """Whether it stops because the interpreter exits."""
        return self.state == "exiting"

    @property
    def submitted(self) -> int:
        """Calls handed to :meth:`submit` and taken: started on the loop, or queued to start.

        Derived rather than counted, so that the hot path has no counter to update from many threads
        (``+=`` on an attribute is not atomic across threads).
        """
        return self.ledger.started + len(self._queue)

    # -- the crossing point -------------------------------------------------------------------------

    def submit(self, call: Call[Any]) -> None:
        """Queue *call* to start on the loop; from any thread.

        :raises BridgeClosedError: if the loop no longer takes work (the call was not queued).
        """
        call.loop = self.loop
        self._queue.append(call)
        if self.state != RUNNING:
            self._withdraw(call)
        elif not self._wakeup_pending:
            self._wakeup_pending = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed
                self._withdraw(call)

    def mailbox(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        """The way back to *loop* for calls made from it; from *loop*'s own thread."""
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes.setdefault(loop, Mailbox(loop))
        return mailbox

    def _withdraw(self, call: Call[Any]) -> None:
        # close() began between our check and our append. Either its final sweep of the queue takes
        # the call (and settles it), or we take it back here: exactly one of the two succeeds.
        try:
            self._queue.remove(call)
        except ValueError:
            return
        call._close_unawaited()
        if self.at_exit and threading.current_thread() is not threading.main_thread():
            park_at_exit()
        raise BridgeClosedError(f"the bridge {self.name!r} is closing; {call.label} was not run")

    def _drain(self) -> None:
        self._wakeup_pending = False  # before popping: a call appended from now on schedules a new drain
        queue = self._queue
        loop = self.loop
        ledger = self.ledger
        while queue:
            try:
                call = queue.popleft()
            except IndexError:  # withdrawn by its caller meanwhile
                break
            if self.state == RUNNING:
                call.start(loop, ledger)
            else:
                self._refuse(call)

    def _refuse(self, call: Call[Any]) -> None:
        """Settle a call that will never start: BridgeClosedError, or nothing at all at exit."""
        if self.at_exit:
            call.abandon()
            _park(call)
        else:
            call.reject(BridgeClosedError(f"the bridge {self.name!r} closed before {call.label} started"))

    # -- shutdown -----------------------------------------------------------------------------------

    def stop(self, timeout: float, *, at_exit: bool = False) -> None:
        """Finish or cancel every call, close the resources on the loop, stop it and join the thread.

        Called from any thread but the loop's own. *at_exit*: the interpreter is exiting. Python has
        joined every non-daemon thread by then, so the callers still waiting are daemon threads, which
        the interpreter is about to stop where they stand: their calls are cancelled on the loop (the
        server ends their work) but they are not woken with an error that would only print a
        traceback ("Exception in thread ...") on the way out.
        """
        self.state = "exiting" if at_exit else "stopping"
        try:
            shutdown = asyncio.run_coroutine_threadsafe(self._shutdown(timeout), self.loop)
        except RuntimeError:  # the loop is already closed
            pass
        else:
            try:
                shutdown.result(timeout + 3 * GRACE)
            except concurrent.futures.TimeoutError:
                logger.warning(
                    "bridge %r: shutdown did not finish within %.1f s; the loop may be blocked by "
                    "synchronous code. Abandoning it.",
                    self.name,
                    timeout + 3 * GRACE,
                )
            except Exception:
                logger.exception("bridge %r: error while shutting down", self.name)
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:
                pass
        self.monitor.stop()
        self.thread.join(GRACE)
        if self.thread.is_alive():
            logger.warning("bridge %r: thread %s did not stop; abandoning it", self.name, self.thread.name)
        # Calls that slipped into the queue after the loop's last drain.
        while self._queue:
            try:
                call = self._queue.popleft()
            except IndexError:
                break
            self._refuse(call)

    async def _shutdown(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        closing_log_level.set(logging.DEBUG if self.at_exit else logging.WARNING)

        def left() -> float:
            return max(0.0, deadline - loop.time())

        # A graceful close loses nothing: calls already running may finish within the timeout...
        running = self._running_tasks()
        if running:
            await asyncio.wait(running, timeout=left())
        # ... and whatever is still running then is cancelled; its caller gets BridgeClosedError.
        reason = CancelReason.EXIT if self.at_exit else CancelReason.CLOSE
        for call in list(self.inflight):
            if self.at_exit:
                _park(call)
            call.cancel(reason)
        running = self._running_tasks()
        if running:
            await asyncio.wait(running, timeout=max(left(), GRACE))
        if not self._running_tasks():  # this task's context only: what it awaits below sees it
            stranded_log_level.set(logging.DEBUG if self.at_exit else logging.WARNING)

        # Pools close on the loop that owns them, never anywhere else.
        for resource in reversed(self.resources.live()):
            try:
                await resource._aclose_on_bridge(max(left(), GRACE))
            except Exception:
                logger.exception("bridge %r: error while closing %r", self.name, resource)
        self.resources.clear()
        while self.resources.closing:  # resources found unreachable, being closed (more may come)
            done, _ = await asyncio.wait(set(self.resources.closing), timeout=max(left(), GRACE))
            if not done:
                break
        self.resources.sealed = True

        # Tasks that the calls started and left behind.
        current = asyncio.current_task()
        others = [task for task in asyncio.all_tasks() if task is not current]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=GRACE)
        for task in others:
            if not task.done():
                logger.warning("bridge %r: task %r ignored cancellation; abandoning it", self.name, task)
        await loop.shutdown_asyncgens()
        try:
            await asyncio.wait_for(loop.shutdown_default_executor(), GRACE)
        except (asyncio.TimeoutError, TimeoutError):
            logger.warning("bridge %r: default executor threads still busy; abandoning them", self.name)

    def _running_tasks(self) -> set[asyncio.Task[None]]:
        return {call.task for call in self.inflight if call.task is not None}

    def stop_soon(self, timeout: float) -> None:
        """Begin stopping without waiting for anything; from any thread, the loop's own included.

        For a generation whose ``Bridge`` was garbage collected (the collecting thread may be any, and
        must not block): the loop shuts down as :meth:`stop` would have it (calls in flight may finish
        within *timeout*, resources are closed), then stops itself, and the thread ends.
        """
        if self.state != RUNNING or self.pid != os.getpid():
            return
        self.state = "stopping"
        self.monitor.stop(join=False)
        try:
            self.loop.call_soon_threadsafe(self._begin_stopping_itself, timeout)
        except RuntimeError:  # the loop is closed already
            pass

    def _begin_stopping_itself(self, timeout: float) -> None:
        self._stopping_itself = self.loop.create_task(self._stop_itself(timeout))

    async def _stop_itself(self, timeout: float) -> None:
        try:
            await self._shutdown(timeout)
        finally:
            self.loop.stop()
            logger.info("bridge %r was garbage collected without close(); it has shut down", self.name)


class LagMonitor:
    """How late the bridge loop runs its callbacks, and a watchdog for a loop that is blocked.

    A tick scheduled on the loop every *interval* seconds measures how late it runs (the loop lag). A
    watchdog thread, which needs no loop, checks that the ticks keep coming: when none came for longer
    than *block_threshold* seconds, code on the loop is blocking it (a synchronous call hidden in a
    coroutine), and the watchdog logs a warning with the loop thread's current stack, once per episode.
    """

    def __init__(self, name: str, block_threshold: float | None) -> None:
        self.name = name
        self.block_threshold = block_threshold
        self.interval = min(0.25, block_threshold / 4) if block_threshold else 0.25
        self.lag = 0.0
        self.max_lag = 0.0
        self.blocked_episodes = 0
        self._last_tick = time.monotonic()
        self._expected = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = threading.Event()
        self._watchdog: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop, thread_id: int) -> None:
        self._loop = loop
        self._last_tick = time.monotonic()
        self._expected = time.monotonic() + self.interval
        loop.call_soon_threadsafe(self._schedule)
        if self.block_threshold is not None:
            self._watchdog = threading.Thread(
                target=self._watch, args=(thread_id,), name=f"loopbridge-{self.name}-watchdog", daemon=True
            )
            self._watchdog.start()

    def stop(self, *, join: bool = True) -> None:
        self._stopped.set()
        if join and self._watchdog is not None:
            self._watchdog.join(GRACE)

    def _schedule(self) -> None:
        assert self._loop is not None
        self._expected = time.monotonic() + self.interval
        self._loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        self.lag = max(0.0, now - self._expected)
        self.max_lag = max(self.max_lag, self.lag)
        self._last_tick = now
        if not self._stopped.is_set():
            self._schedule()

    def current_lag(self) -> float:
        """The loop's lag now: the last measured one, or how long the next tick is overdue."""
        if self._stopped.is_set():
            return 0.0
        overdue = time.monotonic() - self._expected
        return max(self.lag, overdue)

    def _watch(self, thread_id: int) -> None:
        assert self.block_threshold is not None
        blocked_since: float | None = None
        while not self._stopped.wait(self.block_threshold / 2):
            overdue = time.monotonic() - self._expected
            if overdue > self.block_threshold and blocked_since is None:
                blocked_since = self._expected
                self.blocked_episodes += 1
                frame = sys._current_frames().get(thread_id)
                stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)\n"
                logger.warning(
                    "bridge %r: the event loop has been blocked for %.2f s (threshold %.2f s); code running "
                    "on it is not yielding: a synchronous call in a coroutine? Its thread is at:\n%s",
                    self.name,
                    overdue,
                    self.block_threshold,
                    stack.rstrip(),
                )
            elif blocked_since is not None and overdue <= self.block_threshold:
                logger.info(
                    "bridge %r: the event loop runs again after being blocked for %.2f s",
                    self.name,
                    self._last_tick - blocked_since,
                )
                blocked_since = None


def _park(call: Call[Any]) -> None:
    # A call cut off at exit keeps what its caller waits on (an asyncio future, and through it the
    # caller's pending task) alive for good: freed while the interpreter finalizes, that task would
    # print "Task was destroyed but it is pending!".
    _abandoned.append(call)
    _immortalize(call)


def park_at_exit() -> NoReturn:
    """Keep a daemon thread that calls in during interpreter exit waiting until the process ends.

    The interpreter stops every daemon thread at exit anyway; an error raised into it now would
    only print a traceback on the way out.
    """
    threading.Event().wait()
    raise AssertionError("unreachable")  # pragma: no cover


def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The bridge loop's handler for errors nobody awaited: asyncio's default, minus known asyncpg noise.

    When asyncpg cancels a running query it opens a second connection to send the CancelRequest; if the
    query's connection is closed meanwhile (its backend terminated, the server restarting), asyncpg
    cancels that side task, and the future of its SSL negotiation may already hold "unexpected
    connection_lost() call", which then nobody retrieves. The cancel request no longer mattered: the
    query's connection is gone. Found by the stress suite; logged at debug level instead of as an error.
    """
    exception = context.get("exception")
    if (
        isinstance(exception, ConnectionError)
        and exception.args == ("unexpected connection_lost() call",)
        and context.get("message") == "Future exception was never retrieved"
    ):
        logger.debug("asyncpg: a cancel request's connection was lost after its query's: %r", exception)
        return
    loop.default_exception_handler(context)


class ForkSafeLock:
    """A ``threading.Lock`` for module-level state that threads other than a forking one take (making
    or closing a Database, say), renewed in every child forked once a bridge has started.

    The child has only the forking thread, so a lock another thread held at fork time would never be
    released there. The bridges' own fork hook renews these (:func:`renew_after_fork`, called from
    ``loopbridge.bridge``): making one registers no hook of its own, so importing changes nothing.
    """

    __slots__ = ("__weakref__", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _fork_safe_locks.add(self)

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()

    def _renew(self) -> None:
        self._lock = threading.Lock()


_fork_safe_locks: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()


def renew_after_fork() -> None:
    """In a forked child: every :class:`ForkSafeLock` a new, free lock."""
    for lock in list(_fork_safe_locks):
        lock._renew()


# Objects a forked child inherited and must never touch again. See abandon().
_abandoned: list[object] = []


def abandon(generation: LoopThread) -> None:
    """In a forked child, give up the parent's loop, pools and connections without touching them.

    The child has a copy of the parent's objects but not the parent's loop thread. Everything those
    objects could do would hurt the parent: closing a connection sends Terminate and ends the
    parent's backend, even removing a socket from the copied epoll set edits the parent's epoll
    instance (a forked epoll fd is shared). So nothing may run on them, not even their destructors:
    closing a suspended coroutine runs its ``finally`` blocks (``ROLLBACK`` on the parent's socket),
    and transports unregister from the selector. They are therefore made immortal: never freed, not
    even at interpreter exit. The cost is a few file descriptors and some memory in the child.
    """
    generation.state = "abandoned"
    kept: list[object] = [generation]
    for resource in generation.resources.live():
        kept.extend(resource._forget_after_fork())
    generation.resources.clear()
    _abandoned.append(kept)
    _immortalize(kept)


def _immortalize(obj: object) -> None:
    # One reference that is never released: the object (and all it refers to) is never deallocated,
    # so no destructor or coroutine finalizer ever runs on it.
    if sys.implementation.name == "cpython":
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
