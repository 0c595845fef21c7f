"""Where an Engine's sessions get their connection: from the pool, or, pinned, from one connection held in
an outer transaction that is rolled back at the end (a test's).

An Engine holds one of these and swaps it, rather than asking "am I pinned?" on every call: an ordinary
scope makes its ``AsyncSession`` on the engine and takes turns only with itself; a pinned one makes it on
the pinned connection with ``join_transaction_mode="create_savepoint"`` (SQLAlchemy's recipe for joining a
session into an external transaction: the session's commits and rollbacks become savepoints) and takes
turns with the scopes of other callers, since they share that connection. A scope keeps the source it
was opened with.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, AsyncTransaction

from loopbridge._turns import Turns
from loopbridge.errors import PoolTimeoutError

from .errors import home_session_class

if TYPE_CHECKING:
    from ._options import SessionConfig

__all__ = ["PLAIN", "TURN_TIMEOUT", "Pinned", "Plain"]

#: How long a scope of a pinned Engine waits for another caller's scope to end.
TURN_TIMEOUT = 30.0

logger = logging.getLogger("loopbridge")


class Plain:
    """Sessions from the engine's pool: each scope its own connection, at its first statement."""

    def session(self, engine: AsyncEngine, config: SessionConfig) -> AsyncSession:
        sync_class = home_session_class(config.sync_class)
        return config.async_class(engine, sync_session_class=sync_class, **config.options)

    async def enter(self, caller: object) -> None:
        """A scope opens (for *caller*, its task or thread): nothing to wait for."""

    def leave(self) -> None:
        """A scope that :meth:`enter` let in has ended."""

    @asynccontextmanager
    async def transaction(self, engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction, committed at the block's end (``Engine.run_sync``)."""
        async with engine.begin() as connection:
            yield connection

    async def discard(self, session: AsyncSession) -> None:
        """End an abandoned scope's session: its connection is discarded, and the server rolls back."""
        await session.invalidate()


#: The source of an Engine that is not pinned.
PLAIN = Plain()


class Pinned(Plain):
    """Sessions on one connection, in an outer transaction (see ``Engine._pin``)."""

    def __init__(self, connection: AsyncConnection, transaction: AsyncTransaction) -> None:
        self.connection = connection
        self.outer = transaction
        self.turns = Turns()  # held by the scopes of one caller at a time (see enter)

    def session(self, engine: AsyncEngine, config: SessionConfig) -> AsyncSession:
        sync_class = home_session_class(config.sync_class)
        return config.async_class(
            bind=self.connection,
            join_transaction_mode="create_savepoint",
            sync_session_class=sync_class,
            **config.options,
        )

    async def enter(self, caller: object) -> None:
        """A scope holds the connection from its opening to its end: scopes of other callers wait their
        turn (their savepoints must not interleave with its own), and a scope its own caller opens
        inside it (the application's code, called from a test's scope) nests, as savepoints do.

        :raises PoolTimeoutError: if another caller's scope held the connection for too long.
        """
        await self.turns.enter(caller, TURN_TIMEOUT, _refused)

    def leave(self) -> None:
        self.turns.leave()

    @asynccontextmanager
    async def transaction(self, engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
        await self.enter(None)
        try:
            async with self.connection.begin_nested():
                yield self.connection
        finally:
            self.leave()

    async def discard(self, session: AsyncSession) -> None:
        # The connection is shared: roll the scope's savepoint back, and leave the connection be.
        await session.close()

    async def release(self, timeout: float) -> bool:
        """Wait for the call on the connection, then roll the outer transaction back and close the
        connection; True if the transaction was still open (nothing ended it from inside)."""
        if not await self.turns.wait_for_the_holder(timeout):
            logger.warning("the pinned connection is still in use after %g s; discarding it", timeout)
            await self.connection.invalidate()
            return False
        try:
            # What the server says: a COMMIT sent as SQL by the code under test ends the transaction
            # without SQLAlchemy knowing.
            raw = await self.connection.get_raw_connection()
            driver = raw.driver_connection
            still_open = driver is not None and bool(driver.is_in_transaction())
            if self.outer.is_active:
                await self.outer.rollback()
            return still_open
        finally:
            try:
                await self.connection.close()  # back to the pool, which resets it (rolls back) if need be
            finally:
                self.turns.hand_back()


def _refused() -> PoolTimeoutError:
    return PoolTimeoutError(
        f"the Engine is pinned to one connection (a test's rolled-back transaction), and another caller's "
        f"session scope held it for {TURN_TIMEOUT:g} s. On a pinned Engine, scopes of different callers "
        "(threads, tasks) take turns: end one before another begins (and use session.run_sync() rather "
        "than engine.run_sync() inside a scope)"
    )
