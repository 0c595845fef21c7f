"""FastAPI: :mod:`loopbridge.contrib.starlette`'s lifespan and dependency, and ``DatabaseDep``.

::

    from loopbridge.contrib.fastapi import DatabaseDep, lifespan

    app = FastAPI(lifespan=lifespan(db, setup=create_tables))

    @app.get("/count")
    def count(db: DatabaseDep) -> int:              # sync handler, in FastAPI's threadpool
        return db.fetchval("SELECT count(*) FROM users")

    @app.get("/users/{user_id}")
    async def user(user_id: int, db: DatabaseDep) -> dict[str, Any]:
        return dict(await db.afetchrow("SELECT * FROM users WHERE id = $1", user_id))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from loopbridge._extras import require

require("loopbridge.contrib.fastapi", "fastapi", "fastapi")

from fastapi import Depends

from loopbridge.database import Database

from .starlette import (
    ENGINE_KEY,
    STATE_KEY,
    get_database,
    get_engine,
    get_session,
    get_sync_session,
    lifespan,
)

__all__ = [
    "ENGINE_KEY",
    "STATE_KEY",
    "DatabaseDep",
    "EngineDep",
    "SessionDep",
    "SyncSessionDep",
    "get_database",
    "get_engine",
    "get_session",
    "get_sync_session",
    "lifespan",
]

#: ``db: DatabaseDep`` in a handler's signature: the Database of the app's lifespan.
DatabaseDep = Annotated[Database, Depends(get_database)]

if TYPE_CHECKING:
    from loopbridge.sqlalchemy import AsyncBridgedSession, BridgedSession, Engine

    EngineDep = Annotated[Engine, Depends(get_engine)]
    SessionDep = Annotated[AsyncBridgedSession, Depends(get_session)]
    SyncSessionDep = Annotated[BridgedSession, Depends(get_sync_session)]
else:  # the same, without importing SQLAlchemy for applications that do not use it
    #: ``engine: EngineDep``: the loopbridge.sqlalchemy Engine of the app's lifespan.
    EngineDep = Annotated[Any, Depends(get_engine)]
    #: ``session: SessionDep`` in an ``async def`` handler: an AsyncBridgedSession scope per request.
    SessionDep = Annotated[Any, Depends(get_session)]
    #: ``session: SyncSessionDep`` in a ``def`` handler: a BridgedSession scope per request, opened
    #: and ended in FastAPI's threadpool like the handler.
    SyncSessionDep = Annotated[Any, Depends(get_sync_session)]
