"""What a test session owns the lifetime of: the frameworks' shutdown hooks leave it open.

The README's testing recipe hands the application's own Database (or ``loopbridge.sqlalchemy`` Engine) to
``loopbridge_rollback_db`` (``loopbridge_rollback_engine``) through a session-scoped ``loopbridge_app_db``
(``loopbridge_app_engine``). The application's shutdown hook then runs in the middle of that session, at
the end of every ``with TestClient(app)`` block (the Starlette/FastAPI :func:`lifespan`), and closing it
there would break every later test with a ``DatabaseClosedError``.

So the pytest plugin *holds* it for the rest of the session (:func:`hold`), and the shutdown hooks in
``loopbridge.contrib`` ask :func:`defer_close` before they close one: while it is held, the close is only
noted, and carried out when the plugin lets go at the end of the session (:func:`release`). Outside a test
session nothing is ever held, and the hooks close as documented.

This module imports nothing but the standard library: the framework helpers use it in production too.
"""

from __future__ import annotations

from typing import Protocol

from loopbridge._loop import ForkSafeLock

__all__ = ["Closable", "defer_close", "hold", "release"]


class Closable(Protocol):
    """What can be held: a Database, an Engine, anything closed with ``close()`` or ``aclose()``."""

    def close(self, timeout: float = ...) -> None: ...

    async def aclose(self, timeout: float = ...) -> None: ...


class _Hold:
    __slots__ = ("close_requested", "resource")

    def __init__(self, resource: Closable) -> None:
        self.resource = resource  # kept alive while held, so that its id stays its own
        self.close_requested = False


_lock = ForkSafeLock()
_held: dict[int, _Hold] = {}  # by id(resource): held is a matter of identity


def hold(resource: Closable) -> None:
    """From now on, until :func:`release`, the contrib shutdown hooks leave *resource* open."""
    with _lock:
        _held.setdefault(id(resource), _Hold(resource))


def release(resource: Closable) -> bool:
    """Stop holding *resource*; True if a shutdown hook asked to close it meanwhile (close it now)."""
    with _lock:
        found = _held.pop(id(resource), None)
    return found is not None and found.close_requested


def defer_close(resource: Closable) -> bool:
    """For a shutdown hook about to close *resource*: True if it is held, and the close is deferred to
    :func:`release` (the hook must then leave it open); False if the hook should close it now."""
    with _lock:
        found = _held.get(id(resource))
        if found is None:
            return False
        found.close_requested = True
        return True
