"""Starlette and FastAPI: open the Database in the app's lifespan, hand it to handlers.

::

    from loopbridge import Database
    from loopbridge.contrib.starlette import get_database, lifespan

    db = Database()

    async def create_tables(db: Database) -> None:
        await db.aexecute("CREATE TABLE IF NOT EXISTS users (id serial PRIMARY KEY, name text)")

    app = FastAPI(lifespan=lifespan(db, setup=create_tables))

    @app.get("/users")
    async def users(db: Database = Depends(get_database)) -> list[dict[str, Any]]:
        return [dict(row) for row in await db.afetch("SELECT id, name FROM users")]

DDL in the lifespan works, awaited or called synchronously: the pool lives on the bridge loop, never on
the server's. A setup that fails stops the server from starting, instead of
leaving it serving without its tables.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

from loopbridge._extras import require

require(
    "loopbridge.contrib.starlette",
    "fastapi",
    "starlette",
    also=" (or 'loopbridge[starlette]' for Starlette alone)",
)

from starlette.requests import HTTPConnection

from loopbridge.database import Database
from loopbridge.errors import DatabaseClosedError

from . import _held

if TYPE_CHECKING:
    from loopbridge.sqlalchemy import AsyncBridgedSession, BridgedSession, Engine

__all__ = [
    "ENGINE_KEY",
    "STATE_KEY",
    "get_database",
    "get_engine",
    "get_session",
    "get_sync_session",
    "lifespan",
]

#: The key of the Database in the lifespan state (``request.state.loopbridge_database``).
STATE_KEY = "loopbridge_database"
#: The key of the SQLAlchemy Engine in the lifespan state (``request.state.loopbridge_engine``).
ENGINE_KEY = "loopbridge_engine"


class _Resource(Protocol):
    """A Database or a ``loopbridge.sqlalchemy.Engine``: opened at startup, closed at shutdown."""

    @property
    def closed(self) -> bool: ...
    async def aopen(self) -> None: ...
    def close(self, timeout: float = ...) -> None: ...
    async def aclose(self, timeout: float = ...) -> None: ...


R = TypeVar("R", bound=_Resource)


def lifespan(
    database: R | Callable[[], R],
    *,
    setup: Callable[[R], Awaitable[None] | None] | None = None,
    close: bool = True,
) -> Callable[[object], AbstractAsyncContextManager[dict[str, R]]]:
    """A lifespan for ``Starlette(lifespan=...)`` / ``FastAPI(lifespan=...)``, for a Database or a
    ``loopbridge.sqlalchemy.Engine``.

    At startup it opens the pool (so a wrong DSN stops the server at once), runs ``setup(resource)``
    (async or sync: create tables, ``await engine.arun_sync(Base.metadata.create_all)``, run
    migrations) and puts the resource in the lifespan state, where :func:`get_database` (or, for an
    Engine, :func:`get_engine`, :func:`get_session` and :func:`get_sync_session`) finds it. At shutdown
    it closes it.

    :param database: the Database or Engine, or a function making one (called at every startup: each
        test's ``TestClient`` then gets a fresh one).
    :param setup: called with it at startup, before the first request.
    :param close: close a given Database or Engine at shutdown. Pass False when the lifespan may run
        again in this process (several ``TestClient`` blocks on one app) or it outlives the app. One made
        by a factory is always closed. Under the pytest plugin, what it holds for the session
        (``loopbridge_app_db``, ``loopbridge_app_engine``) is left open and closed at the session's end
        instead.
    :raises TypeError: if *database* is neither a Database, an Engine nor a callable.
    """
    if not _is_resource(database) and not callable(database):
        raise TypeError(
            "lifespan() takes a loopbridge.Database or loopbridge.sqlalchemy.Engine, or a function "
            f"returning one, not {type(database).__name__}"
        )

    @asynccontextmanager
    async def run(app: object) -> AsyncIterator[dict[str, R]]:
        given = _is_resource(database)
        resource = cast(R, database) if given else _make(cast(Callable[[], R], database))
        if resource.closed:
            raise DatabaseClosedError(
                f"{resource!r} was closed, most likely by an earlier run of this lifespan (another "
                "TestClient block, say); pass a factory, lifespan(make_database), or "
                "lifespan(db, close=False)"
            )
        await resource.aopen()
        try:
            if setup is not None:
                outcome = setup(resource)
                if inspect.isawaitable(outcome):
                    await outcome
            yield {ENGINE_KEY if _is_engine(resource) else STATE_KEY: resource}
        finally:
            # The pytest plugin's loopbridge_app_db (or loopbridge_app_engine) outlives every TestClient
            # block of the session.
            if (close or not _is_resource(database)) and not _held.defer_close(resource):
                await resource.aclose()

    return run


async def get_database(connection: HTTPConnection) -> Database:
    """The Database of the app's :func:`lifespan`; a dependency for FastAPI (``Depends(get_database)``),
    or call it with the request in Starlette.

    Async on purpose: FastAPI runs a sync dependency in its threadpool, an async one on the loop at no
    cost; sync handlers can still depend on it.

    :raises RuntimeError: if the app was not created with ``lifespan=lifespan(db)``.
    """
    db = _from_state(connection, STATE_KEY)
    if not isinstance(db, Database):
        raise RuntimeError(
            "no loopbridge Database in the app's lifespan state: create the app with "
            "lifespan=loopbridge.contrib.starlette.lifespan(db) (and, in tests, enter the TestClient with "
            "'with TestClient(app) as client:' so that the lifespan runs)"
        )
    return db


async def get_engine(connection: HTTPConnection) -> Engine:
    """The ``loopbridge.sqlalchemy.Engine`` of the app's :func:`lifespan` (``Depends(get_engine)``).

    :raises RuntimeError: if the app was not created with ``lifespan=lifespan(engine)``.
    """
    engine = _from_state(connection, ENGINE_KEY)
    if not _is_engine(engine):
        raise RuntimeError(
            "no loopbridge.sqlalchemy Engine in the app's lifespan state: create the app with "
            "lifespan=loopbridge.contrib.starlette.lifespan(engine) (and, in tests, enter the TestClient "
            "with 'with TestClient(app) as client:' so that the lifespan runs)"
        )
    return cast("Engine", engine)


async def get_session(connection: HTTPConnection) -> AsyncIterator[AsyncBridgedSession]:
    """A session scope per request, for ``async def`` handlers: ``Depends(get_session)`` gives an
    ``AsyncBridgedSession`` (awaited calls), committed after the handler returns, rolled back if it
    raises.

    For ``def`` handlers use :func:`get_sync_session`: FastAPI runs those in its threadpool, where the
    blocking session belongs.
    """
    engine = await get_engine(connection)
    async with engine.session() as session:
        yield session


def get_sync_session(connection: HTTPConnection) -> Iterator[BridgedSession]:
    """A session scope per request, for ``def`` handlers: ``Depends(get_sync_session)`` gives a
    ``BridgedSession`` (blocking calls). A sync dependency: FastAPI runs it, like the handler, in its
    threadpool, so its calls never block the server's loop. Committed after the handler returns,
    rolled back if it raises.
    """
    engine = _from_state(connection, ENGINE_KEY)
    if not _is_engine(engine):
        raise RuntimeError(
            "no loopbridge.sqlalchemy Engine in the app's lifespan state: create the app with "
            "lifespan=loopbridge.contrib.starlette.lifespan(engine)"
        )
    with cast("Engine", engine).session() as session:
        yield session


def _from_state(connection: HTTPConnection, key: str) -> object:
    state = connection.scope.get("state") or {}
    return state.get(key)


def _is_engine(obj: object) -> bool:
    # Without importing SQLAlchemy: only an application that made an Engine has loopbridge.sqlalchemy.
    module = sys.modules.get("loopbridge.sqlalchemy")
    return module is not None and isinstance(obj, module.Engine)


def _is_resource(obj: object) -> bool:
    return isinstance(obj, Database) or _is_engine(obj)


def _make(factory: Callable[[], R]) -> R:
    made = factory()
    if not _is_resource(made):
        raise TypeError(
            f"the factory given to lifespan() returned {type(made).__name__}, not a loopbridge.Database "
            "or loopbridge.sqlalchemy.Engine"
        )
    return made
