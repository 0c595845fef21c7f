"""What every app of ``python -m benchmarks.apps`` shares: the database, the statement, the pool size.

The runner passes the DSN and the schema it created in the environment; each app reads them when it is
imported, in the server's process (the worker's, under gunicorn).
"""

from __future__ import annotations

import os
import re

__all__ = ["DSN_VARIABLE", "POOL_SIZE", "ROWS", "SCHEMA_VARIABLE", "dsn", "query"]

DSN_VARIABLE = "BENCH_APPS_DSN"
SCHEMA_VARIABLE = "BENCH_APPS_SCHEMA"

#: Connections per app: opened before the first measurement, kept for the whole run.
POOL_SIZE = 16
#: Rows in the table; each request reads one of them, picked at random by the load generator.
ROWS = 1000


def dsn() -> str:
    return os.environ[DSN_VARIABLE]


def query(placeholder: str) -> str:
    """The statement every app runs, in its driver's placeholder style (``$1`` or ``%s``).

    The table is named with its schema rather than found through ``search_path``: the same text for
    every driver, and no per-driver session setting that one app could get wrong.
    """
    schema = os.environ[SCHEMA_VARIABLE]
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", schema):
        raise ValueError(f"{SCHEMA_VARIABLE}={schema!r} is not a plain lower-case identifier")
    return f"SELECT id, name FROM {schema}.items WHERE id = {placeholder}"
