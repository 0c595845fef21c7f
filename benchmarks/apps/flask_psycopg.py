"""Flask with a psycopg 3 ``ConnectionPool``, a sync view: pair flask's peer.

gunicorn -k gthread --threads 16 -w 1 benchmarks.apps.flask_psycopg:app
"""

from __future__ import annotations

from typing import Any

from flask import Flask, abort
from psycopg_pool import ConnectionPool

from ._common import POOL_SIZE, dsn, query

QUERY = query("%s")

# Built at import, that is in gunicorn's worker (no --preload): its connections belong to that process.
# autocommit: one statement is one round trip, with no BEGIN/COMMIT around it (as with asyncpg).
pool = ConnectionPool(dsn(), min_size=POOL_SIZE, max_size=POOL_SIZE, kwargs={"autocommit": True}, open=True)
pool.wait(30)

app = Flask(__name__)


@app.get("/items/<int:item_id>")
def item(item_id: int) -> dict[str, Any]:
    with pool.connection() as conn:
        row = conn.execute(QUERY, (item_id,)).fetchone()
    if row is None:
        abort(404)
    return {"id": row[0], "name": row[1]}
