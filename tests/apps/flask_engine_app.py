"""The Flask app with a ``loopbridge.sqlalchemy`` Engine that the tests serve with ``gunicorn --preload``.

Configured by ``$LOOPBRIDGE_DSN`` and ``LOOPBRIDGE_KIND = "engine"``. At import (in gunicorn's master,
with ``--preload``) it creates its table through the Engine; the workers it forks then serve sync and
async views with session scopes, each on an engine of its own made on first use.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask
from sqlalchemy import text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loopbridge.contrib.flask import LoopBridge

app = Flask(__name__)
app.config["LOOPBRIDGE_KIND"] = "engine"
app.config["LOOPBRIDGE_OPTIONS"] = {"pool_size": 2, "max_overflow": 0}
lb = LoopBridge(app)


class Base(DeclarativeBase):
    pass


class Hit(Base):
    __tablename__ = "engine_hits"

    id: Mapped[int] = mapped_column(primary_key=True)
    worker: Mapped[int]
    kind: Mapped[str]


# In the master, before the fork.
lb.engine.run_sync(Base.metadata.create_all)
BACKEND = text("SELECT pg_backend_pid()")


@app.get("/health")
def health() -> dict[str, Any]:
    return {"ok": True}


@app.post("/sync")
def insert_sync() -> dict[str, Any]:
    with lb.engine.session() as session:
        hit = Hit(worker=os.getpid(), kind="sync")
        session.add(hit)
        session.flush()
        return {"id": hit.id, "worker": os.getpid(), "backend": session.scalar(BACKEND)}


@app.post("/async")
async def insert_async() -> dict[str, Any]:  # flask[async]: a new event loop for every request
    async with lb.engine.session() as session:
        hit = Hit(worker=os.getpid(), kind="async")
        session.add(hit)
        await session.flush()
        return {"id": hit.id, "worker": os.getpid(), "backend": await session.scalar(BACKEND)}
