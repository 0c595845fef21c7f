"""Transactions: one connection pinned on the bridge loop for the length of a ``with`` block.

::

    with db.transaction() as tx:                       # sync code
        tx.execute("UPDATE accounts SET balance = balance - $1 WHERE id = $2", 10, 1)
        check_limits()                                  # your code, between statements
        tx.execute("UPDATE accounts SET balance = balance + $1 WHERE id = $2", 10, 2)

    async with db.transaction() as tx:                 # async code, on any loop
        await tx.aexecute(...)

The connection never leaves the bridge loop: every statement crosses to it like any other call, and
runs on the same pinned connection. The block commits when it ends normally and rolls back when it
raises, whatever raised (a statement, your own code, Ctrl-C, a cancelled task, a timeout). Nested
``tx.transaction()`` blocks are savepoints. A block that caught the error of a failed statement and
ended normally raises instead of committing: PostgreSQL aborts a transaction at its first error and
answers COMMIT with ROLLBACK (see ``_Core.end``).

Nothing stays held when the block is abandoned instead: see :mod:`loopbridge._owner`. A transaction
whose owner (the thread that began it, or the event loop for ``async with``) goes away, or whose handle
is garbage collected, while it is still open is rolled back and its connection returned.

The two halves: :class:`Transaction` is the caller's handle; :class:`_Core` is the bridge loop's state
(the finalizer and the owner watch hold the core, never the handle, so that the handle can be
collected). The connection comes from a :class:`~loopbridge._source.Source` (``hold()``), never from the
Database itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from asyncpg.transaction import Transaction as _AsyncpgTransaction

from ._asyncpg import protocol_of, sent_so_far
from ._copy import CopyMethods
from ._dead import DEAD_CONNECTION_RETRIES, died_unsent, is_connection_failure, lost_connection
from ._owner import Finalizer, Owner, OwnerWatch, guard
from ._queries import Queries
from ._stream import StreamMethods
from ._twins import NotAwaitable, twin_contexts, twins
from .errors import (
    ConfigurationError,
    ConnectionLostError,
    DatabaseClosedError,
    TransactionClosedError,
)

if TYPE_CHECKING:
    from ._source import Held, Source
    from .bridge import Bridge

__all__ = ["Transaction"]

logger = logging.getLogger("loopbridge")

ISOLATION_LEVELS = ("read_committed", "read_uncommitted", "repeatable_read", "serializable")

_State = Literal["new", "active", "committed", "rolled back", "lost"]
_StatementKind = Literal["sql", "callers", "close"]


class Dependent(Protocol):
    """Something that lives inside a transaction (a savepoint, a stream) and ends before it does."""

    async def _abandon_on_bridge(self, why: str) -> None: ...


class Transaction(Queries, CopyMethods, StreamMethods, NotAwaitable):
    """A transaction (or, nested, a savepoint) on one connection pinned on the bridge loop.

    Get one from :meth:`Database.transaction` (or, for a savepoint, :meth:`transaction` on an open one)
    and use it in a ``with`` block (sync code) or an ``async with`` block (async code, on any loop); the
    block binds the transaction itself. A Transaction is entered once.

    Statements (``fetch``, ``fetchrow``, ``fetchval``, ``execute``, ``executemany``, ``run``, their
    ``a``-twins, streaming with ``iterate`` and COPY) run on the pinned connection, one at a time.

    :raises TransactionClosedError: from a statement once the transaction has ended or its connection
        was lost (the statement that was running when the connection broke raises
        :class:`ConnectionLostError`); from the end of a block in which a statement failed and its
        error was caught: PostgreSQL had aborted the transaction, which is rolled back instead.
    """

    __slots__ = ("__weakref__", "_core")

    _right_form = "'async with db.transaction() as tx:'"

    def __init__(
        self,
        source: Source,
        *,
        isolation: str | None = None,
        readonly: bool = False,
        deferrable: bool = False,
        parent: Transaction | None = None,
    ) -> None:
        if isolation is not None and isolation not in ISOLATION_LEVELS:
            raise ConfigurationError(
                f"isolation must be one of {', '.join(map(repr, ISOLATION_LEVELS))} or None (the "
                f"server's default), not {isolation!r}"
            )
        self._core: _Core = _Core(
            source, parent._core if parent is not None else None, isolation, readonly, deferrable
        )

    @property
    def bridge(self) -> Bridge:
        return self._core.source.bridge

    @property
    def state(self) -> str:
        """``'new'``, ``'active'``, ``'committed'``, ``'rolled back'`` or ``'lost'`` (the connection
        broke; the server rolled the transaction back)."""
        return self._core.state

    @property
    def is_savepoint(self) -> bool:
        return self._core.parent is not None

    def __repr__(self) -> str:
        kind = "savepoint" if self._core.parent is not None else "Transaction"
        return f"<{kind} {self._core.state} on {self._core.source!r}>"

    # -- entering and leaving -----------------------------------------------------------------------

    async def _begin(self, owner: Owner) -> Transaction:
        """Pin a connection (or take the enclosing transaction's) and BEGIN (or SAVEPOINT)."""
        await self._core.begin(self, owner)
        return self

    async def _end(self, error: BaseException | None) -> None:
        """COMMIT when *error* is None (RELEASE for a savepoint), else ROLLBACK; return the connection."""
        await self._core.end(error)

    __enter__, __exit__, __aenter__, __aexit__ = twin_contexts(_begin, _end)

    def transaction(self) -> Transaction:
        """A savepoint inside this transaction: use it in a ``with`` (or ``async with``) block. It
        releases when its block ends normally and rolls back to the savepoint when it raises, leaving
        the enclosing transaction usable."""
        return Transaction(self._core.source, parent=self)

    # -- statements: one implementation each (loopbridge._queries), on the pinned connection ---------

    def _lease(self, *, callers_code: bool = False) -> _Step:
        return _Step(self._core, "callers" if callers_code else "sql")

    @property
    def _command_timeout(self) -> float | None:
        return self._core.source.command_timeout

    fetch, afetch = twins(Queries._fetch, owner="Transaction")
    fetchrow, afetchrow = twins(Queries._fetchrow, owner="Transaction")
    fetchval, afetchval = twins(Queries._fetchval, owner="Transaction")
    execute, aexecute = twins(Queries._execute, owner="Transaction")
    executemany, aexecutemany = twins(Queries._executemany, owner="Transaction")
    run, arun = twins(Queries._run, owner="Transaction")

    # -- for streams (see StreamMethods) -------------------------------------------------------------

    def _streaming_transaction(self) -> tuple[_Core, bool]:
        # A stream inside a transaction declares its cursor in it: no transaction of its own.
        return self._core, False


class _Pin:
    """The connection held on the bridge loop for a transaction and its savepoints, and what is known of
    the transaction on it."""

    __slots__ = ("con", "doubt", "held", "lost")

    def __init__(self, held: Held) -> None:
        self.held = held
        self.con: PoolConnectionProxy = held.con
        self.lost = False
        # Why the server may have aborted the transaction: a statement in it raised (any error from the
        # server aborts it) or the caller's own function ran on the connection (it may have caught such
        # an error itself); None once a statement has succeeded since. A COMMIT of an aborted
        # transaction is answered with ROLLBACK, without an error: see _Core.end.
        self.doubt: BaseException | None = None

    def turn(self) -> contextlib.AbstractAsyncContextManager[object]:
        """The connection to ourselves for one step (a statement, BEGIN, COMMIT)."""
        turn: contextlib.AbstractAsyncContextManager[object] = self.held.turn()
        return turn

    def check_lost(self) -> bool:
        """True (and remembered) once the connection is gone."""
        if not self.lost:
            self.lost = self.held.gone()
        return self.lost


class _Core:
    """The bridge loop's side of a transaction or a savepoint. Touched only on the bridge loop."""

    __slots__ = (
        "deferrable",
        "dependents",
        "finalizer",
        "isolation",
        "parent",
        "pin",
        "readonly",
        "rolling_back",
        "source",
        "state",
        "watch",
        "why",
        "xact",
    )

    def __init__(
        self, source: Source, parent: _Core | None, isolation: str | None, readonly: bool, deferrable: bool
    ) -> None:
        self.source = source
        self.parent = parent
        self.isolation = isolation
        self.readonly = readonly
        self.deferrable = deferrable
        self.state: _State = "new"
        self.rolling_back = False  # ending with a ROLLBACK: what lives inside may be cut short
        self.why = ""  # how it ended, for TransactionClosedError
        self.pin: _Pin | None = None
        self.xact: _AsyncpgTransaction | None = None
        self.dependents: list[Dependent] = []
        self.watch: OwnerWatch | None = None
        self.finalizer: Finalizer | None = None

    @property
    def kind(self) -> str:
        return "savepoint" if self.parent is not None else "transaction"

    def __repr__(self) -> str:
        return f"<{self.kind} {self.state} on {self.source!r}>"

    async def begin(self, handle: object, owner: Owner | None) -> None:
        """BEGIN on a newly pinned connection, or SAVEPOINT on the enclosing transaction's.

        *owner* None: the caller watches the owner itself (a stream's own transaction).
        """
        if self.state != "new":
            raise TransactionClosedError(
                f"this {self.kind} was already entered once ({self.state}); a Transaction is used for one "
                "block: call db.transaction() (or tx.transaction()) again for a new one"
            )
        parent = self.parent
        if parent is not None:
            parent.check_usable()
            pin = parent.pin
            assert pin is not None
            async with pin.turn():
                parent.check_usable()
                xact = pin.con.transaction()
                await xact.start()
                pin.doubt = None  # SAVEPOINT succeeded: the transaction is not aborted
            self.pin, self.xact, self.state = pin, xact, "active"
            parent.dependents.append(self)
            return
        for retry in itertools.count():
            held = await self.source.hold()
            protocol = protocol_of(held.con)  # before BEGIN: a connection that dies lets go of it
            sent = sent_so_far(protocol)
            try:
                async with held.turn():
                    xact = held.con.transaction(
                        isolation=self.isolation,  # type: ignore[arg-type]  # checked in Transaction()
                        readonly=self.readonly,
                        deferrable=self.deferrable,
                    )
                    await xact.start()
            except BaseException as exc:
                dead = died_unsent(exc, protocol, sent)
                # BEGIN changes nothing, so a connection that died under it (before or after it was
                # sent: both found by the stress suite) can simply be replaced.
                lost = dead or lost_connection(exc, protocol)
                if not dead:
                    # BEGIN failed or was interrupted (a timeout): whether the server began the
                    # transaction is unknown, and asyncpg still counts it as open. Discard the
                    # connection rather than pool it (the server rolls back with the session).
                    held.discard()
                await held.release()
                if lost and held.replaceable and retry < DEAD_CONNECTION_RETRIES:
                    continue
                if lost:
                    raise ConnectionLostError(
                        f"could not begin the {self.kind}: its connection was lost during BEGIN "
                        f"({type(exc).__name__}), {retry + 1} time(s). Nothing was done; try again"
                    ) from exc
                raise
            break
        self.pin, self.xact, self.state = _Pin(held), xact, "active"
        if owner is not None:
            self.watch = OwnerWatch(self, owner)
            self.finalizer = guard(handle, self.source.bridge, self, "a transaction")

    def check_usable(self) -> None:
        """:raises TransactionClosedError: unless statements may run now."""
        if self.state != "active":
            if self.state == "new":
                raise TransactionClosedError(
                    f"this {self.kind} has not begun: use it in a block, "
                    "'with db.transaction() as tx:' (or 'async with db.transaction() as tx:')"
                )
            raise TransactionClosedError(f"this {self.kind} has ended: {self.why}")
        if self.pin is not None and self.pin.lost:
            raise self._gone()

    def statement(self, *, kind: _StatementKind = "sql", check_first: bool = True) -> _Step:
        """``async with core.statement() as con``: the pinned connection for one statement, once the
        statements before it are done (see :class:`_Step`)."""
        return _Step(self, kind, check_first)

    def _gone(self, *, committing: bool = False) -> Exception:
        """The error for a transaction whose connection is gone: closing the Database ends connections
        still in use after its timeout, and then that is the reason to give."""
        if self.source.closed:
            return DatabaseClosedError(
                f"this {self.kind} was open when its Database was closed, and its connection was ended: "
                "the server rolled it back. Nothing it did was committed"
            )
        return TransactionClosedError(_lost_message(self.kind, committing=committing))

    def _lost_during(self, exc: BaseException, *, committing: bool) -> str:
        detail = self.source.redact(str(exc) or type(exc).__name__)
        if committing:
            return (
                f"the connection of this {self.kind} was lost while its COMMIT was on the way "
                f"({type(exc).__name__}: {detail}): the outcome is unknown, the server may have committed "
                "just before. Check before doing the work again (unique keys make a retry safe)"
            )
        return (
            f"the connection of this {self.kind} was lost during a statement ({type(exc).__name__}: "
            f"{detail}): the server rolled the transaction back, nothing it did was committed. Begin a new "
            "transaction and do the work again"
        )

    def is_lost(self) -> bool:
        """Whether the transaction's connection is known to be gone."""
        return self.pin is not None and self.pin.lost

    def add_dependent(self, dependent: Dependent) -> None:
        self.check_usable()
        self.dependents.append(dependent)

    def remove_dependent(self, dependent: Dependent) -> None:
        with contextlib.suppress(ValueError):
            self.dependents.remove(dependent)

    async def end(self, error: BaseException | None) -> None:
        """Commit (error None) or roll back; give the connection back. Idempotent.

        :raises TransactionClosedError: when committing a transaction whose connection was lost, or one
            that had failed: a statement in it raised and the error was caught inside the block. The
            server had aborted it, so it is rolled back instead (a savepoint to its start).
        :raises: asyncpg's error when COMMIT fails (a serialization failure, a deferred constraint):
            the server rolled the transaction back.
        """
        if self.state != "active":
            return
        self.rolling_back = error is not None
        # What lives inside ends first: a savepoint or a stream left open (the innermost first).
        for dependent in reversed(list(self.dependents)):
            await dependent._abandon_on_bridge(f"its enclosing {self.kind} ended")
        pin, xact = self.pin, self.xact
        assert pin is not None
        assert xact is not None
        commit = error is None
        failure: BaseException | None = None  # what had aborted a transaction the block meant to commit
        try:
            async with pin.turn():
                if pin.check_lost():
                    self._ended("lost", "its connection was lost; the server rolled it back")
                    if commit:
                        raise self._gone(committing=True)
                    return
                if commit and pin.doubt is not None:
                    failure = await self._aborted_by(pin)
                    commit = failure is None
                protocol = protocol_of(pin.con)
                sent = sent_so_far(protocol)
                try:
                    if commit:
                        await xact.commit()
                    else:
                        await xact.rollback()
                except BaseException as exc:
                    if commit and died_unsent(exc, protocol, sent):
                        # The connection was gone before COMMIT was sent (asyncpg: "cannot switch to
                        # state 15", found by the stress suite): certainly not committed.
                        self._ended("lost", "its connection was lost; the server rolled it back")
                        raise self._gone(committing=True) from exc
                    if _connection_failure(exc, pin):
                        # The server ends the transaction with the session. A COMMIT that was sent has
                        # an unknown outcome then (the server may have committed just before).
                        self._ended("lost", "its connection was lost during COMMIT or ROLLBACK")
                        if commit:
                            raise ConnectionLostError(self._lost_during(exc, committing=True)) from exc
                        return
                    if pin.check_lost():  # lost while interrupted (a timeout, a cancellation)
                        self._ended("lost", "its connection was lost during COMMIT or ROLLBACK")
                        if commit:
                            raise
                        return
                    if commit:
                        self._ended("rolled back", "its COMMIT failed, and the server rolled it back")
                    else:
                        self._ended("lost", "its ROLLBACK failed; the connection is discarded")
                    raise
                pin.doubt = None  # COMMIT, RELEASE or ROLLBACK (TO SAVEPOINT) succeeded: not aborted now
                if commit:
                    self._ended("committed", "it was committed")
                elif failure is not None:
                    self._ended(
                        "rolled back",
                        "it was rolled back at the end of its block, because a statement in it had failed",
                    )
                    raise TransactionClosedError(self._failed_message(failure)) from _cause(failure)
                else:
                    self._ended("rolled back", f"it was rolled back after {type(error).__name__}")
        finally:
            await self._let_go()

    async def _aborted_by(self, pin: _Pin) -> BaseException | None:
        """What aborted the transaction (``pin.doubt``) if the server has aborted it, else None.

        Asks the server, which refuses every statement in an aborted transaction: one round trip, only
        for a transaction in which a statement raised or the caller's own function ran (the protocol's
        transaction status that says it at no cost is not public in asyncpg).
        """
        doubt = pin.doubt
        try:
            await pin.con.execute("SELECT 1")
        except asyncpg.InFailedSQLTransactionError:
            return doubt
        except BaseException as exc:
            if _connection_failure(exc, pin) or pin.check_lost():  # COMMIT was not sent: none happened
                self._ended("lost", "its connection was lost; the server rolled it back")
                raise self._gone(committing=True) from exc
            raise
        pin.doubt = None
        return None

    def _failed_message(self, failure: BaseException) -> str:
        if isinstance(failure, _CallersCode):
            what = "a statement your function ran in tx.run() had failed, and the function caught the error"
        elif isinstance(failure, asyncio.CancelledError):
            what = (
                "a statement in it was cancelled (its timeout= expired, or its caller was interrupted), "
                "and the error was caught inside the block"
            )
        else:
            first_line = (str(failure) or type(failure).__name__).splitlines()[0]  # not DETAIL: data
            detail = self.source.redact(first_line)
            what = (
                f"a statement in it had failed ({type(failure).__name__}: {detail}), and the error was "
                "caught inside the block"
            )
        if self.parent is None:
            verb, outcome = "commit", "it was rolled back instead: nothing it did was kept"
        else:
            verb, outcome = (
                "be released",
                "it was rolled back to its start instead: nothing done in it was kept, and the enclosing "
                "transaction is usable again",
            )
        return (
            f"this {self.kind} could not {verb}: {what}. PostgreSQL aborts a transaction on any error, so "
            f"{outcome}. Let such an error propagate out of the block (which rolls back), or run the "
            "statement that may fail in a savepoint of its own: 'with tx.transaction():' (or 'async with "
            "tx.transaction():') around it"
        )

    async def _abandon_on_bridge(self, why: str) -> None:
        """Roll back a transaction its owner left open (see loopbridge._owner)."""
        if self.state != "active":
            return
        logger.warning("%r: %s; rolling it back and returning its connection", self, why)
        self.why = f"it was rolled back because {why}"
        try:
            await self.end(_Abandoned(why))
        except Exception:
            logger.exception("%r: error while rolling back an abandoned %s", self, self.kind)

    def _ended(self, state: _State, why: str) -> None:
        self.state = state
        if not self.why:
            self.why = why

    async def _let_go(self) -> None:
        if self.state == "active":  # ending failed halfway (cancelled): never reuse it
            self._ended("lost", "it was interrupted while ending")
        parent = self.parent
        if parent is not None:
            parent.remove_dependent(self)
            return
        if self.watch is not None:
            self.watch.cancel()
        if self.finalizer is not None:
            self.finalizer.detach()
        pin = self.pin
        assert pin is not None
        if self.state == "lost" and not pin.check_lost():
            # Its ROLLBACK failed or was interrupted: the session's state is unknown, so it must not go
            # back into the pool as it is (closing it ends the transaction on the server).
            pin.held.discard()
        try:
            await pin.held.release()
        except Exception as exc:  # a pool closed meanwhile; asyncpg has discarded the connection
            logger.debug("%r: releasing its connection failed: %r", self, exc)


class _Step:
    """``async with core.statement() as con``: the pinned connection for one statement (a lease, in
    the terms of ``loopbridge._queries``, that never allows running a statement again elsewhere).

    *kind* says what the statement's success tells about the transaction (see ``_Pin.doubt``):
    ``"sql"``, that the server has not aborted it; ``"callers"`` (the caller's own function, in
    ``tx.run``), nothing, and it may have caught a failed statement itself; ``"close"`` (closing a
    cursor, which the server does in an aborted transaction too), nothing.

    *check_first*: refuse at once when the connection is known to be lost. A stream's fetch goes ahead
    instead, so that asyncpg refuses it (on the client) and its error, saying what it saw, becomes the
    cause of the stream's.
    """

    __slots__ = ("_check_first", "_core", "_kind", "_pin", "_turn")

    #: A statement of a transaction never runs again on another connection.
    unsent = False

    def __init__(self, core: _Core, kind: _StatementKind, check_first: bool = True) -> None:
        self._core = core
        self._kind = kind
        self._check_first = check_first

    async def __aenter__(self) -> PoolConnectionProxy:
        core = self._core
        core.check_usable()
        pin = core.pin
        assert pin is not None
        self._pin: _Pin = pin
        self._turn = pin.turn()
        await self._turn.__aenter__()
        try:
            core.check_usable()  # it may have ended while we waited
            if self._check_first and pin.check_lost():
                raise core._gone()
        except BaseException:
            await self._turn.__aexit__(None, None, None)
            raise
        return pin.con

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        pin, core = self._pin, self._core
        try:
            if exc is None:
                if self._kind == "sql":
                    pin.doubt = None
                elif self._kind == "callers":
                    pin.doubt = _CallersCode()
                return
            pin.doubt = exc
            if isinstance(exc, (asyncpg.InterfaceError, asyncpg.InternalClientError)):
                # The connection was already gone when the statement began (its backend terminated
                # while the transaction sat between statements): asyncpg says so in its own terms
                # ("cannot switch to state 12; another operation (2) is in progress"), found by the
                # stress suite. The statement never ran; the transaction is lost.
                if pin.check_lost():
                    raise core._gone() from exc
                return
            if _connection_failure(exc, pin):
                # The statement was running when the connection broke: asyncpg says so in one of its
                # many ways; the caller gets the one loopbridge error for it, as for plain calls.
                raise ConnectionLostError(core._lost_during(exc, committing=False)) from exc
        finally:
            await self._turn.__aexit__(None, None, None)


def _connection_failure(exc: BaseException, pin: _Pin) -> bool:
    """asyncpg's (or the socket's) way of saying the connection broke, as opposed to a SQL error or a
    statement timeout (which leaves the connection open: asyncpg cancels the statement on the server).

    asyncpg may raise before it has seen the socket close (the server's FATAL came first: found by the
    stress suite), so its connection errors count as such whatever the connection says; its
    InterfaceError and InternalClientError also mean misuse ("another operation is in progress"), so
    they count only when the connection is indeed gone.
    """
    if not is_connection_failure(exc):
        return False
    if isinstance(exc, (asyncpg.InterfaceError, asyncpg.InternalClientError)):
        return pin.check_lost()
    pin.lost = True
    return True


class _Abandoned(Exception):
    """The reason handed to end() when a transaction is rolled back for an owner that went away."""


class _CallersCode(Exception):
    """The doubt ``tx.run()`` leaves: the caller's function may have caught an error of a statement."""


def _cause(failure: BaseException) -> BaseException | None:
    # The error that failed the transaction, as the cause of the error that says so; a cancellation
    # or our own marker tells nothing more than the message.
    return None if isinstance(failure, (_CallersCode, asyncio.CancelledError)) else failure


def _lost_message(kind: str, *, committing: bool = False) -> str:
    action = "cannot commit" if committing else "cannot run statements any more"
    return (
        f"this {kind} {action}: its connection to the server was lost, and the server rolled the "
        "transaction back. Nothing it did was committed: begin a new transaction and do the work again"
    )
