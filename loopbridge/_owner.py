"""Owners: who holds a connection across calls, and what happens when they leave without giving it back.

A transaction, a row stream and a subscription each keep a pooled connection on the bridge loop between
calls. The code that opened one may go away without closing it: its thread ends, its event loop is
closed, the object is dropped (an early ``break``, an exception in a ``for`` body, a forgotten
reference). Two things notice, and both hand the holder back to the bridge loop to be released there:

* :func:`guard`: a weakref finalizer on the caller-side object, run when it is garbage collected;
* :class:`OwnerWatch`: a timer on the bridge loop that checks every :data:`CHECK_INTERVAL` seconds
  whether the owning thread is still alive (or the owning event loop still open, and running or its
  thread alive).

Neither ever blocks: the finalizer schedules the release with :meth:`Bridge.submit` and returns (it may
run on any thread, the bridge's own included), the watch starts a task on the loop it runs on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from .errors import BridgeClosedError

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["CHECK_INTERVAL", "Abandonable", "Finalizer", "Owner", "OwnerWatch", "abandon_soon", "guard"]

logger = logging.getLogger("loopbridge")

#: Seconds between two checks that the owner of a held connection is still there.
CHECK_INTERVAL = 0.5

if TYPE_CHECKING:
    Finalizer = weakref.finalize[..., Any]
else:  # not subscriptable at run time
    Finalizer = weakref.finalize


class Owner:
    """The thread (sync callers) or the event loop (async callers) that opened something."""

    __slots__ = ("loop", "thread")

    def __init__(self, thread: threading.Thread, loop: asyncio.AbstractEventLoop | None) -> None:
        self.thread = thread
        self.loop = loop

    @classmethod
    def this_thread(cls) -> Owner:
        return cls(threading.current_thread(), None)

    @classmethod
    def this_loop(cls) -> Owner:
        """The running loop: an async caller's work may hop between its tasks, not between loops."""
        return cls(threading.current_thread(), asyncio.get_running_loop())

    def alive(self) -> bool:
        if self.loop is not None:
            # A loop need not be closed to be gone: a worker thread may run one and return without
            # closing it. Not running, with the thread that ran it ended, nothing is left to use it.
            loop = self.loop
            return not loop.is_closed() and (loop.is_running() or self.thread.is_alive())
        return self.thread.is_alive()

    def __str__(self) -> str:
        if self.loop is not None:
            return f"the event loop of thread {self.thread.name!r}"
        return f"thread {self.thread.name!r}"


class Abandonable(Protocol):
    """Bridge-loop state holding a connection for a caller."""

    async def _abandon_on_bridge(self, why: str) -> None:
        """Give everything back (roll back, close the cursor, return the connection); idempotent."""


class OwnerWatch:
    """On the bridge loop: abandon *held* as soon as its owner is gone. :meth:`cancel` when done."""

    __slots__ = ("_held", "_loop", "_owner", "_task", "_timer")

    def __init__(self, held: Abandonable, owner: Owner) -> None:
        self._held: Abandonable | None = held
        self._owner = owner
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(CHECK_INTERVAL, self._check)

    def _check(self) -> None:
        if self._owner.alive():
            self._timer = self._loop.call_later(CHECK_INTERVAL, self._check)
            return
        self._timer = None
        if self._held is not None:
            self._task = self._loop.create_task(
                self._held._abandon_on_bridge(f"{self._owner} ended without closing it")
            )

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # The holder refers to its watch: let go of it, so that no cycle keeps the holder, and the
        # Database it holds a connection of, alive once the holder is done (a Database nothing refers
        # to is closed at once; see loopbridge._loop.ClosedWhenUnreachable).
        self._held = None


def guard(handle: object, bridge: Bridge, held: Abandonable, what: str) -> Finalizer:
    """Abandon *held* when *handle*, the caller's object for it, is garbage collected unclosed.

    The finalizer must not refer to *handle* (it would never be collected): it gets *held*, the bridge
    loop's side, only. ``detach()`` it once *held* is released normally.
    """
    finalizer = weakref.finalize(
        handle, abandon_soon, bridge, held, f"{what} was garbage collected without being closed", os.getpid()
    )
    # Not at interpreter exit, where weakref would run it before the bridges close (atexit runs the
    # last registered first) and report a daemon thread's transaction as garbage: closing the bridge
    # ends what such a thread still holds, quietly.
    finalizer.atexit = False
    return finalizer


def abandon_soon(bridge: Bridge, held: Abandonable, why: str, pid: int | None = None) -> None:
    """From any thread, without blocking: run ``held._abandon_on_bridge(why)`` on the bridge loop.

    Does nothing in a forked child (the parent's connections are not ours to touch) or when the bridge
    no longer runs (closing it released everything).
    """
    if (pid is not None and pid != os.getpid()) or not bridge.running:
        return
    try:
        bridge.submit(held._abandon_on_bridge, why)
    except BridgeClosedError:  # closing meanwhile: the close releases it
        pass
