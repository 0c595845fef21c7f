"""SQLAlchemy on the bridge: one ``AsyncEngine`` for every caller, and one session scope for every context.

An SQLAlchemy ``AsyncEngine`` belongs to the event loop that first used it, which is how applications
end up with two session patterns (``session_scope()`` on the server's loop, ``session_scope_fresh()``
with a new engine per request everywhere else). Here the engine lives on the bridge loop: it is created
there on first use, every connection is made and used there, and it is disposed there. Callers never
touch it; they only reach it through the bridge, with one scope, ``engine.session()``:

* ``with engine.session() as session:`` — sync code (views, scripts, notebooks, a running loop's sync
  call). Each method of the :class:`BridgedSession` blocks the caller while it runs on the bridge loop.
* ``async with engine.session() as session:`` — async code on any loop. Each awaitable method of the
  :class:`AsyncBridgedSession` runs on the bridge loop; the caller's loop only awaits.

Either way the scope holds a real ``AsyncSession`` that lives on the bridge loop; both facades take their
methods from one implementation each (``loopbridge._twins``), so the two cannot drift. The scope commits
on normal exit and rolls back on an exception, as ``session.begin()`` does. An object used in the wrong
form (``await engine.session()``, ``with`` on an async session) raises a ``TypeError`` naming the right
one.

ORM objects come back to the caller's thread with their loaded attributes. What they have not loaded (a
lazy relationship, an expired or deferred column) cannot be loaded there: the session does its I/O only on
the bridge loop, so such an access raises :class:`LazyLoadError`, saying to load eagerly or to use
``run_sync``. Sessions default to ``expire_on_commit=False`` for that reason, as SQLAlchemy advises for
asyncio.

Needs the ``loopbridge[sqlalchemy]`` extra; ``import loopbridge`` never imports this module.
"""

from __future__ import annotations

from loopbridge._extras import require

# SQLAlchemy's asyncio support needs greenlet: both come with the extra.
require("loopbridge.sqlalchemy", "sqlalchemy", "sqlalchemy", "greenlet", "sqlalchemy.ext.asyncio")

from .connection import AsyncBridgedConnection, BridgedConnection, Savepoint
from .engine import Engine
from .errors import EngineClosedError, LazyLoadError
from .session import AsyncBridgedSession, BridgedSession, SessionScope
from .streaming import StreamResult

__all__ = [
    "AsyncBridgedConnection",
    "AsyncBridgedSession",
    "BridgedConnection",
    "BridgedSession",
    "Engine",
    "EngineClosedError",
    "LazyLoadError",
    "Savepoint",
    "SessionScope",
    "StreamResult",
]
