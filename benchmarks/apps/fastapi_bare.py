"""The bare mechanism, the reference for pair bare: what loopbridge does at its core, in about 25 lines
and nothing else. A daemon thread runs a uvloop loop that owns an asyncpg pool (created there); the
pool's connections go back without asyncpg's reset query; FastAPI's ``async def`` handler awaits
``asyncio.wrap_future(asyncio.run_coroutine_threadsafe(...))``. No timeouts, no error mapping, no
connection-loss handling, no shutdown of calls in flight: the least a bridge can cost.

    uvicorn benchmarks.apps.fastapi_bare:app --loop uvloop --http httptools
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import uvloop
from fastapi import FastAPI, HTTPException

from ._common import POOL_SIZE, dsn, query

T = TypeVar("T")
QUERY = query("$1")

bridge_loop = uvloop.new_event_loop()
threading.Thread(target=bridge_loop.run_forever, name="bare-bridge", daemon=True).start()


async def no_reset(con: asyncpg.Connection) -> None:
    """The pool's ``reset=`` (asyncpg 0.30+): nothing beyond asyncpg's own rollback of an open
    transaction, which it runs before this. One round trip per call instead of two."""


async def on_bridge(coro: Coroutine[Any, Any, T]) -> T:
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, bridge_loop))


async def create_pool() -> asyncpg.Pool:
    return await asyncpg.create_pool(dsn(), min_size=POOL_SIZE, max_size=POOL_SIZE, reset=no_reset)


pools: list[asyncpg.Pool] = []


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    pools.append(await on_bridge(create_pool()))
    try:
        yield
    finally:
        await on_bridge(pools.pop().close())


app = FastAPI(lifespan=lifespan)


@app.get("/items/{item_id}")
async def item(item_id: int) -> dict[str, Any]:
    row = await on_bridge(pools[0].fetchrow(QUERY, item_id))
    if row is None:
        raise HTTPException(404)
    return {"id": row["id"], "name": row["name"]}
