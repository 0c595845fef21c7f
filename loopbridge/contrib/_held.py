"""Databases whose lifetime a test session owns: the frameworks' shutdown hooks leave them open.

The README's testing recipe hands the application's own Database to ``loopbridge_rollback_db`` through a
session-scoped ``loopbridge_app_db``. The application's shutdown hook then runs in the middle of that
session, at the end of every ``with TestClient(app)`` block (the Starlette/FastAPI :func:`lifespan`), and
closing the Database there would break every later test with a ``DatabaseClosedError``.

So the pytest plugin *holds* that Database for the rest of the session (:func:`hold`), and the shutdown
hooks in ``loopbridge.contrib`` ask :func:`defer_close` before they close one: while it is held, the close
is only noted, and carried out when the plugin lets go at the end of the session (:func:`release`).
Outside a test session nothing is ever held, and the hooks close as documented.

This module imports nothing but the standard library: the framework helpers use it in production too.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loopbridge.database import Database

__all__ = ["defer_close", "hold", "release"]


class _Hold:
    __slots__ = ("close_requested", "database")

    def __init__(self, database: Database) -> None:
        self.database = database  # kept alive while held, so that its id stays its own
        self.close_requested = False


_lock = threading.Lock()
_held: dict[int, _Hold] = {}  # by id(database): held is a matter of identity


def hold(database: Database) -> None:
    """From now on, until :func:`release`, the contrib shutdown hooks leave *database* open."""
    with _lock:
        _held.setdefault(id(database), _Hold(database))


def release(database: Database) -> bool:
    """Stop holding *database*; True if a shutdown hook asked to close it meanwhile (close it now)."""
    with _lock:
        found = _held.pop(id(database), None)
    return found is not None and found.close_requested


def defer_close(database: Database) -> bool:
    """For a shutdown hook about to close *database*: True if it is held, and the close is deferred to
    :func:`release` (the hook must then leave it open); False if the hook should close it now."""
    with _lock:
        found = _held.get(id(database))
        if found is None:
            return False
        found.close_requested = True
        return True
