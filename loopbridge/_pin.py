"""A pinned source: every call of a Database on one connection, for tests rolled back at their end.

A test wrapped in a transaction that is rolled back at its end needs the code under test, which uses the
plain Database, to run on the connection holding that transaction. The pytest plugin swaps a
:class:`PinnedSource` in for the Database's source (:func:`pin`) and back (:func:`unpin`); nothing else
in the library knows about pinning.

While pinned, every lease and every held connection is that one connection, handed to one task at a
time; later transactions run on it too, where asyncpg makes a transaction begun on a connection already
in one a savepoint. Calls take turns for each step, not for a whole transaction block: code under test
that makes a plain call inside a block must not wait for the block to end (it would, until
``PoolTimeoutError``). A subscription needs a connection of its own outside the test's transaction (a
LISTEN in a transaction takes effect only at its COMMIT): it gets one from the pool as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from asyncpg.pool import PoolConnectionProxy

from . import _asyncpg
from ._dead import lost_connection
from ._source import ClosedSource, Held, Lease, PoolSource
from ._turns import Turns
from .errors import ConnectionLostError, PoolTimeoutError

if TYPE_CHECKING:
    from ._loop import Resource
    from .bridge import Bridge

__all__ = ["PinnedSource", "pin", "unpin"]

logger = logging.getLogger("loopbridge")


class _Pinnable(Protocol):
    """What can be pinned: a facade whose every call goes through its ``_source``."""

    _source: PoolSource | PinnedSource | ClosedSource


async def pin(facade: _Pinnable) -> PinnedSource:
    """From now on, until :func:`unpin`, every call of *facade* uses one connection, taken from its pool
    now. On the bridge loop.

    :raises RuntimeError: if *facade* is already pinned.
    """
    source = facade._source
    if not isinstance(source, PoolSource):
        raise RuntimeError(f"{source!r} is already pinned to a connection; unpin it first")
    held = await source.hold()
    if facade._source is not source:  # pinned by another task while we waited for the connection
        await held.release()
        raise RuntimeError(f"{source!r} is already pinned to a connection; unpin it first")
    pinned = PinnedSource(source, held.con, held.release)
    facade._source = pinned
    return pinned


async def unpin(facade: _Pinnable, timeout: float = 10.0) -> None:
    """Wait for the call holding the pinned connection, if any, then return it to the pool (which rolls
    back a transaction left open on it); calls waiting for a turn go to the pool instead. On the bridge
    loop; safe to call twice.

    After *timeout* seconds the connection is terminated: whatever holds it fails, the server rolls its
    transaction back, and the holder returns it to the pool when it lets go.
    """
    pinned = facade._source
    if not isinstance(pinned, PinnedSource):
        return
    facade._source = pinned.inner
    await pinned.let_go(timeout)


class PinnedSource:
    """The source of a pinned Database: one connection, taking turns (see the module docstring)."""

    def __init__(self, inner: PoolSource, con: PoolConnectionProxy, give_back: Any) -> None:
        self.inner = inner
        self.con = con
        self._give_back = give_back
        self._turns = Turns()
        self.gone = False  # being unpinned: no new turns, callers use the pool
        self._orphaned = False  # let_go gave up waiting: the last holder returns the connection

    # -- Source: what is not about connections is the inner source's

    @property
    def bridge(self) -> Bridge:
        return self.inner.bridge

    @property
    def closed(self) -> bool:
        return self.inner.closed

    @property
    def command_timeout(self) -> float | None:
        return self.inner.command_timeout

    @property
    def round_trip_timeout(self) -> float:
        return self.inner.round_trip_timeout

    @property
    def transaction_timeout(self) -> float | None:
        return self.inner.transaction_timeout

    def discard(self, con: PoolConnectionProxy, why: str | None = None) -> None:
        if con is not self.con:  # a connection of the pool (a subscription's): the pool's business
            self.inner.discard(con, why)
        # The pinned one belongs to the test's transaction, which its fixture ends.

    def keep(self, resource: Resource) -> None:
        self.inner.keep(resource)

    def forget(self, resource: Resource) -> None:
        self.inner.forget(resource)

    def redact(self, text: str) -> str:
        return self.inner.redact(text)

    def lost_message(self, exc: BaseException) -> str:
        return self.inner.lost_message(exc)

    def __repr__(self) -> str:
        return repr(self.inner)

    async def hold_apart(self) -> Held:
        return await self.inner.hold_apart()

    # -- connections: the pinned one

    def lease(self) -> Lease:
        return _PinnedLease(self)

    async def hold(self) -> Held:
        if self.gone:
            return await self.inner.hold()
        return _PinnedHeld(self)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[bool]:
        """The pinned connection's turn for one step; yields False if it is being unpinned (the caller
        then uses the pool).

        The task whose turn it is may take it again without waiting: ``db.arun(fn)`` whose *fn* awaits
        ``db.afetch(...)`` runs both on the connection, in one task.
        """
        if not await self._enter():
            yield False
            return
        try:
            yield True
        finally:
            await self._leave()

    async def _enter(self) -> bool:
        task = asyncio.current_task()
        if self.gone and (task is None or task is not self._turns.holder):  # the holder still finishes
            return False
        timeout = self.inner.pool_timeout
        await self._turns.enter(task, timeout, lambda: self._refused(timeout))
        if self._unpinning() and self._turns.depth == 1:  # unpinned while we waited
            self._turns.leave()
            return False
        return True

    def _refused(self, timeout: float | None) -> PoolTimeoutError:
        return PoolTimeoutError(
            f"{self!r} is pinned to one connection (a test's rolled-back transaction) and another "
            f"call held it for pool_timeout={timeout:g} s. Calls on a pinned Database take turns: do "
            "not start concurrent calls from inside one (asyncio.gather inside db.run)"
        )

    def _unpinning(self) -> bool:
        return self.gone

    async def _leave(self) -> None:
        if self._turns.leave() and self._orphaned:  # let_go gave up waiting for us: we return it
            self._orphaned = False
            await self._give_back()

    async def let_go(self, timeout: float) -> None:
        if self.gone:
            return
        self.gone = True  # no new turns
        if not await self._turns.wait_for_the_holder(timeout):
            logger.warning(
                "%r: the pinned connection is still in use after %g s; terminating it", self, timeout
            )
            self._orphaned = True
            self.con.terminate()
            return
        self._turns.hand_back()  # wakes the callers waiting for a turn: they see `gone`
        await self._give_back()

    # -- the pool's own business: the inner source's

    async def open(self) -> Any:
        return await self.inner.open()

    def figures(self) -> tuple[int, int, int, int]:
        return self.inner.figures()

    @property
    def max_size(self) -> int:
        return self.inner.max_size

    def mark_closed(self) -> bool:
        return self.inner.mark_closed()

    async def _aclose_on_bridge(self, timeout: float) -> None:
        """The Database closes while pinned: give the connection back first, or the pool's close waits
        for it."""
        await self.let_go(timeout)
        await self.inner._aclose_on_bridge(timeout)


class _PinnedLease:
    """A lease of the pinned connection (or, once it is being unpinned, of a pooled one)."""

    __slots__ = ("_inner", "_pinned", "_protocol", "_turn", "unsent")

    def __init__(self, pinned: PinnedSource) -> None:
        self._pinned = pinned
        self.unsent = False
        self._inner: Lease | None = None

    async def __aenter__(self) -> PoolConnectionProxy:
        pinned = self._pinned
        self._turn = pinned.turn()
        if not await self._turn.__aenter__():
            await self._turn.__aexit__(None, None, None)
            self._inner = pinned.inner.lease()
            return await self._inner.__aenter__()
        self._protocol = _asyncpg.protocol_of(pinned.con)
        return pinned.con

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._inner is not None:
            await self._inner.__aexit__(exc_type, exc, tb)
            return
        await self._turn.__aexit__(None, None, None)
        if exc is not None and lost_connection(exc, self._protocol):
            # The test's transaction is gone with its connection: no retry on another one.
            raise ConnectionLostError(self._pinned.lost_message(exc)) from exc


class _PinnedHeld:
    """The pinned connection held for a transaction: it takes the pinned connection's turn for each
    step, and is never given back by the transaction (the test's fixture does that)."""

    __slots__ = ("_pinned",)

    replaceable = False

    def __init__(self, pinned: PinnedSource) -> None:
        self._pinned = pinned

    @property
    def con(self) -> PoolConnectionProxy:
        return self._pinned.con

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        # Once unpinned the turn holds nothing: gone() says so, and the transaction is lost.
        async with self._pinned.turn():
            yield

    def gone(self) -> bool:
        if self._pinned.gone:
            return True
        try:
            return self._pinned.con.is_closed()
        except Exception:  # asyncpg refuses even is_closed() on a connection released meanwhile
            return True

    def discard(self, why: str | None = None) -> None:
        pass  # the test's transaction owns the session; its rollback ends whatever this left

    async def release(self) -> None:
        pass
