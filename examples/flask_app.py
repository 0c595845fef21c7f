"""Flask on loopbridge: one Database per process, sync and async views, safe under gunicorn --preload.

Run, from the repository root:

    LOOPBRIDGE_DSN=postgresql://postgres@localhost/postgres gunicorn --preload -w 2 --chdir examples flask_app:app

Then ``curl -X POST localhost:8000/visit`` and ``curl localhost:8000/visits``. With ``--preload`` the
table is created once, in the master, before it forks the workers; each worker then opens a pool of
its own on first use and never touches the master's connections.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

from loopbridge.contrib.flask import LoopBridge

app = Flask(__name__)
app.config["LOOPBRIDGE_OPTIONS"] = {"max_size": 4}  # the DSN from $LOOPBRIDGE_DSN
lb = LoopBridge(app)

lb.database.execute(
    "CREATE TABLE IF NOT EXISTS example_flask_visits (id serial PRIMARY KEY, worker int NOT NULL)"
)


@app.post("/visit")
def visit() -> dict[str, Any]:
    lb.database.execute("INSERT INTO example_flask_visits (worker) VALUES ($1)", os.getpid())
    return {"worker": os.getpid()}


@app.get("/visits")
async def visits() -> dict[str, Any]:  # async views need flask[async]
    rows = await lb.database.afetch("SELECT worker, count(*) AS n FROM example_flask_visits GROUP BY worker")
    return {"by_worker": {str(row["worker"]): row["n"] for row in rows}}
