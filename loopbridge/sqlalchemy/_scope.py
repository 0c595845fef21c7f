"""The session scope: an ``AsyncSession`` that lives on the bridge loop, for one caller's block.

Both session facades (``session.py``) are this class with their methods derived from its coroutines;
everything a scope does is written here once: its calls, taken in turn on the bridge loop; the methods
that need no database, run in the caller's thread when nothing holds the session on the bridge; its
opening and end; and its end by a closing engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

import sqlalchemy.exc
from sqlalchemy.engine import Row, ScalarResult
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.sql.base import Executable
from sqlalchemy.util import greenlet_spawn

from loopbridge._loop import GRACE
from loopbridge._stream import DEFAULT_PREFETCH, Producer, check_prefetch
from loopbridge.bridge import Bridge

from ._options import SessionConfig, _check_sync_fn
from ._sources import PLAIN, Plain
from .connection import Savepoint, _ScopeConnection
from .errors import EngineClosedError
from .streaming import ResultBatches, StreamResult

if TYPE_CHECKING:
    from .connection import AnyResult, Params


__all__: list[str] = []

logger = logging.getLogger("loopbridge")

R = TypeVar("R")
M = TypeVar("M")  # a mapped class
C = TypeVar("C", bound=_ScopeConnection)  # the connection facade of a session facade

_State = Literal["new", "open", "ended", "abandoned"]


class ScopeHost(Protocol):
    """What a session scope needs of its Engine (``loopbridge.sqlalchemy.engine``)."""

    _sessions: Plain
    _scopes: set[Any]

    @property
    def bridge(self) -> Bridge: ...

    def _async_engine(self) -> AsyncEngine: ...

    def _forget_scope(self, scope: Any) -> None: ...


class _Scope(Generic[C]):
    """What the two session facades share: the ``AsyncSession`` that lives on the bridge loop, each of
    its I/O methods written once (as the coroutine that runs there), and the in-memory methods.

    The facades have what an ORM user of ``AsyncSession`` reaches for. What they leave out is the
    scope's own business (``begin()``: the scope is the transaction; ``close()``, ``reset()``,
    ``invalidate()``: the scope ends the session) or would hand out objects that belong to the bridge
    loop (``sync_session``, ``bind``, ``get_bind()``, ``identity_map``, ``get_transaction()``);
    ``run_sync(fn)`` reaches all of it, with the real sync ``Session``.

    A scope is for one caller at a time, as a SQLAlchemy session is. Its calls are still serialized on
    the bridge loop, so a call that is cancelled but still unwinding never overlaps the next one; and
    the methods that need no database run in the caller's thread only while nothing holds the session on
    the bridge (otherwise they wait their turn there), so the session is never used by two threads at
    once.
    """

    _async = False  # the facade of async code
    _connection_class: type[C]

    def __init__(self, engine: ScopeHost, config: SessionConfig) -> None:
        self._engine = engine
        self._config = config
        self._source: Plain = PLAIN  # where its session's connection comes from (see _begin)
        self._pid = os.getpid()
        self._state: _State = "new"
        # Bridge-loop state, created by _begin.
        self._session: AsyncSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task[Any] | None = None  # the call using the session now
        self._streams: set[Producer[Any]] = set()  # streams whose cursors are open
        # Which side holds the session, shared by the two threads (see _claim and _in_memory): the
        # bridge (a call or the scope's end, under _lock) or the caller's thread (a method that needs
        # no database). A caller that stopped waiting for a call may go on while it still unwinds.
        self._guard = threading.Lock()
        self._bridge_holds = 0
        self._caller_holds = False
        self._caller_left: asyncio.Event | None = None  # set when the caller's thread lets go

    @property
    def bridge(self) -> Bridge:
        return self._engine.bridge

    @property
    def engine(self) -> ScopeHost:
        return self._engine

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._engine!r}, {self._state}>"

    # -- I/O: each written once, as the coroutine that runs on the bridge loop -----------------------

    async def _execute(
        self,
        /,
        statement: Executable,
        params: Params | None = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> AnyResult:
        """Execute a Core or ORM statement (``select()``, ``insert()``, ``update()``, ``text()``, ...) in the
        scope's transaction and return its buffered ``Result``, as ``AsyncSession.execute`` does.

        :param kw: ``execution_options``, ``bind_arguments``.
        :param timeout: seconds; on expiry the statement is cancelled and
            :class:`~loopbridge.CallTimeoutError` raised (the scope then rolls back when it ends).
        """
        async with self._using() as session:
            return await session.execute(statement, params, **kw)

    async def _scalar(
        self,
        /,
        statement: Executable,
        params: Params | None = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> Any:
        """Execute *statement* and return the first column of its first row, or None."""
        async with self._using() as session:
            return await session.scalar(statement, params, **kw)

    async def _scalars(
        self,
        /,
        statement: Executable,
        params: Params | None = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> ScalarResult[Any]:
        """Execute *statement* and return its first column as a buffered ``ScalarResult``
        (``.all()``, ``.first()``, ``.one()``)."""
        async with self._using() as session:
            return await session.scalars(statement, params, **kw)

    async def _exec(
        self,
        /,
        statement: Executable,
        *,
        params: Params | None = None,
        execution_options: Mapping[str, Any] | None = None,
        bind_arguments: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """SQLModel's ``session.exec(statement)``: ``session.exec(select(Hero)).all()`` gives ``Hero``
        objects, as ``sqlmodel.Session.exec`` does (a buffered ``ScalarResult`` for a ``select()`` of one
        model, a ``Result`` otherwise). Needs a scope opened with ``engine.session(class_=sqlmodel.Session)``
        (or SQLModel's ``AsyncSession``).

        :raises AttributeError: in a scope whose session class has no ``exec`` (plain SQLAlchemy).
        """
        async with self._using() as session:
            exec_ = getattr(session.sync_session, "exec", None)
            if exec_ is None:
                raise AttributeError(
                    "session.exec() is SQLModel's: open the scope with "
                    "engine.session(class_=sqlmodel.Session) (sqlmodel.ext.asyncio.session.AsyncSession "
                    "works too); with plain SQLAlchemy use "
                    "session.execute(...) or session.scalars(...)"
                )
            # As SQLModel's AsyncSession does: the rows are fetched before the result leaves the loop.
            options = {"prebuffer_rows": True, **(execution_options or {})}
            return await greenlet_spawn(
                exec_, statement, params=params, execution_options=options, bind_arguments=bind_arguments
            )

    async def _get(
        self, /, entity: type[M], ident: Any, *, timeout: float | None = None, **kw: Any
    ) -> M | None:
        """Return the instance of *entity* with primary key *ident*, or None (from the identity map when
        it is there). *kw*: ``options``, ``populate_existing``, ``with_for_update``, ..."""
        async with self._using() as session:
            return await session.get(entity, ident, **kw)

    async def _get_one(self, /, entity: type[M], ident: Any, *, timeout: float | None = None, **kw: Any) -> M:
        """Like :meth:`get`, but raise ``sqlalchemy.exc.NoResultFound`` when there is no such row."""
        async with self._using() as session:
            return await session.get_one(entity, ident, **kw)

    async def _merge(
        self, /, instance: M, *, load: bool = True, timeout: float | None = None, **kw: Any
    ) -> M:
        """Copy the state of *instance* (say, an object from another scope) into this session and
        return the session's own instance."""
        async with self._using() as session:
            return await session.merge(instance, load=load, **kw)

    async def _delete(self, instance: object, *, timeout: float | None = None) -> None:
        """Mark *instance* deleted; the DELETE is emitted at the next flush (or at commit)."""
        async with self._using() as session:
            await session.delete(instance)

    async def _refresh(
        self,
        /,
        instance: object,
        attribute_names: Iterable[str] | None = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> None:
        """Load *instance*'s attributes (or just *attribute_names*, relationships included) now: the way
        to load what lazy loading would load, before the object leaves the scope."""
        async with self._using() as session:
            await session.refresh(instance, attribute_names, **kw)

    async def _flush(self, objects: Sequence[Any] | None = None, *, timeout: float | None = None) -> None:
        """Write pending changes to the database (in the scope's transaction; nothing is committed)."""
        async with self._using() as session:
            await session.flush(objects)

    async def _commit(self, *, timeout: float | None = None) -> None:
        """Commit now. The scope goes on, in a new transaction, and still commits when it ends."""
        async with self._using() as session:
            await session.commit()

    async def _rollback(self, *, timeout: float | None = None) -> None:
        """Roll back now. The scope goes on, in a new transaction."""
        async with self._using() as session:
            await session.rollback()

    async def _run_sync(
        self, /, fn: Callable[..., R], *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> R:
        """Call ``fn(session, *args, **kwargs)`` with the scope's sync-style ``sqlalchemy.orm.Session``, on
        the bridge loop, and return its result.

        The escape hatch for existing sync ORM code: inside *fn*, lazy loading works and
        ``session.query()``, ``session.execute()`` and relationship access behave as in any sync
        SQLAlchemy program. The session is only valid inside *fn*.
        """
        _check_sync_fn(fn, f"{type(self).__name__}.run_sync()", "session")
        async with self._using() as session:
            return await session.run_sync(fn, *args, **kwargs)

    async def _connection(
        self,
        /,
        *,
        execution_options: Mapping[str, Any] | None = None,
        bind_arguments: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> C:
        """The session's connection, in the scope's transaction, begun now if it was not yet: for Core
        statements that bypass the ORM (no autoflush), and for connection-level execution options.

        *execution_options* (``isolation_level="SERIALIZABLE"``, ...) apply only if the connection
        is procured by this call, as in SQLAlchemy: call it first thing in the scope. The connection
        object follows the scope's transaction; it is valid only inside the scope.
        """
        async with self._using() as session:
            await session.connection(
                bind_arguments=dict(bind_arguments) if bind_arguments is not None else None,
                execution_options=dict(execution_options) if execution_options is not None else None,
            )
        return self._connection_class(self)

    async def _stream(
        self,
        /,
        statement: Executable,
        params: Params | None = None,
        *,
        prefetch: int = DEFAULT_PREFETCH,
        timeout: float | None = None,
        **kw: Any,
    ) -> StreamResult[Row[Any]]:
        """Execute *statement* with a server-side cursor and return its rows as a :class:`StreamResult`
        (``for row in ...`` / ``async for row in ...``), fetched *prefetch* at a time: memory stays
        bounded whatever the number of rows. ORM statements load ``yield_per=prefetch`` objects at a
        time. *kw*: ``execution_options``, ``bind_arguments``.

        :raises ConfigurationError: if *prefetch* is not a positive integer.
        """
        return await self._open_stream(statement, params, prefetch, kw)

    async def _stream_scalars(
        self,
        /,
        statement: Executable,
        params: Params | None = None,
        *,
        prefetch: int = DEFAULT_PREFETCH,
        timeout: float | None = None,
        **kw: Any,
    ) -> StreamResult[Any]:
        """Like :meth:`stream`, yielding the first column of each row (ORM objects for
        ``select(User)``)."""
        return await self._open_stream(statement, params, prefetch, kw, scalars=True)

    async def _open_stream(
        self,
        statement: Executable,
        params: Params | None,
        prefetch: int,
        kw: dict[str, Any],
        *,
        scalars: bool = False,
    ) -> StreamResult[Any]:
        check_prefetch(prefetch)
        # The ORM buffers every row of a result unless told yield_per; with it, both the ORM and the
        # cursor hold about one batch.
        options = {"yield_per": prefetch, **(kw.pop("execution_options", None) or {})}
        async with self._using() as session:
            rows = await session.stream(statement, params, execution_options=options, **kw)
        label = f"{type(self).__name__}.{'stream_scalars' if scalars else 'stream'}()"
        batches = ResultBatches(self, rows.scalars() if scalars else rows, prefetch)
        stream: StreamResult[Any] = StreamResult(batches, self.bridge, label, None)
        return await stream._opened_here()

    async def _close_streams(self, why: str) -> None:
        """Close the streams still open (before the scope takes its turn to end: they fetch in turn)."""
        for producer in list(self._streams):
            await producer._abandon_on_bridge(why)

    def begin_nested(self) -> Savepoint:
        """A SAVEPOINT: ``with session.begin_nested():`` (sync) or ``async with session.begin_nested():``.

        The block's end releases the savepoint (flushing first); an exception in the block rolls back
        to it and propagates, and the scope goes on: catch it around the block to keep what came
        before. Entering and leaving run on the bridge loop, in the scope's turn.
        """
        self._here()
        return Savepoint(self)

    # -- in memory: the facades' plain calls (session.py) run here, in the caller's thread ------------

    def _in_memory(self, name: str, op: Callable[[AsyncSession], R]) -> R:
        """``op(session)`` for a method that needs no database: in the caller's thread, unless a call of
        this scope still holds the session on the bridge loop (its caller was cancelled or timed out and
        went on while it unwinds, or another task shares the scope). Then this waits for that call and
        does *op* on the bridge loop, in turn: the session is never touched by two threads at once."""
        session = self._here()
        with self._guard:
            free = self._bridge_holds == 0
            if free:
                self._caller_holds = True
        if not free:
            label = f"{type(self).__name__}.{name}()"
            result: R = self.bridge._run(_Scope._in_turn, (self, op), None, None, label)
            return result
        try:
            return op(session)
        finally:
            with self._guard:
                self._caller_holds = False
                left, self._caller_left = self._caller_left, None
            if left is not None:  # the bridge side waits for us (see _claim)
                assert self._loop is not None
                try:
                    self._loop.call_soon_threadsafe(left.set)
                except RuntimeError:  # the bridge loop is closed, and the waiter with it
                    pass

    async def _in_turn(self, op: Callable[[AsyncSession], R]) -> R:
        async with self._using() as session:
            return op(session)

    # -- the scope ------------------------------------------------------------------------------------

    async def _begin(self, caller: object) -> None:
        """Open the scope for *caller* (its task or thread): a fresh ``AsyncSession`` on the bridge loop
        (its connection comes at the first statement)."""
        engine = self._engine._async_engine()
        source = self._engine._sessions
        await source.enter(caller)
        try:
            session = source.session(engine, self._config)
        except BaseException:
            source.leave()
            raise
        self._source = source
        session.sync_session._loopbridge_async = self._async  # type: ignore[attr-defined]
        self._session = session
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._state = "open"
        self._engine._scopes.add(self)

    async def _close(self, error: BaseException | None) -> None:
        """Leave the block (see ``SessionScope``): commit if it ended normally, else roll back."""
        if error is None:
            await self._end(commit=True)
            return
        try:
            await self._end(commit=False)
        except Exception as failure:
            # Ending a scope that is already failing: the block's own error is what the caller must
            # see, and nothing was committed either way (a failed rollback still ends the transaction).
            logger.warning("%r: could not roll back cleanly while handling an error: %s", self, failure)

    async def _end(self, commit: bool) -> None:
        """Close the scope: commit (or roll back), then close the session so its connection returns to the
        pool. It runs to completion on the bridge loop even if the caller stops waiting (a cancelled
        task, a timeout, Ctrl-C: ``twin_contexts`` shields the exit); a commit interrupted that way has an
        unknown outcome."""
        if self._state == "new":  # opening failed: nothing to end
            return
        assert self._lock is not None
        assert self._session is not None
        # The streams first: each fetches in the scope's turn, which the end is about to take.
        await self._close_streams("its session scope ended")
        async with self._lock:
            await self._claim()
            try:
                if self._state != "open":
                    if commit:
                        raise self._unusable()
                    return  # the engine closed it: nothing left to roll back
                session = self._session
                self._state = "ended"
                try:
                    if commit:
                        await session.commit()
                finally:
                    try:
                        await session.close()  # rolls back whatever was not committed
                    finally:
                        self._source.leave()
                        self._engine._forget_scope(self)
            finally:
                self._let_go()

    async def _abandon(self) -> None:
        """The engine is closing and this scope did not end in time: end it without committing."""
        assert self._lock is not None
        if self._state == "open":
            self._state = "abandoned"
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # its caller gets EngineClosedError (see _using)
        try:
            await asyncio.wait_for(self._lock.acquire(), GRACE)
        except (asyncio.TimeoutError, TimeoutError):
            locked = False
        else:
            locked = True
        try:
            await asyncio.wait_for(self._claim(), GRACE)
        except (asyncio.TimeoutError, TimeoutError):  # the caller's thread is stuck in a method
            claimed = False
        else:
            claimed = True
        try:
            # Unless its owner's own end got there first (then it ends as the owner asked).
            if self._state == "abandoned" and self._session is not None:
                self._streams = set()  # their cursors go with the connection
                try:
                    await self._source.discard(self._session)  # and the server rolls back
                finally:
                    self._source.leave()
        except Exception:
            logger.exception("%r: error while ending an abandoned session", self._engine)
        finally:
            if claimed:
                self._let_go()
            if locked:
                self._lock.release()
            self._engine._forget_scope(self)

    @asynccontextmanager
    async def _using(self) -> AsyncIterator[AsyncSession]:
        """The session, for one call at a time, on the bridge loop."""
        self._here()
        assert self._lock is not None
        async with self._lock:
            session = self._here()
            self._task = asyncio.current_task()
            try:
                await self._claim()
                try:
                    yield session
                finally:
                    self._let_go()
            except asyncio.CancelledError:
                if self._state == "abandoned":  # cancelled by Engine.close(): say so, not "cancelled"
                    raise self._unusable() from None
                raise
            finally:
                self._task = None

    async def _claim(self) -> None:
        """Take the session for the bridge side (under _lock), once the caller's thread has let go of it
        (a method that needs no database, in progress there: see _in_memory)."""
        while True:
            with self._guard:
                if not self._caller_holds:
                    self._bridge_holds += 1
                    return
                if self._caller_left is None:
                    self._caller_left = asyncio.Event()
                left = self._caller_left
            await left.wait()

    def _let_go(self) -> None:
        with self._guard:
            self._bridge_holds -= 1

    def _here(self) -> AsyncSession:
        """The session, if this scope may use it now; any thread."""
        if self._state == "open" and self._pid == os.getpid():
            assert self._session is not None
            return self._session
        raise self._unusable()

    def _unusable(self) -> Exception:
        if self._pid != os.getpid():
            return sqlalchemy.exc.InvalidRequestError(
                "this session scope was opened before os.fork(), in the parent process; its connection "
                "belongs to the parent. Open a new scope in the child"
            )
        if self._state == "abandoned":
            return EngineClosedError(
                f"{self._engine!r} was closed while this session scope was open; the scope was ended "
                "without committing"
            )
        if self._state == "new":
            return sqlalchemy.exc.InvalidRequestError(
                f"the session is not open: use it inside its block, `{self._opening()} as session: ...`"
            )
        return sqlalchemy.exc.InvalidRequestError(
            "this session scope has ended (committed or rolled back, and closed); open a new one. "
            "Objects from it can join a new scope with session.add(obj) or session.merge(obj)"
        )

    def _ended_elsewhere(self, exc: BaseException | None) -> bool:
        """At the end of the block: True if the engine already ended this scope (or it is the parent
        process's), so there is nothing to cross for. Raises if the block itself succeeded: its work was
        not committed."""
        if self._state != "abandoned" and self._pid == os.getpid():
            return False
        if exc is None:
            raise self._unusable()
        return True

    def _opening(self) -> str:
        return f"{'async with' if self._async else 'with'} engine.session()"

    def _right_form(self) -> str:
        return f"`{self._opening()} as session:` binds it; use it inside that block"
