"""FastAPI on loopbridge: an ``async def`` handler (pair fastapi-async) and a ``def`` handler, run in
Starlette's thread pool (pair fastapi-def). Each pair starts its own server and loads one route only.

    uvicorn benchmarks.apps.fastapi_loopbridge:app --loop uvloop --http httptools
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException

from loopbridge import Database
from loopbridge.contrib.fastapi import lifespan

from ._common import POOL_SIZE, dsn, query

QUERY = query("$1")

# The pool is opened by the lifespan, on the bridge loop, before the server accepts a request.
db = Database(dsn(), min_size=POOL_SIZE, max_size=POOL_SIZE)
app = FastAPI(lifespan=lifespan(db))


@app.get("/async/items/{item_id}")
async def item_async(item_id: int) -> dict[str, Any]:
    row = await db.afetchrow(QUERY, item_id)
    if row is None:
        raise HTTPException(404)
    return {"id": row["id"], "name": row["name"]}


@app.get("/sync/items/{item_id}")
def item_sync(item_id: int) -> dict[str, Any]:
    row = db.fetchrow(QUERY, item_id)
    if row is None:
        raise HTTPException(404)
    return {"id": row["id"], "name": row["name"]}
