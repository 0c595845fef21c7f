"""Turns on one shared connection: one holder at a time, who may enter again while it holds.

A pinned Database (``loopbridge._pin``) and a pinned Engine (``loopbridge.sqlalchemy._sources``) each
serve every caller from one connection, holding a test's transaction. Callers take turns on it; the
holder's own nested use (``db.arun(fn)`` whose *fn* awaits ``db.afetch``, a scope opened inside a scope)
enters again instead of waiting for itself; a caller that waits longer than a bound is told why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Turns"]


class Turns:
    """On the bridge loop: whose turn it is on a shared connection."""

    __slots__ = ("_lock", "depth", "holder")

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self.holder: object = None  # a task, or a thread
        self.depth = 0  # the holder's turns taken and not yet ended

    async def enter(self, holder: object, timeout: float | None, refused: Callable[[], Exception]) -> None:
        """Take a turn for *holder* (None: an anonymous one, never re-entered).

        :raises: ``refused()``, if no turn came within *timeout* seconds.
        """
        if holder is not None and holder is self.holder:
            self.depth += 1
            return
        try:
            await asyncio.wait_for(self._lock.acquire(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise refused() from None
        self.holder, self.depth = holder, 1

    def leave(self) -> bool:
        """End one turn; True if the holder has ended its last one (the next may go)."""
        # Not checked against the current task: a turn may end in another call than it began in (a
        # transaction held across calls), so turns are counted rather than owned.
        self.depth -= 1
        if self.depth > 0:
            return False
        self.holder = None
        self._lock.release()
        return True

    async def wait_for_the_holder(self, timeout: float) -> bool:
        """Take the connection for good, once the holder is done (within *timeout*: else False, and
        nothing taken). Callers waiting meanwhile then get their turn, and find it is over."""
        try:
            await asyncio.wait_for(self._lock.acquire(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            return False
        return True

    def hand_back(self) -> None:
        """After :meth:`wait_for_the_holder`: let the waiting callers in (to find that it is over)."""
        self._lock.release()
