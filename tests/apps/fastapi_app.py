"""The FastAPI app the tests serve with uvicorn: async and sync handlers, and DDL in the lifespan.

Configured by ``$LOOPBRIDGE_DSN``. The lifespan creates the tables with a sync call and an await, both
while uvicorn's loop runs.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from fastapi import FastAPI

from loopbridge import Database
from loopbridge.contrib.fastapi import DatabaseDep, lifespan

db = Database(min_size=1, max_size=4)


async def create_tables(db: Database) -> None:
    # DataFlow's create_tables(): a blocking call on the server's running loop.
    db.execute("CREATE TABLE IF NOT EXISTS organization (id text PRIMARY KEY, name text NOT NULL)")
    # DataFlow's ensure_table_exists(): an await on the server's loop.
    await db.aexecute(
        "CREATE TABLE IF NOT EXISTS hits (id serial PRIMARY KEY, kind text NOT NULL, n int NOT NULL)"
    )


app = FastAPI(lifespan=lifespan(db, setup=create_tables))


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


@app.get("/info")
async def info(db: DatabaseDep) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    thread = db.bridge.thread
    return {
        "server_loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
        "bridge_loop_is_server_loop": db.bridge.loop is loop,
        "bridge_thread": thread.name if thread is not None else None,
    }


@app.post("/async/{n}")
async def insert_async(n: int, db: DatabaseDep) -> dict[str, Any]:
    new_id = await db.afetchval("INSERT INTO hits (kind, n) VALUES ('async', $1) RETURNING id", n)
    return {"id": new_id, "thread": threading.current_thread().name}


@app.post("/sync/{n}")
def insert_sync(n: int, db: DatabaseDep) -> dict[str, Any]:  # in Starlette's threadpool
    new_id = db.fetchval("INSERT INTO hits (kind, n) VALUES ('sync', $1) RETURNING id", n)
    return {"id": new_id, "thread": threading.current_thread().name}


@app.get("/count")
def count(db: DatabaseDep) -> dict[str, int]:
    return {"hits": db.fetchval("SELECT count(*) FROM hits")}
