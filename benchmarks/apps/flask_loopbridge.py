"""Flask on loopbridge (``loopbridge.contrib.flask``), a sync view: pair flask's loopbridge side.

gunicorn -k gthread --threads 16 -w 1 benchmarks.apps.flask_loopbridge:app
"""

from __future__ import annotations

from typing import Any

from flask import Flask, abort

from loopbridge.contrib.flask import LoopBridge

from ._common import POOL_SIZE, dsn, query

QUERY = query("$1")

app = Flask(__name__)
app.config["LOOPBRIDGE_DSN"] = dsn()
app.config["LOOPBRIDGE_OPTIONS"] = {"min_size": POOL_SIZE, "max_size": POOL_SIZE}
lb = LoopBridge(app)


@app.get("/items/<int:item_id>")
def item(item_id: int) -> dict[str, Any]:
    row = lb.database.fetchrow(QUERY, item_id)
    if row is None:
        abort(404)
    return {"id": row["id"], "name": row["name"]}
