"""A call: one piece of work crossing from a caller into the bridge loop, and the way its outcome returns.

The work itself always runs the same way (:meth:`Call.start`, on the bridge loop); only the way back to
the caller differs, so each kind of caller has a small subclass:

* :class:`BlockingCall` — a sync thread waits on an eventfd of its own (Linux) or a bare lock, both
  cheaper than a ``concurrent.futures.Future`` with its condition variable (see ``loopbridge._wakeup``);
* :class:`AsyncCall` — a coroutine on another event loop awaits a future of its own loop, completed
  on that loop through its :class:`Mailbox` (one ``call_soon_threadsafe`` per burst of results);
* :class:`FutureCall` — :meth:`Bridge.submit` hands out a ``concurrent.futures.Future``.

Cancellation always happens on the bridge loop (``cancel``), whoever asks for it: a timeout, the caller
going away (Ctrl-C, a cancelled task, a cancelled future) or the bridge closing. The reason decides what
the caller sees.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import inspect
import sys
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any, Generic, ParamSpec, TypeVar

from ._wakeup import waiter_for_this_thread
from .errors import BridgeClosedError, CallTimeoutError

__all__ = [
    "AsyncCall",
    "BlockingCall",
    "Call",
    "CancelReason",
    "FutureCall",
    "Ledger",
    "Mailbox",
    "ToCompletion",
    "describe",
]

T = TypeVar("T")
P = ParamSpec("P")

_TASK_TAKES_CONTEXT = sys.version_info >= (3, 11)


class CancelReason(enum.Enum):
    """Why a call was cancelled on the bridge loop."""

    TIMEOUT = "timeout"
    CALLER = "caller"  # the caller stopped waiting: Ctrl-C, task cancelled, future cancelled
    CLOSE = "close"
    EXIT = "exit"  # the interpreter exits: cancelled, and the caller (a daemon thread) is not woken


class ToCompletion(Generic[P, T]):
    """*fn*, whose calls run to their end once submitted, whatever happens to the caller.

    The end of a ``with`` block (a COMMIT, returning a connection) must not be lost because the caller
    was interrupted while waiting for it: Ctrl-C or a cancelled task stop the caller's *wait* (after
    the usual grace period), never the work, not even before its first step on the bridge loop. A
    timeout or the bridge closing still cancel it.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[P, Awaitable[T]]) -> None:
        self.fn = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[T]:
        return self.fn(*args, **kwargs)


class Ledger:
    """The loop thread's account of its calls. Written only on the bridge loop; read from anywhere."""

    __slots__ = ("failed", "inflight", "started", "succeeded")

    def __init__(self) -> None:
        self.inflight: set[Call[Any]] = set()
        self.started = 0
        self.succeeded = 0
        self.failed = 0


