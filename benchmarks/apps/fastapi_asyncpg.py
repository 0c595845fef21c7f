"""FastAPI with an asyncpg pool created on uvicorn's own loop, in the lifespan: the peer of the async
pairs (fastapi-async, bare). Only ever used from that loop, which is the one thing it cannot escape.

    uvicorn benchmarks.apps.fastapi_asyncpg:app --loop uvloop --http httptools
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from fastapi import FastAPI, HTTPException

from ._common import POOL_SIZE, dsn, query

QUERY = query("$1")

pools: list[asyncpg.Pool] = []


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    pool = await asyncpg.create_pool(dsn(), min_size=POOL_SIZE, max_size=POOL_SIZE)
    pools.append(pool)
    try:
        yield
    finally:
        pools.clear()
        await pool.close()


app = FastAPI(lifespan=lifespan)


@app.get("/items/{item_id}")
async def item(item_id: int) -> dict[str, Any]:
    row = await pools[0].fetchrow(QUERY, item_id)
    if row is None:
        raise HTTPException(404)
    return {"id": row["id"], "name": row["name"]}
