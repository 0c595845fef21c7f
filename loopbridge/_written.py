"""What a caller has written: the primary of a Database with replicas counts every call it served.

Read-your-writes needs to know, at a read, whether the caller wrote since its last read and, if it did,
a WAL position that covers that write. Nothing here asks the server: every call served by the primary
(any call: a ``fetch`` can be an ``INSERT ... RETURNING``; a transaction counts when it ends) takes a
ticket from one process-wide sequence as it completes, and the caller's context keeps the ticket of its
latest one. A read later asks the primary for its WAL position only if some ticket it must honour is
newer than the position last asked for (see ``loopbridge._replicas``).

The caller's context crosses to the bridge loop as a *copy* (``loopbridge._call``): a ticket set there
would stay there. So the context holds a mutable :class:`Writes`, created on the caller's side (by
``db.read``), which the copy shares. A context without one (its first read creates it) is taken to have
written everything so far: what it did before is unknown, and the safe answer costs at most one round
trip to the primary.

A Database without replicas uses the plain :class:`~loopbridge._source.PoolSource`: it counts nothing.
"""

from __future__ import annotations

import itertools
from contextvars import ContextVar
from types import TracebackType

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ._source import PoolSource, _PoolHeld, _PoolLease

__all__ = ["RecordingSource", "Writes", "callers_writes", "current_writes", "ticket"]

# One sequence for every Database of the process: a context's Writes needs one number, whichever
# Databases it wrote to. next() on it is atomic under the GIL, so bridges on several threads may share it.
_sequence = itertools.count(1)


def ticket() -> int:
    """A number greater than that of every write completed so far (and smaller than every later one)."""
    return next(_sequence)


class Writes:
    """The latest write of one caller context: the ticket it completed with."""

    __slots__ = ("ticket",)

    def __init__(self, latest: int) -> None:
        self.ticket = latest

    def __repr__(self) -> str:
        return f"<Writes up to ticket {self.ticket}>"


_writes: ContextVar[Writes] = ContextVar("loopbridge_writes")


def callers_writes() -> Writes:
    """On the caller's side: the :class:`Writes` of the current context, created now if it has none (as
    if it had written everything completed so far)."""
    try:
        return _writes.get()
    except LookupError:
        writes = Writes(ticket())
        _writes.set(writes)
        return writes


def current_writes() -> Writes | None:
    """On the bridge loop, in a call's copy of its caller's context: the caller's Writes, if it has one."""
    return _writes.get(None)


class RecordingSource(PoolSource):
    """A pool that counts every call it serves as a write, for read-your-writes.

    :attr:`last_write` is the ticket of the latest write completed through it (0: none yet).
    """

    last_write = 0

    def wrote(self, writes: Writes | None) -> None:
        """A call on the primary completed (on the bridge loop, before its caller hears of it)."""
        latest = self.last_write = ticket()
        if writes is not None:
            writes.ticket = latest

    def lease(self) -> _RecordingLease:
        return _RecordingLease(self)

    async def hold(self) -> _RecordingHeld:
        # The writes of a transaction are its caller's: the one that began it.
        writes = current_writes()
        pool, con = await self.acquire()
        return _RecordingHeld(self, pool, con, writes)


class _RecordingLease(_PoolLease):
    """A lease whose end counts as a write, whatever the call did (and whether it succeeded: a statement
    that failed may still have committed)."""

    __slots__ = ()

    _source: RecordingSource

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Counted before the connection goes back: the statement is over, and a release that is
        # cancelled must not lose the count.
        self._source.wrote(current_writes())
        await super().__aexit__(exc_type, exc, tb)


class _RecordingHeld(_PoolHeld):
    """A connection held by a transaction (or a stream's): its release, after COMMIT or ROLLBACK, counts
    as a write of the context that began it."""

    __slots__ = ("_writes",)

    _source: RecordingSource

    def __init__(
        self, source: RecordingSource, pool: asyncpg.Pool, con: PoolConnectionProxy, writes: Writes | None
    ) -> None:
        super().__init__(source, pool, con)
        self._writes = writes

    async def release(self) -> None:
        self._source.wrote(self._writes)
        await super().release()
