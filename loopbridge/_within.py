"""``async with within(seconds) as bound:`` a bound on a wait on the server, without a task of its own.

The waits that loopbridge bounds sit on the hot path (every acquire, every release): ``asyncio.wait_for``
(and asyncpg's backport of it before Python 3.12) wraps the awaitable in a task of its own, where this
schedules one timer on the running task. On expiry the task is cancelled and ``TimeoutError`` raised at
the end of the block; ``bound.expired()`` tells that apart from a ``TimeoutError`` raised inside it.
``seconds=None`` bounds nothing.
"""

from __future__ import annotations

import asyncio
import sys
from types import TracebackType

__all__ = ["within"]

if sys.version_info >= (3, 11):
    within = asyncio.timeout
else:  # pragma: no cover - Python 3.10

    class within:
        """``asyncio.timeout`` for Python 3.10 (which cannot tell our cancellation from another's:
        a task cancelled by someone else at the very moment the bound expires gets TimeoutError)."""

        __slots__ = ("_expired", "_handle", "_seconds", "_task")

        def __init__(self, seconds: float | None) -> None:
            self._seconds = seconds
            self._expired = False
            self._handle: asyncio.TimerHandle | None = None

        def expired(self) -> bool:
            return self._expired

        def _expire(self) -> None:
            self._expired = True
            self._task.cancel()

        async def __aenter__(self) -> within:
            if self._seconds is not None:
                task = asyncio.current_task()
                assert task is not None
                self._task = task
                self._handle = asyncio.get_running_loop().call_later(self._seconds, self._expire)
            return self

        async def __aexit__(
            self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
        ) -> None:
            if self._handle is not None:
                self._handle.cancel()
            if self._expired and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc
