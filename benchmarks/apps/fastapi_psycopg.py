"""FastAPI with a psycopg 3 ``ConnectionPool`` in a ``def`` handler (Starlette's thread pool): the peer
of pair fastapi-def.

    uvicorn benchmarks.apps.fastapi_psycopg:app --loop uvloop --http httptools
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from psycopg_pool import ConnectionPool

from ._common import POOL_SIZE, dsn, query

QUERY = query("%s")

# autocommit: one statement is one round trip, with no BEGIN/COMMIT around it (as with asyncpg).
pool = ConnectionPool(dsn(), min_size=POOL_SIZE, max_size=POOL_SIZE, kwargs={"autocommit": True}, open=False)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    pool.open(wait=True, timeout=30)
    try:
        yield
    finally:
        pool.close(timeout=10)


app = FastAPI(lifespan=lifespan)


@app.get("/items/{item_id}")
def item(item_id: int) -> dict[str, Any]:
    with pool.connection() as conn:
        row = conn.execute(QUERY, (item_id,)).fetchone()
    if row is None:
        raise HTTPException(404)
    return {"id": row[0], "name": row[1]}
