"""The Flask app the tests serve with ``gunicorn --preload``: the master uses the Database before forking.

Configured by ``$LOOPBRIDGE_DSN``. At import (in gunicorn's master, with ``--preload``) it creates its
table and keeps its pool's connections open; the workers it forks then serve sync and async views.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

from loopbridge.contrib.flask import LoopBridge

app = Flask(__name__)
app.config["LOOPBRIDGE_OPTIONS"] = {"min_size": 2, "max_size": 4}
lb = LoopBridge(app)

# In the master, before the fork: DDL, and a pool of two connections that must outlive the workers.
lb.database.execute("CREATE TABLE IF NOT EXISTS hits (id serial PRIMARY KEY, worker int NOT NULL)")
MASTER = {"pid": os.getpid(), "backend": lb.database.fetchval("SELECT pg_backend_pid()")}


@app.get("/health")
def health() -> dict[str, Any]:
    return {"ok": True}


@app.get("/master")
def master() -> dict[str, Any]:
    return MASTER


@app.post("/sync")
def insert_sync() -> dict[str, Any]:
    row = lb.database.fetchrow(
        "INSERT INTO hits (worker) VALUES ($1) RETURNING id, pg_backend_pid() AS backend", os.getpid()
    )
    assert row is not None
    return {"worker": os.getpid(), "backend": row["backend"], "id": row["id"]}


@app.post("/async")
async def insert_async() -> dict[str, Any]:  # flask[async]: a new event loop for every request
    row = await lb.database.afetchrow(
        "INSERT INTO hits (worker) VALUES ($1) RETURNING id, pg_backend_pid() AS backend", os.getpid()
    )
    assert row is not None
    return {"worker": os.getpid(), "backend": row["backend"], "id": row["id"]}
