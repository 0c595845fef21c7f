"""How the bridge loop wakes a sync thread that waits for its call.

On Linux each waiting thread owns one ``eventfd``, reused by all its calls: the bridge loop writes to
it, the thread blocks reading it. Elsewhere each call gets a bare lock, released by the bridge loop.

Why not just the lock everywhere: ``lock.release()`` wakes the sleeping thread while the bridge thread
holds the GIL, so the woken thread at once blocks again, on the GIL, and needs a second wakeup when the
bridge loop lets go of it. ``os.eventfd_write`` releases the GIL around its system call. Measured on a
2-core Linux VM (a no-op call, sync caller, alternating old/new 4 times, median): 5.1 -> 2.0 context
switches per call and 37 -> 22 us per call at N=1; 27 -> 11 us per call at N=16. See
benchmarks/NOTES.md.

Because a thread's eventfd outlives its calls, a wakeup may be a stale one, meant for an earlier call
that its thread gave up waiting for (a timeout, Ctrl-C): the waiting call checks that it is settled
and otherwise waits again (see ``BlockingCall.wait``).
"""

from __future__ import annotations

import _thread
import os
import select
import threading
from typing import Protocol

__all__ = ["Waiter", "waiter_for_this_thread"]

_HAVE_EVENTFD = hasattr(os, "eventfd")


class Waiter(Protocol):
    def wake(self) -> None:
        """Wake the waiting thread; from the bridge loop."""

    def wait(self, timeout: float | None) -> None:
        """Block until woken or until *timeout* seconds passed; the caller checks which."""


class _LockWaiter:
    """One bare lock per call: held from the start, released to wake."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def wake(self) -> None:
        self._lock.release()

    def wait(self, timeout: float | None) -> None:
        self._lock.acquire(True, -1 if timeout is None else timeout)


class _EventFdWaiter:
    """One eventfd per thread, for all its calls. Closed when nothing refers to it any more: a call
    keeps its thread's waiter alive, so the bridge never writes to a descriptor that was closed (and
    maybe reused)."""

    __slots__ = ("_fd", "_poll")

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._poll: select.poll | None = None

    def wake(self) -> None:
        os.eventfd_write(self._fd, 1)

    def wait(self, timeout: float | None) -> None:
        if timeout is not None:
            if self._poll is None:
                self._poll = select.poll()
                self._poll.register(self._fd, select.POLLIN)
            if not self._poll.poll(max(0, int(timeout * 1000) + 1)):
                return
        os.eventfd_read(self._fd)  # interruptible: Ctrl-C raises KeyboardInterrupt here

    def __del__(self) -> None:
        os.close(self._fd)


_local = threading.local()


def waiter_for_this_thread() -> Waiter:
    """The waiter a call made on this thread waits on."""
    if not _HAVE_EVENTFD:
        return _LockWaiter()
    waiter: _EventFdWaiter | None = getattr(_local, "waiter", None)
    if waiter is None:
        _forget_in_forked_children()
        waiter = _local.waiter = _EventFdWaiter()
    return waiter


def _forget_after_fork() -> None:
    # The forked child shares the parent's eventfd (a kernel object): this thread, the only one in the
    # child, needs one of its own. Dropping it closes the child's copy of the descriptor only.
    _local.__dict__.pop("waiter", None)


_fork_hook = threading.Lock()  # held for good once the hook is registered


def _forget_in_forked_children() -> None:
    # Registered with the first eventfd, never at import: importing loopbridge changes nothing.
    if _fork_hook.acquire(blocking=False):
        os.register_at_fork(after_in_child=_forget_after_fork)
