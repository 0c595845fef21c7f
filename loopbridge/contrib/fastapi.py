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

from typing import Annotated

from loopbridge._extras import require

require("loopbridge.contrib.fastapi", "fastapi", "fastapi")

from fastapi import Depends

from loopbridge.database import Database

from .starlette import STATE_KEY, get_database, lifespan

__all__ = ["STATE_KEY", "DatabaseDep", "get_database", "lifespan"]

#: ``db: DatabaseDep`` in a handler's signature: the Database of the app's lifespan.
DatabaseDep = Annotated[Database, Depends(get_database)]
