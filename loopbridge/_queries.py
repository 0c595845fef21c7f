"""The statements (``fetch``, ``fetchrow``, ``fetchval``, ``execute``, ``executemany``, ``run``), once.

:class:`Queries` serves the :class:`~loopbridge.Database` (a pooled connection per call) and the
:class:`~loopbridge.Transaction` (its pinned connection) alike: each says only where a call's connection
comes from (``_lease``), so what a statement does and how its errors read live here, in one place. Each
class derives its public sync and async methods from these implementations with
:func:`loopbridge._twins.twins`.
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from ._call import invoke
from ._dead import DEAD_CONNECTION_RETRIES
from ._limits import check_parameters, check_rows
from ._session_state import may_change_session_state, may_drop_statements, note_change
from ._source import Lease
from ._twins import checked
from .errors import CallTimeoutError, ConnectionLostError

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["Queries"]

logger = logging.getLogger("loopbridge")

R = TypeVar("R")


def _values(label: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    # (query, *values): values too big to send are refused before they are encoded on the bridge loop.
    if len(args) > 1:
        check_parameters(label, args[1:])


def _rows(label: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    check_rows(label, args[1] if len(args) > 1 else kwargs.get("args"))


class Queries:
    """The statement methods of whatever hands out connections for calls (see the module docstring)."""

    __slots__ = ()

    @property
    def bridge(self) -> Bridge:
        """The bridge the statements run on."""
        raise NotImplementedError

    def _lease(self, *, callers_code: bool = False) -> Lease:
        """A connection for one call. *callers_code*: the caller's own function runs on it (``run``),
        which may do anything, catch a failed statement's error included."""
        raise NotImplementedError

    @property
    def _command_timeout(self) -> float | None:
        """asyncpg's ``command_timeout`` for the statements, for the message when it expires."""
        raise NotImplementedError

    @checked(_values)
    async def _fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[asyncpg.Record]:
        """Run *query* with *args* (``$1``, ``$2``, ...) and return every row as an asyncpg ``Record``.

        :param timeout: seconds for the whole call (waiting for a connection included); on expiry the
            statement is cancelled and :class:`~loopbridge.CallTimeoutError` raised.
        :raises ConnectionLostError: if the connection died during the call.
        :raises CallTimeoutError: if *timeout*, or the ``command_timeout`` option, expired.
        :raises asyncpg.DataError: for values PostgreSQL cannot take in one message (over 1 GB), in the
            caller's thread, before anything is sent (see ``loopbridge._limits``).
        """
        result: list[asyncpg.Record] = await self._statement("fetch", query, args)
        return result

    @checked(_values)
    async def _fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> asyncpg.Record | None:
        """Run *query* and return its first row, or None if it returned none."""
        result: asyncpg.Record | None = await self._statement("fetchrow", query, args)
        return result

    @checked(_values)
    async def _fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        """Run *query* and return the value of *column* in its first row, or None if no row."""
        return await self._statement("fetchval", query, args, column=column)

    @checked(_values)
    async def _execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        """Run a command and return its status (``'INSERT 0 1'``). Without *args*, *query* may hold
        several statements separated by semicolons."""
        result: str = await self._statement("execute", query, args)
        return result

    @checked(_rows)
    async def _executemany(
        self, command: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        """Run *command* once per argument tuple in *args*, atomically (one implicit transaction, or
        the enclosing one)."""
        await self._statement("executemany", command, (args,))

    async def _run(self, fn: Callable[..., Awaitable[R]], *args: Any, timeout: float | None = None) -> R:
        """Call ``await fn(connection, *args)`` with the asyncpg connection, on the bridge loop.

        The escape hatch for anything asyncpg can do (cursors, prepared statements, type codecs,
        listeners). The connection is only valid inside *fn*: do not keep it or pass it to another
        thread. In a transaction, do not commit or roll back in *fn* (the block does).
        """
        label = f"{type(self).__name__}.run()"
        _check_callable(fn, label)
        async with self._lease(callers_code=True) as con:
            # The caller's own code may do anything to the session, DEALLOCATE ALL included.
            note_change(con, drops_statements=True)
            result: R = await invoke(label, fn, (con, *args))
            return result

    def __getattr__(self, name: str) -> Any:
        # Only for names that do not exist: the other libraries' names for these operations, and
        # misspellings, say what to call instead.
        raise AttributeError(_missing(type(self), name), name=name, obj=self)

    async def _statement(self, method: str, query: object, args: tuple[Any, ...], **options: Any) -> Any:
        """``con.<method>(query, *args)`` on the call's connection.

        A pooled connection can be dead before it is used: its backend was terminated while it sat idle
        and asyncpg has not seen the socket close yet. When the call fails that way before anything that
        could change data was sent, it is safe to run it again, on a fresh connection (the lease says
        so; a transaction's never does); otherwise the failure is the caller's
        :class:`ConnectionLostError`.
        """
        if not isinstance(query, str):
            name = type(self).__name__
            raise TypeError(
                f"{name}.{method}() takes the SQL as a str with $1, $2, ... placeholders, not "
                f"{type(query).__name__}; pass values as arguments: {method}('SELECT * FROM t WHERE id = "
                "$1', 42)"
            )
        changes_session = may_change_session_state(query)
        for retry in range(DEAD_CONNECTION_RETRIES + 1):
            lease = self._lease()
            try:
                async with lease as con:
                    if changes_session:  # reset when it goes back to the pool: see loopbridge._session_state
                        note_change(con, drops_statements=may_drop_statements(query))
                    return await getattr(con, method)(query, *args, **options)
            except ConnectionLostError:
                if not lease.unsent or retry == DEAD_CONNECTION_RETRIES:
                    raise
                logger.debug("%r: a pooled connection was dead before use; retrying on another", self)
            except CallTimeoutError:  # loopbridge's own (PoolTimeoutError): it says what expired
                raise
            except (asyncio.TimeoutError, TimeoutError) as exc:
                # asyncpg's command_timeout: a bare TimeoutError without a word. Say what expired.
                raise CallTimeoutError(
                    f"{type(self).__name__}.{method}(): the statement did not finish within "
                    f"command_timeout={self._command_timeout!r} s; asyncpg cancelled it on the server"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover


#: What other database libraries call these operations, and what to use here instead.
_OTHER_NAMES = {
    "fetchone": "fetchrow() (the first row, or None)",
    "fetch_one": "fetchrow() (the first row, or None)",
    "fetchall": "fetch() (every row)",
    "fetch_all": "fetch() (every row)",
    "fetchmany": "iterate() (rows streamed in batches), or fetch()",
    "fetch_val": "fetchval() (one value)",
    "fetch_value": "fetchval() (one value)",
    "scalar": "fetchval() (one value)",
    "query": "fetch() for rows, execute() for a command",
    "cursor": "iterate() (a server-side cursor, streamed), or run(fn) for asyncpg's own cursor",
    "acquire": "run(fn): fn gets a pooled connection, as in db.run(work) with async def work(conn): ...",
    "connection": "run(fn): fn gets a pooled connection, as in db.run(work) with async def work(conn): ...",
    "begin": "transaction(): 'with db.transaction() as tx:' or 'async with db.transaction() as tx:'",
    "commit": "a transaction block, which commits when it ends: 'with db.transaction() as tx:'",
    "rollback": "a transaction block, which rolls back when it raises: 'with db.transaction() as tx:'",
    "connect": "open() (or nothing: the pool opens on first use)",
    "disconnect": "close()",
    "dispose": "close()",
}


_TWINNED = frozenset({"fetch", "fetchrow", "fetchval", "execute", "executemany", "run", "open", "close"})


def _missing(cls: type, name: str) -> str:
    """The AttributeError's message for *name*, with what to use instead if there is a likely one."""
    message = f"{cls.__name__!r} object has no attribute {name!r}"
    if name.startswith("_"):
        return message
    awaited = name.startswith("a") and name[1:] in _OTHER_NAMES
    hint = _OTHER_NAMES.get(name[1:] if awaited else name)
    if hint is not None:
        if awaited and hint.partition("(")[0] in _TWINNED:
            hint = f"a{hint}"  # the async twin of what the sync name would be
        return f"{message}: use {hint}"
    public = [attribute for attribute in dir(cls) if not attribute.startswith("_")]
    close = difflib.get_close_matches(name, public, n=1)
    return f"{message}; did you mean {close[0]!r}?" if close else message


def _check_callable(fn: object, label: str) -> None:
    if not callable(fn):
        if inspect.iscoroutine(fn):
            fn.close()
        name = "tx" if label.startswith("Transaction") else "db"
        raise TypeError(
            f"{label} needs an async function that takes the connection first, not "
            f"{type(fn).__name__}; incorrect: {name}.run(work(conn)); correct: {name}.run(work, 42) with "
            "async def work(conn, n): ..."
        )
