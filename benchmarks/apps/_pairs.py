"""The apps, and the pairs they are measured in: loopbridge's side (A) and its peer (B).

Each pair's targets are printed beside its result and never fail the run.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._serve import App

__all__ = ["BARE", "FASTAPI_ASYNC", "PAIRS", "Pair"]

_M = "benchmarks.apps."

LB_FASTAPI_ASYNC = App(
    "lb-fastapi-async", "loopbridge, await db.afetchrow", "uvicorn", _M + "fastapi_loopbridge:app",
    "/async/items/", loopbridge=True,
)  # fmt: skip
LB_FASTAPI_DEF = App(
    "lb-fastapi-def", "loopbridge, db.fetchrow", "uvicorn", _M + "fastapi_loopbridge:app",
    "/sync/items/", loopbridge=True,
)  # fmt: skip
ASYNCPG_FASTAPI = App(
    "asyncpg-fastapi", "asyncpg pool on uvicorn's loop", "uvicorn",
    _M + "fastapi_asyncpg:app", "/items/", loopbridge=False,
)  # fmt: skip
PSYCOPG_FASTAPI = App(
    "psycopg-fastapi", "psycopg 3 ConnectionPool", "uvicorn", _M + "fastapi_psycopg:app",
    "/items/", loopbridge=False,
)  # fmt: skip
BARE_FASTAPI = App(
    "bare-fastapi", "bare mechanism: uvloop thread, no reset query", "uvicorn",
    _M + "fastapi_bare:app", "/items/", loopbridge=False,
)  # fmt: skip
LB_FLASK = App(
    "lb-flask", "loopbridge, db.fetchrow", "gunicorn", _M + "flask_loopbridge:app",
    "/items/", loopbridge=True,
)  # fmt: skip
PSYCOPG_FLASK = App(
    "psycopg-flask", "psycopg 3 ConnectionPool", "gunicorn",
    _M + "flask_psycopg:app", "/items/", loopbridge=False,
)  # fmt: skip
LB_DJANGO = App(
    "lb-django", "loopbridge, db.fetchrow", "gunicorn",
    _M + "django_app:application", "/lb/items/", loopbridge=True,
)  # fmt: skip
DJANGO_OWN = App(
    "django-own", "Django's own connection, CONN_MAX_AGE=None",
    "gunicorn", _M + "django_app:application", "/django/items/", loopbridge=False,
)  # fmt: skip


@dataclass(frozen=True)
class Pair:
    key: str
    label: str
    ours: App  # A: loopbridge (for the reference pair, the bare mechanism)
    peer: App  # B
    min_throughput: float | None = None  # target: A's requests/s over B's, at least
    max_cpu: float | None = None  # target: A's CPU per request over B's, at most


FASTAPI_ASYNC = "fastapi-async"
BARE = "bare"

PAIRS: list[Pair] = [
    Pair(FASTAPI_ASYNC, "FastAPI async def, uvicorn", LB_FASTAPI_ASYNC, ASYNCPG_FASTAPI, 0.90, 1.15),
    Pair("fastapi-def", "FastAPI def, uvicorn", LB_FASTAPI_DEF, PSYCOPG_FASTAPI, 1.0),
    Pair("flask", "Flask, gunicorn gthread", LB_FLASK, PSYCOPG_FLASK, 1.0),
    Pair("django", "Django sync view, gunicorn gthread", LB_DJANGO, DJANGO_OWN, 1.0),
    # The reference: what loopbridge's async pair must not fall below (its ratio to the same peer).
    Pair(BARE, "reference: the bare mechanism, FastAPI async def", BARE_FASTAPI, ASYNCPG_FASTAPI),
]
