"""The errors of ``loopbridge.sqlalchemy``, and the guard that raises :class:`LazyLoadError`."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import sqlalchemy.exc
from sqlalchemy.orm import Session

from loopbridge.errors import DatabaseClosedError, LoopBridgeError

__all__ = ["EngineClosedError", "LazyLoadError"]


class EngineClosedError(DatabaseClosedError):
    """The :class:`Engine` was closed, or closed while a session scope was open (which was then ended
    without committing); create a new Engine to keep working."""


class LazyLoadError(LoopBridgeError, sqlalchemy.exc.MissingGreenlet):
    """An ORM object tried to load from the database outside the bridge loop: a lazy relationship, or an
    expired or deferred attribute, touched in the caller's thread.

    The session does its I/O only on the bridge loop. Load what you need inside the scope (eagerly with
    ``selectinload()``/``joinedload()``, or with ``session.refresh(obj, ["attr"])``), or move the code that
    walks relationships into ``session.run_sync(fn)``, where lazy loading works. Also a
    ``sqlalchemy.exc.MissingGreenlet``, which is what SQLAlchemy raises for the same mistake.
    """

    code = ""  # SQLAlchemy's link would explain greenlets; our message says what to do instead


class _HomeSession(Session):
    """The sync ``Session`` inside each scope's ``AsyncSession``: it refuses to touch the database from any
    thread but the one it was made on (the bridge thread).

    An ORM object in the caller's thread that reads an attribute it has not loaded calls
    :meth:`execute` here (lazy loads, expired and deferred attributes all do), before any autoflush: the
    check stops it while nothing has happened yet, with a message that says what to do instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._home = threading.get_ident()

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != self._home:
            raise LazyLoadError(_lazy_load_message(args[0] if args else kwargs.get("statement")))
        return super().execute(*args, **kwargs)

    def flush(self, objects: Sequence[Any] | None = None) -> None:
        if threading.get_ident() != self._home:
            raise LazyLoadError(_lazy_load_message(None))
        super().flush(objects)


def _lazy_load_message(statement: object) -> str:
    what = "an ORM object"
    descriptions = getattr(statement, "column_descriptions", None)
    if descriptions:
        entity = descriptions[0].get("entity")
        if isinstance(entity, type):
            what = f"an ORM object (loading {entity.__name__})"
    return (
        f"{what} tried to load from the database in thread {threading.current_thread().name!r}, "
        "outside the bridge loop: an attribute that was not loaded (a lazy relationship, or an expired "
        "or deferred column) was read there. Its session does I/O only on the bridge loop, so lazy "
        "loading cannot work here. Load what you need inside the session scope: eagerly, with "
        "select(...).options(selectinload(Parent.children)), or with session.refresh(obj, ['children']); "
        "or move the code that walks relationships into session.run_sync(fn), where lazy loading works"
    )
