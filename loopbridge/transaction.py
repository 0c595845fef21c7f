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

**Every wait on the server is bounded.** BEGIN, ROLLBACK, savepoints and the end-of-block checks wait
at most the source's ``round_trip_timeout``; COMMIT what is left of the block's ``timeout=``, or
``round_trip_timeout`` for a block without one. A connection that does not answer in time is terminated
(the server rolls back, and nothing is left ``idle in transaction`` by us) and its slot freed. A
block's ``timeout=`` (or the Database's ``transaction_timeout``) bounds the whole block, from waiting for
a connection to COMMIT: when it expires, the statement running then is cancelled and the transaction
rolled back on the bridge loop at once, whatever the caller is doing meanwhile (see ``_Core._expire``);
its connection goes back to the pool. The server enforces it too: such a transaction sets
``idle_in_transaction_session_timeout`` for itself, so a partition that keeps our ROLLBACK from reaching
the server still ends it there.

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
import functools
import itertools
import logging
import math
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from asyncpg.transaction import Transaction as _AsyncpgTransaction

from ._asyncpg import protocol_of, sent_so_far
from ._copy import CopyMethods
from ._dead import DEAD_CONNECTION_RETRIES, died_unsent, is_connection_failure, lost_connection
from ._limits import seconds
from ._owner import Finalizer, Owner, OwnerWatch, guard
from ._queries import Queries
from ._stream import StreamMethods
from ._twins import NotAwaitable, twin_contexts, twins
from ._within import within
from .errors import (
    CallTimeoutError,
    ConfigurationError,
    ConnectionLostError,
    DatabaseClosedError,
    TransactionClosedError,
    TransactionTimeoutError,
)

if TYPE_CHECKING:
    from ._source import Held, Source
    from .bridge import Bridge

__all__ = ["Transaction"]

logger = logging.getLogger("loopbridge")

ISOLATION_LEVELS = ("read_committed", "read_uncommitted", "repeatable_read", "serializable")

_State = Literal["new", "active", "committed", "rolled back", "lost"]
_StatementKind = Literal["sql", "callers", "close"]

T = TypeVar("T")

