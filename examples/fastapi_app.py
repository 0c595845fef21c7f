"""FastAPI on loopbridge: tables created in the lifespan, async and sync handlers sharing one pool.

Run, from the repository root:

    LOOPBRIDGE_DSN=postgresql://postgres@localhost/postgres uvicorn --app-dir examples fastapi_app:app

Then ``curl -X POST 'localhost:8000/notes?text=hello'`` and ``curl localhost:8000/notes``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from loopbridge import Database
from loopbridge.contrib.fastapi import DatabaseDep, lifespan

db = Database(max_size=4)  # $LOOPBRIDGE_DSN; one pool for the whole process


async def create_tables(db: Database) -> None:
    # DDL in the lifespan, on uvicorn's loop: created for real, or the server does not start.
    await db.aexecute(
        "CREATE TABLE IF NOT EXISTS example_fastapi_notes (id serial PRIMARY KEY, text text NOT NULL)"
    )


app = FastAPI(lifespan=lifespan(db, setup=create_tables))


@app.post("/notes")
async def add_note(text: str, db: DatabaseDep) -> dict[str, Any]:
    row = await db.afetchrow("INSERT INTO example_fastapi_notes (text) VALUES ($1) RETURNING id, text", text)
    return dict(row) if row else {}


@app.get("/notes")
def list_notes(db: DatabaseDep) -> list[dict[str, Any]]:  # a sync handler, in FastAPI's threadpool
    return [dict(row) for row in db.fetch("SELECT id, text FROM example_fastapi_notes ORDER BY id")]
