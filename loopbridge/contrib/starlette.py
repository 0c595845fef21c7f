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

DDL in the lifespan works, awaited or called synchronously (the DF-501 case): the pool lives on the
bridge loop, never on the server's. A setup that fails stops the server from starting, instead of
leaving it serving without its tables.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

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

__all__ = ["STATE_KEY", "get_database", "lifespan"]

#: The key of the Database in the lifespan state (``request.state.loopbridge_database``).
STATE_KEY = "loopbridge_database"

Setup = Callable[[Database], Awaitable[None] | None]


def lifespan(
    database: Database | Callable[[], Database],
    *,
    setup: Setup | None = None,
    close: bool = True,
) -> Callable[[object], AbstractAsyncContextManager[dict[str, Database]]]:
    """A lifespan for ``Starlette(lifespan=...)`` / ``FastAPI(lifespan=...)``.

    At startup it opens the pool (so a wrong DSN stops the server at once), runs ``setup(db)`` (async
    or sync: create tables, run migrations) and puts the Database in the lifespan state, where
    :func:`get_database` finds it. At shutdown it closes the Database.

    :param database: the Database, or a function making one (called at every startup: each test's
        ``TestClient`` then gets a fresh one).
    :param setup: called with the Database at startup, before the first request.
    :param close: close a given Database at shutdown. Pass False when the lifespan may run again in
        this process (several ``TestClient`` blocks on one app) or the Database outlives the app. A
        Database made by a factory is always closed. Under the pytest plugin, the Database it holds for
        the session (``loopbridge_app_db``) is left open and closed at the session's end instead.
    :raises TypeError: if *database* is neither a Database nor a callable.
    """
    if not isinstance(database, Database) and not callable(database):
        raise TypeError(
            f"lifespan() takes a loopbridge.Database or a function returning one, not "
            f"{type(database).__name__}"
        )

    @asynccontextmanager
    async def run(app: object) -> AsyncIterator[dict[str, Database]]:
        db = database if isinstance(database, Database) else _make(database)
        if db.closed:
            raise DatabaseClosedError(
                f"{db!r} was closed, most likely by an earlier run of this lifespan (another TestClient "
                "block, say); pass a factory, lifespan(make_database), or lifespan(db, close=False)"
            )
        await db.aopen()
        try:
            if setup is not None:
                outcome = setup(db)
                if inspect.isawaitable(outcome):
                    await outcome
            yield {STATE_KEY: db}
        finally:
            # The pytest plugin's loopbridge_app_db outlives every TestClient block of the session.
            if (close or not isinstance(database, Database)) and not _held.defer_close(db):
                await db.aclose()

    return run


async def get_database(connection: HTTPConnection) -> Database:
    """The Database of the app's :func:`lifespan`; a dependency for FastAPI (``Depends(get_database)``),
    or call it with the request in Starlette.

    Async on purpose: FastAPI runs a sync dependency in its threadpool, an async one on the loop at no
    cost; sync handlers can still depend on it.

    :raises RuntimeError: if the app was not created with ``lifespan=lifespan(db)``.
    """
    state = connection.scope.get("state") or {}
    db = state.get(STATE_KEY)
    if not isinstance(db, Database):
        raise RuntimeError(
            "no loopbridge Database in the app's lifespan state: create the app with "
            "lifespan=loopbridge.contrib.starlette.lifespan(db) (and, in tests, enter the TestClient with "
            "'with TestClient(app) as client:' so that the lifespan runs)"
        )
    return db


def _make(factory: Callable[[], Database]) -> Database:
    db = factory()
    if not isinstance(db, Database):
        raise TypeError(
            f"the database factory given to lifespan() returned {type(db).__name__}, "
            "not a loopbridge.Database"
        )
    return db