#: A BEGIN the server did not answer in time is tried once more on another connection (BEGIN changes
#: nothing); a second silent one says the network is gone, not one connection.
UNANSWERED_BEGIN_RETRIES = 1
#: Seconds the server allows a transaction with a timeout to sit idle beyond what is left of its
#: timeout, before it ends the session itself (``idle_in_transaction_session_timeout``).
SERVER_MARGIN = 1.0


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
    :raises TransactionTimeoutError: once the block's ``timeout=`` expired: from the statement running
        then, every later one, and the end of a block that would have committed (rolled back at the
        expiry, on the bridge loop).
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
        timeout: float | None = None,
    ) -> None:
        if isolation is not None and isolation not in ISOLATION_LEVELS:
            raise ConfigurationError(
                f"isolation must be one of {', '.join(map(repr, ISOLATION_LEVELS))} or None (the "
                f"server's default), not {isolation!r}"
            )
        # None: the source's default (the Database's transaction_timeout); inf: none at all.
        bound = seconds("timeout", source.transaction_timeout if timeout is None else timeout)
        self._core: _Core = _Core(
            source, parent._core if parent is not None else None, isolation, readonly, deferrable, bound
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

    @property
    def timeout(self) -> float | None:
        """Seconds the whole block may take (None: unbounded); a savepoint has its transaction's."""
        core = self._core
        while core.parent is not None:
            core = core.parent
        return core.timeout

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

    __slots__ = ("con", "doubt", "held", "lost", "running")

    def __init__(self, held: Held) -> None:
        self.held = held
        self.con: PoolConnectionProxy = held.con
        self.lost = False
        # Why the server may have aborted the transaction: a statement in it raised (any error from the
        # server aborts it) or the caller's own function ran on the connection (it may have caught such
        # an error itself); None once a statement has succeeded since. A COMMIT of an aborted
        # transaction is answered with ROLLBACK, without an error: see _Core.end.
        self.doubt: BaseException | None = None
        # The task whose step has the connection now: what the block's timeout cancels.
        self.running: asyncio.Task[object] | None = None

    def turn(self) -> _Turn:
        """The connection to ourselves for one step (a statement, BEGIN, COMMIT)."""
        return _Turn(self)

    def check_lost(self) -> bool:
        """True (and remembered) once the connection is gone."""
        if not self.lost:
            self.lost = self.held.gone()
        return self.lost


class _Turn:
    """``async with pin.turn():`` the held connection's turn, noting which task has it."""

    __slots__ = ("_pin", "_turn")

    def __init__(self, pin: _Pin) -> None:
        self._pin = pin
        self._turn: contextlib.AbstractAsyncContextManager[object] = pin.held.turn()

    async def __aenter__(self) -> None:
        await self._turn.__aenter__()
        self._pin.running = asyncio.current_task()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._pin.running = None
        await self._turn.__aexit__(None, None, None)


class _Unanswered(Exception):
    """A round trip of a transaction's own that the server did not answer within its bound: the
    connection was discarded (terminated)."""

    def __init__(self, what: str, bound: float) -> None:
        super().__init__(f"the server did not answer {what} within {bound:g} s")
        self.what = what
        self.bound = bound


async def _round_trip(
    pin: _Pin | Held,
    what: str,
    bound: float | None,
    operation: Callable[[], Awaitable[T]],
    *,
    silence: bool = True,
) -> T:
    """``await operation()`` within *bound* seconds; past it, the connection is taken for dead: its
    turn's task stops waiting, the connection is terminated (the server rolls back whatever it was in;
    its slot is free at once) and :class:`_Unanswered` raised.

    *silence*: an answer missing after *bound* (``round_trip_timeout``) says that the network or the
    server went silent, which the source logs and acts on (it replaces its idle connections too). False
    when *bound* is the caller's own timeout: a COMMIT that outlives what is left of a transaction's
    ``timeout=`` is slow work (a deferred check, a synchronous standby), not a silent network."""
    try:
        async with within(bound) as limit:
            return await operation()
    except (asyncio.TimeoutError, TimeoutError):
        if not limit.expired():
            raise
    held = pin.held if isinstance(pin, _Pin) else pin
    assert bound is not None
    held.discard(what if silence else None)
    if isinstance(pin, _Pin):
        pin.lost = True
    raise _Unanswered(what, bound)


class _Core:
    """The bridge loop's side of a transaction or a savepoint. Touched only on the bridge loop."""

    __slots__ = (
        "deadline",
        "deferrable",
        "dependents",
        "ending",
        "expired",
        "expiry",
        "finalizer",
        "isolation",
        "parent",
        "pin",
        "readonly",
        "rolling_back",
        "source",
        "state",
        "timeout",
        "watch",
        "why",
        "xact",
    )

    def __init__(
        self,
        source: Source,
        parent: _Core | None,
        isolation: str | None,
        readonly: bool,
        deferrable: bool,
        timeout: float | None = None,
    ) -> None:
        self.source = source
        self.parent = parent
        self.isolation = isolation
        self.readonly = readonly
        self.deferrable = deferrable
        self.timeout = timeout if parent is None else None  # a savepoint keeps its transaction's
        self.deadline: float | None = None  # the loop's time when the timeout expires
        self.expiry: asyncio.TimerHandle | None = None
        self.expired = False  # the block's timeout expired: rolled back, or being rolled back
        self.ending: asyncio.Future[None] | None = None  # set while end() runs: a second one waits
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
                try:
                    await _round_trip(pin, "SAVEPOINT", self.source.round_trip_timeout, xact.start)
                except _Unanswered as exc:
                    raise parent._gone() from exc
                except asyncio.CancelledError:
                    if parent._root_expired() and _only_ours():  # cut off by the block's timeout
                        raise parent.timeout_error("could not begin a savepoint") from None
                    raise
                pin.doubt = None  # SAVEPOINT succeeded: the transaction is not aborted
            self.pin, self.xact, self.state = pin, xact, "active"
            parent.dependents.append(self)
            return
        loop = asyncio.get_running_loop()
        if self.timeout is not None:
            self.deadline = loop.time() + self.timeout
        try:
            # The block's timeout bounds its beginning too: waiting for a connection, and BEGIN.
            async with within(self.timeout) as bound:
                held, xact = await self._begin_on_a_connection()
        except (asyncio.TimeoutError, TimeoutError):
            if not bound.expired():  # a PoolTimeoutError, say: it tells what expired
                raise
            raise TransactionTimeoutError(
                f"could not begin the {self.kind} within its timeout={self.timeout:g} s (waiting for a "
                "connection, or for BEGIN); nothing was done. Try again, or raise the timeout"
            ) from None
        self.pin, self.xact, self.state = _Pin(held), xact, "active"
        if self.deadline is not None:
            self.expiry = loop.call_at(self.deadline, self._expire)
        if owner is not None:
            self.watch = OwnerWatch(self, owner)
            self.finalizer = guard(handle, self.source.bridge, self, "a transaction")

    async def _begin_on_a_connection(self) -> tuple[Held, _AsyncpgTransaction]:
        """A held connection with BEGIN done on it (and, for a block with a timeout, the server's own
        bound on its idle time: see the module docstring)."""
        unanswered = 0
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
                    await _round_trip(held, "BEGIN", self.source.round_trip_timeout, xact.start)
                    if self.timeout is not None:
                        bound_it = functools.partial(self._server_bound, held.con)
                        await _round_trip(held, "BEGIN", self.source.round_trip_timeout, bound_it)
            except _Unanswered as exc:
                # A silent connection (discarded already): BEGIN changes nothing, so another one may
                # serve; a second silent one means the network, not the connection.
                await held.release()
                unanswered += 1
                if unanswered <= UNANSWERED_BEGIN_RETRIES and held.replaceable:
                    continue
                raise ConnectionLostError(
                    f"could not begin the {self.kind}: {exc} on {unanswered} connection(s) (they were "
                    "terminated). Nothing was done. Check the network between here and the server, then "
                    "try again"
                ) from None
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
            return held, xact
        raise AssertionError("unreachable")  # pragma: no cover

    async def _server_bound(self, con: PoolConnectionProxy) -> None:
        """Have the server end the transaction itself if it sits idle past the block's timeout: our
        ROLLBACK may not reach it (a partition), and a session idle in transaction holds its locks."""
        assert self.timeout is not None
        milliseconds = max(1, math.ceil((self.timeout + SERVER_MARGIN) * 1000))
        # Local to the transaction (is_local): it ends with it, whatever ends it.
        await con.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', $1, true)", str(milliseconds)
        )

    def _expire(self) -> None:
        """The block's timeout expired (a timer on the bridge loop): cancel the step running now, and roll
        back at once, without waiting for the caller. Nothing if the block is ending already (a COMMIT
        under way is bounded by the same deadline)."""
        self.expiry = None
        if self.state != "active" or self.ending is not None:
            return
        self.expired = True
        pin = self.pin
        if pin is not None and pin.running is not None:
            pin.running.cancel()
        logger.debug("%r: its timeout=%g s expired; rolling it back", self, self.timeout)
        task = asyncio.get_running_loop().create_task(self.end(_Expired()))
        task.add_done_callback(_retrieve)

    def timeout_error(self, action: str) -> TransactionTimeoutError:
        root = self
        while root.parent is not None:
            root = root.parent
        return TransactionTimeoutError(
            f"this {self.kind} {action}: the timeout={root.timeout:g} s of its transaction expired, and it "
            "was rolled back. Nothing it did was committed: begin a new transaction (with a longer timeout=, "
            "or less work in it)"
        )

    def check_usable(self) -> None:
        """:raises TransactionClosedError: unless statements may run now (:class:`TransactionTimeoutError`
        once the block's timeout expired)."""
        if self._root_expired():
            raise self.timeout_error("cannot run statements any more")
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

    def _root_expired(self) -> bool:
        core: _Core | None = self
        while core is not None:
            if core.expired:
                return True
            core = core.parent
        return False

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
        ending = self.ending
        if ending is not None:  # an end under way (the timeout's rollback): this one waits for it
            await asyncio.shield(ending)
        if self.state != "active":
            if error is None and self._root_expired():  # the block meant to commit
                raise self.timeout_error("could not commit")
            return
        self.ending = asyncio.get_running_loop().create_future()
        try:
            await self._end(error)
        finally:
            self.ending.set_result(None)

    async def _end(self, error: BaseException | None) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        self.rolling_back = error is not None
        # What lives inside ends first: a savepoint or a stream left open (the innermost first).
        for dependent in reversed(list(self.dependents)):
            await dependent._abandon_on_bridge(f"its enclosing {self.kind} ended")
        pin, xact = self.pin, self.xact
        assert pin is not None
        assert xact is not None
        commit = error is None and not self._root_expired()
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
                loop = asyncio.get_running_loop()
                if commit and self.deadline is not None and loop.time() >= self.deadline:
                    # Out of time before COMMIT was sent: roll back, and then nothing was committed.
                    self.expired = True
                    commit = False
                protocol = protocol_of(pin.con)
                sent = sent_so_far(protocol)
                round_trip = self.source.round_trip_timeout
                # COMMIT gets what is left of the block's timeout (it may legitimately take a while:
                # deferred constraints, a synchronous standby), else round_trip_timeout like the rest.
                bound = round_trip if self.deadline is None else max(0.0, self.deadline - loop.time())
                try:
                    if commit:
                        await _round_trip(pin, "COMMIT", bound, xact.commit, silence=self.deadline is None)
                    else:
                        await _round_trip(pin, "ROLLBACK", round_trip, xact.rollback)
                except _Unanswered as exc:
                    # Terminated: the server rolls back, unless a COMMIT it received had committed.
                    if not commit:
                        self._ended(
                            "lost", f"{exc}; its connection was terminated (the server rolls it back)"
                        )
                        return
                    self._ended("lost", f"{exc}; its connection was terminated")
                    raise self._commit_unanswered(exc) from None
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
                elif self._root_expired():
                    self._ended("rolled back", "it was rolled back because its timeout expired")
                    if error is None:
                        raise self.timeout_error("could not commit")
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

    def _commit_unanswered(self, exc: _Unanswered) -> Exception:
        """The error for a COMMIT that was sent and not answered in time: its outcome is unknown."""
        unknown = (
            "its connection was terminated, and the outcome is unknown: the server may have committed just "
            "before. Check before doing the work again (unique keys make a retry safe)"
        )
        if self.deadline is not None:  # COMMIT had what was left of the block's timeout
            return CallTimeoutError(
                f"the timeout={self.timeout:g} s of this {self.kind} expired during its COMMIT: {unknown}"
            )
        return ConnectionLostError(
            f"the COMMIT of this {self.kind} was not answered within round_trip_timeout={exc.bound:g} s: "
            f"{unknown}"
        )

    async def _aborted_by(self, pin: _Pin) -> BaseException | None:
        """What aborted the transaction (``pin.doubt``) if the server has aborted it, else None.

        Asks the server, which refuses every statement in an aborted transaction: one round trip, only
        for a transaction in which a statement raised or the caller's own function ran (the protocol's
        transaction status that says it at no cost is not public in asyncpg).
        """
        doubt = pin.doubt
        try:
            await _round_trip(pin, "a check before COMMIT", self.source.round_trip_timeout, self._ask)
        except asyncpg.InFailedSQLTransactionError:
            return doubt
        except _Unanswered as exc:  # COMMIT was not sent: none happened
            self._ended("lost", f"{exc}; its connection was terminated (the server rolls it back)")
            raise self._gone(committing=True) from None
        except BaseException as exc:
            if _connection_failure(exc, pin) or pin.check_lost():  # COMMIT was not sent: none happened
                self._ended("lost", "its connection was lost; the server rolled it back")
                raise self._gone(committing=True) from exc
            raise
        pin.doubt = None
        return None

    async def _ask(self) -> None:
        assert self.pin is not None
        await self.pin.con.execute("SELECT 1")

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
            if isinstance(exc, asyncio.CancelledError) and core._root_expired() and _only_ours():
                # The block's timeout cancelled this statement (_Core._expire), not the caller.
                pin.doubt = exc
                raise core.timeout_error("was cut off while this statement ran") from None
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


class _Expired(Exception):
    """The reason handed to end() when a transaction is rolled back because its timeout expired."""


def _only_ours() -> bool:
    """Whether the running task's cancellation was the block's timeout's alone (Python 3.11+ can tell:
    a call's own timeout, or its caller, cancelling at the same moment is then left to report itself),
    and consume it."""
    task = asyncio.current_task()
    uncancel = getattr(task, "uncancel", None)
    return uncancel is None or uncancel() == 0


def _retrieve(task: asyncio.Task[None]) -> None:
    # The rollback of an expired transaction: end() logs nothing it cannot report; keep asyncio quiet.
    if not task.cancelled():
        task.exception()


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
