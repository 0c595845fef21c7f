"""What a session scope hands out for its transaction: its connection (``session.connection()``) and
its savepoints (``session.begin_nested()``)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

import sqlalchemy.exc
from sqlalchemy.engine import Result, ScalarResult
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, AsyncSessionTransaction
from sqlalchemy.sql.base import Executable

from loopbridge._owner import Owner
from loopbridge._twins import twin_contexts, twins
from loopbridge.bridge import Bridge

from ._forms import NotAContext
from ._options import _check_sync_fn

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import TypeAlias

    from typing_extensions import Unpack

    #: Rows of any shape, as ``AsyncSession.execute`` returns them.
    AnyResult: TypeAlias = Result[Unpack[tuple[Any, ...]]]
    #: Statement parameters: one mapping, or a list of them for an executemany.
    Params: TypeAlias = Mapping[str, Any] | Sequence[Mapping[str, Any]]

__all__ = ["AsyncBridgedConnection", "BridgedConnection", "Savepoint"]

R = TypeVar("R")


class ScopeOfConnection(Protocol):
    """What a connection facade and a savepoint need of their session scope (see ``_scope``)."""

    @property
    def bridge(self) -> Bridge: ...

    @property
    def _async(self) -> bool: ...

    @property
    def _state(self) -> str: ...

    def _using(self) -> AbstractAsyncContextManager[AsyncSession]: ...


class _ScopeConnection(NotAContext):
    """What the two connection facades share: the session's connection, in the scope's transaction,
    each call made in the scope's turn on the bridge loop (see the scope's ``_connection``)."""

    def __init__(self, scope: ScopeOfConnection) -> None:
        self._scope = scope

    @property
    def bridge(self) -> Bridge:
        return self._scope.bridge

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._scope!r}>"

    def _right_form(self) -> str:
        call = "await session.connection()" if self._scope._async else "session.connection()"
        return f"it is the session's connection, `connection = {call}`, valid inside the session's block"

    @asynccontextmanager
    async def _on_connection(self) -> AsyncIterator[AsyncConnection]:
        """The session's connection, in the scope's turn on the bridge loop, for one call."""
        async with self._scope._using() as session:
            yield await session.connection()

    async def _execute(
        self,
        /,
        statement: Executable,
        params: Params | None = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> AnyResult:
        """Execute a Core statement on the session's connection, in its transaction, without the ORM
        (no autoflush); return its buffered ``Result``. *kw*: ``execution_options``."""
        async with self._on_connection() as connection:
            return await connection.execute(statement, params, **kw)

    async def _scalar(
        self,
        /,
        statement: Executable,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> Any:
        """Execute *statement* and return the first column of its first row, or None."""
        async with self._on_connection() as connection:
            return await connection.scalar(statement, params, **kw)

    async def _scalars(
        self,
        /,
        statement: Executable,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> ScalarResult[Any]:
        """Execute *statement* and return its first column as a buffered ``ScalarResult``."""
        async with self._on_connection() as connection:
            return await connection.scalars(statement, params, **kw)

    async def _exec_driver_sql(
        self,
        /,
        statement: str,
        parameters: Any = None,
        *,
        timeout: float | None = None,
        **kw: Any,
    ) -> AnyResult:
        """Execute a SQL string as the driver takes it (asyncpg's ``$1`` placeholders), on the session's
        connection."""
        async with self._on_connection() as connection:
            return await connection.exec_driver_sql(statement, parameters, **kw)

    async def _run_sync(
        self, /, fn: Callable[..., R], *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> R:
        """Call ``fn(connection, *args, **kwargs)`` with the sync-style ``sqlalchemy.Connection`` of the
        session, in its transaction, on the bridge loop (sync Core code, ``metadata.create_all``,
        ``pandas.DataFrame.to_sql``, ...). The connection is only valid inside *fn*."""
        _check_sync_fn(fn, f"{type(self).__name__}.run_sync()", "connection")
        async with self._on_connection() as connection:
            return await connection.run_sync(fn, *args, **kwargs)


_CONNECTIONS = ("BridgedConnection", "AsyncBridgedConnection")
_c_execute = twins(_ScopeConnection._execute, owners=_CONNECTIONS)
_c_scalar = twins(_ScopeConnection._scalar, owners=_CONNECTIONS)
_c_scalars = twins(_ScopeConnection._scalars, owners=_CONNECTIONS)
_c_exec_driver_sql = twins(_ScopeConnection._exec_driver_sql, owners=_CONNECTIONS)
_c_run_sync = twins(_ScopeConnection._run_sync, owners=_CONNECTIONS)


class BridgedConnection(_ScopeConnection):
    """``session.connection()`` of a :class:`BridgedSession`: the session's connection, in the scope's
    transaction. ``execute``, ``scalar``, ``scalars``, ``exec_driver_sql`` and ``run_sync`` block the
    calling thread while they run on the bridge loop. Valid only inside the scope."""

    execute = _c_execute[0]
    scalar = _c_scalar[0]
    scalars = _c_scalars[0]
    exec_driver_sql = _c_exec_driver_sql[0]
    run_sync = _c_run_sync[0]


class AsyncBridgedConnection(_ScopeConnection):
    """``await session.connection()`` of an :class:`AsyncBridgedSession`: the session's connection, in
    the scope's transaction. ``execute``, ``scalar``, ``scalars``, ``exec_driver_sql`` and ``run_sync``
    are awaited, from any loop, and run on the bridge loop. Valid only inside the scope."""

    execute = _c_execute[1]
    scalar = _c_scalar[1]
    scalars = _c_scalars[1]
    exec_driver_sql = _c_exec_driver_sql[1]
    run_sync = _c_run_sync[1]


class Savepoint:
    """``session.begin_nested()``: a SAVEPOINT for ``with`` (sync session) or ``async with`` (async
    session). Leaving the block normally releases it (after a flush); an exception rolls back to it and
    propagates. The scope's own transaction goes on either way. Entered once."""

    def __init__(self, scope: ScopeOfConnection) -> None:
        self._scope = scope
        self._entered = False
        self._transaction: AsyncSessionTransaction | None = None  # on the bridge loop

    @property
    def bridge(self) -> Bridge:
        return self._scope.bridge

    def __repr__(self) -> str:
        state = "active" if self._transaction is not None else "ended" if self._entered else "new"
        return f"<Savepoint of {self._scope!r}, {state}>"

    async def _begin(self, owner: Owner) -> Self:
        if self._entered:
            raise sqlalchemy.exc.InvalidRequestError(
                "this savepoint was already used: call session.begin_nested() again for a new one"
            )
        self._entered = True
        async with self._scope._using() as session:
            self._transaction = await session.begin_nested()
        return self

    async def _end(self, error: BaseException | None) -> None:
        transaction, self._transaction = self._transaction, None
        if transaction is None:  # it never began
            return
        if self._scope._state != "open" and error is not None:
            return  # the scope ended under it (the engine closed): the block's error says enough
        async with self._scope._using():
            # SQLAlchemy's own end of a nested block: release, or roll back to the savepoint (also when
            # the release fails), and nothing if the block already ended it.
            await transaction.__aexit__(
                type(error) if error is not None else None,
                error,
                error.__traceback__ if error is not None else None,
            )

    __enter__, __exit__, __aenter__, __aexit__ = twin_contexts(_begin, _end)

    def __await__(self) -> Generator[Any, None, NoReturn]:
        raise TypeError(
            "a savepoint is not awaited: use 'async with session.begin_nested():' (or, in sync code, "
            "'with session.begin_nested():')"
        )