class Call(Generic[T]):
    """The work of one caller: ``fn(*args, **kwargs)``, or a ready awaitable when *args* is None."""

    __slots__ = (
        "_timer",
        "args",
        "cancel_reason",
        "context",
        "error",
        "fn",
        "kwargs",
        "label",
        "loop",
        "result",
        "running",
        "settled",
        "task",
        "timeout",
    )

    def __init__(
        self,
        fn: Callable[..., Awaitable[T]] | Awaitable[T],
        args: tuple[Any, ...] | None,
        kwargs: dict[str, Any] | None,
        timeout: float | None,
        label: str,
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.timeout = timeout
        self.label = label
        # The caller's contextvars are visible to the work (and changes made there stay there).
        self.context = contextvars.copy_context()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.cancel_reason: CancelReason | None = None
        self.running = False
        self.settled = False
        self.result: T | None = None
        self.error: BaseException | None = None

    # -- on the bridge loop -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, ledger: Ledger) -> None:
        """Begin the work as a task on *loop* (the bridge loop)."""
        ledger.started += 1
        ledger.inflight.add(self)
        coro = self._drive(ledger)
        if _TASK_TAKES_CONTEXT:
            self.task = loop.create_task(coro, context=self.context)  # type: ignore[call-arg,unused-ignore]
        else:  # a task copies the context current at its creation
            self.task = self.context.run(loop.create_task, coro)
        if self.timeout is not None:
            self._timer = loop.call_later(self.timeout, self.cancel, CancelReason.TIMEOUT)

    async def _drive(self, ledger: Ledger) -> None:
        try:
            self.running = True
            if self.cancel_reason is not None:  # cancelled between start() and this first step
                self._close_unawaited()
                raise asyncio.CancelledError
            args = self.args
            fn: Any = self.fn
            self.result = await (fn if args is None else invoke(self.label, fn, args, self.kwargs))
        except asyncio.CancelledError as exc:
            self.error = self._cancelled_error(exc)
        except GeneratorExit:  # the task itself is being destroyed: nothing to report to
            raise
        except BaseException as exc:
            self.error = exc if self.cancel_reason is None else self._unwound_error(exc)
        finally:
            ledger.inflight.discard(self)
            if self.error is None:
                ledger.succeeded += 1
            else:
                ledger.failed += 1
            if self._timer is not None:
                self._timer.cancel()
            self.settled = True
            if self.cancel_reason is not CancelReason.EXIT:
                self._settle()

    def cancel(self, reason: CancelReason) -> None:
        """Cancel the work (on the bridge loop). The first reason given is the one reported."""
        if self.settled:
            return
        if reason is CancelReason.CALLER and isinstance(self.fn, ToCompletion):
            return  # the caller stops waiting; the work goes on
        if self.cancel_reason is None:
            self.cancel_reason = reason
        # A task that has not taken its first step must not be cancelled from outside: the
        # CancelledError would be thrown into the coroutine before its ``try`` and nothing would
        # settle the call. _drive checks cancel_reason first thing instead.
        if self.task is not None and self.running:
            self.task.cancel()

    def reject(self, error: BaseException) -> None:
        """Settle a call that will never start (any thread, once the bridge no longer runs it)."""
        self._close_unawaited()
        self.error = error
        self.settled = True
        self._settle()

    def abandon(self) -> None:
        """Drop a call that will never start, at interpreter exit: its caller is not woken."""
        self._close_unawaited()
        self.settled = True

    def _close_unawaited(self) -> None:
        if inspect.iscoroutine(self.fn):
            self.fn.close()  # no "coroutine was never awaited" warning for work we never ran

    def _cancelled_error(self, exc: asyncio.CancelledError) -> BaseException:
        reason = self.cancel_reason
        if reason is CancelReason.TIMEOUT:
            return CallTimeoutError(
                f"{self.label} did not finish within {self.timeout:g} s; it was cancelled on the bridge loop"
            )
        if reason is CancelReason.CLOSE or reason is CancelReason.EXIT:
            return BridgeClosedError(
                f"{self.label} was cancelled because its bridge was closed while the call was in flight; "
                "close the bridge only after the calls you care about have returned"
            )
        return exc

    def _unwound_error(self, exc: BaseException) -> BaseException:
        """The error for work that was cancelled but ended with *exc*, raised while it unwound.

        asyncpg's ``Transaction.__aexit__``, for one, raises its own error when the cancellation left the
        connection closed. What happened is still the timeout (or the close): report that, caused by
        *exc*. An error that has nothing to do with the cancellation is reported as it is.
        """
        if self.cancel_reason is CancelReason.CALLER or not _raised_during_cancellation(exc):
            return exc
        error = self._cancelled_error(asyncio.CancelledError())
        error.__cause__ = exc
        return error

    def _settle(self) -> None:
        """Tell the caller the outcome is ready. Subclasses choose how."""
        raise NotImplementedError

    # -- on the caller's side -----------------------------------------------------------------------

    def cancel_threadsafe(self, reason: CancelReason) -> None:
        """Ask the bridge loop to cancel the work; from any thread."""
        loop = self.loop
        if loop is None or self.settled:
            return
        try:
            loop.call_soon_threadsafe(self.cancel, reason)
        except RuntimeError:  # the bridge loop is closed: close() settles or rejects every call
            pass

    def outcome(self) -> T:
        """Return the result or raise the error (with the traceback from the bridge loop)."""
        error = self.error
        if error is not None:
            # Drop our references so the traceback's frames do not keep this call alive.
            self.error = None
            try:
                raise error
            finally:
                del error
        return self.result  # type: ignore[return-value]


class BlockingCall(Call[T]):
    """The caller is a sync thread, waiting on its thread's waiter (see ``loopbridge._wakeup``)."""

    __slots__ = ("_waiter",)

    def __init__(
        self,
        fn: Callable[..., Awaitable[T]] | Awaitable[T],
        args: tuple[Any, ...] | None,
        kwargs: dict[str, Any] | None,
        timeout: float | None,
        label: str,
    ) -> None:
        super().__init__(fn, args, kwargs, timeout, label)
        self._waiter = waiter_for_this_thread()

    def _settle(self) -> None:
        self._waiter.wake()

    def wait(self, timeout: float | None) -> bool:
        """Block until settled or *timeout* elapses; True if settled. Interruptible by Ctrl-C."""
        if timeout is None:
            while not self.settled:  # a wakeup may be a stale one, for an earlier call of this thread
                self._waiter.wait(None)
            return True
        deadline = time.monotonic() + timeout
        while not self.settled:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._waiter.wait(left)
        return True


class AsyncCall(Call[T]):
    """The caller is a coroutine on another event loop, awaiting :attr:`waiter`."""

    __slots__ = ("delivered", "mailbox", "waiter")

    def __init__(
        self,
        fn: Callable[..., Awaitable[T]] | Awaitable[T],
        args: tuple[Any, ...] | None,
        kwargs: dict[str, Any] | None,
        timeout: float | None,
        label: str,
        caller_loop: asyncio.AbstractEventLoop,
        mailbox: Mailbox,
    ) -> None:
        super().__init__(fn, args, kwargs, timeout, label)
        self.mailbox = mailbox
        self.waiter: asyncio.Future[None] = caller_loop.create_future()
        self.delivered = False

    def _settle(self) -> None:
        self.mailbox.post(self)

    def _deliver(self) -> None:
        # On the caller's loop. The waiter may have been cancelled, or replaced: Bridge._arun waits again,
        # on a new one, for work still unwinding after its caller was cancelled.
        self.delivered = True
        if not self.waiter.done():
            self.waiter.set_result(None)


class Mailbox:
    """The way back to one foreign event loop: a burst of results costs that loop one wakeup.

    The mirror image of ``LoopThread.submit``: the bridge loop appends settled calls, and only the first
    one after a delivery schedules :meth:`_deliver` with the caller loop's ``call_soon_threadsafe``
    (a write to its self-pipe, and a wakeup). With N tasks of one loop awaiting the bridge, results
    that settle in the same bridge loop iteration come back together. The mailbox holds its loop
    weakly, so that the bridge's registry of mailboxes never keeps a finished loop alive.
    """

    __slots__ = ("__weakref__", "_calls", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        self._calls: deque[AsyncCall[Any]] = deque()
        self._scheduled = False

    def post(self, call: AsyncCall[Any]) -> None:
        """On the bridge loop: hand *call*'s outcome back to its caller's loop."""
        self._calls.append(call)
        if self._scheduled:
            return
        loop = self._loop()
        self._scheduled = True
        try:
            if loop is None:
                raise RuntimeError("the loop is gone")
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the caller's loop is closed: nobody is left waiting
            self._scheduled = False
            self._calls.clear()

    def _deliver(self) -> None:
        # On the caller's loop.
        self._scheduled = False  # before popping: a call posted from now on schedules a new delivery
        calls = self._calls
        while calls:
            calls.popleft()._deliver()


class FutureCall(Call[T]):
    """The caller holds a ``concurrent.futures.Future``; cancelling it cancels the work."""

    __slots__ = ("future",)

    def __init__(
        self,
        fn: Callable[..., Awaitable[T]] | Awaitable[T],
        args: tuple[Any, ...] | None,
        kwargs: dict[str, Any] | None,
        timeout: float | None,
        label: str,
    ) -> None:
        super().__init__(fn, args, kwargs, timeout, label)
        self.future: Future[T] = Future()
        self.future.add_done_callback(self._on_future_done)

    def _on_future_done(self, future: Future[T]) -> None:
        if future.cancelled():
            self.cancel_threadsafe(CancelReason.CALLER)

    def _settle(self) -> None:
        future = self.future
        error, self.error = self.error, None
        try:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(self.result)  # type: ignore[arg-type]
        except InvalidStateError:  # the caller cancelled the future meanwhile
            pass


def _raised_during_cancellation(exc: BaseException) -> bool:
    """True if a CancelledError is in the chain of exceptions *exc* was raised from or during."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, asyncio.CancelledError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def describe(fn: object) -> str:
    """A short name for *fn* in messages: ``fetch_rows`` or ``<coroutine fetch_rows>``."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if inspect.iscoroutine(fn):
        return f"<coroutine {name}>"
    if name is None:
        func = getattr(fn, "func", None)  # functools.partial
        if func is not None:
            return f"partial({describe(func)})"
        return type(fn).__name__
    return str(name)


def invoke(
    label: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
) -> Awaitable[Any]:
    """``fn(*args, **kwargs)``, which must return an awaitable: how a caller's function is called.

    :raises TypeError: naming *label* and *fn*, when *fn* is a plain function.
    """
    awaitable = fn(*args, **kwargs) if kwargs else fn(*args)
    if not inspect.isawaitable(awaitable):
        raise TypeError(_not_awaitable(label, fn, awaitable))
    return awaitable


def _not_awaitable(label: str, fn: object, value: object) -> str:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return (
        f"{label} runs async functions, but {describe(fn)}() returned {type(value).__name__} {shown}, "
        "which cannot be awaited: define it with 'async def' (or return an awaitable); a plain function "
        "needs no bridge: call it directly."
    )
