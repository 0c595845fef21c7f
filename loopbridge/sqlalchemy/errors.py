"""The errors of ``loopbridge.sqlalchemy``, and the guard that raises :class:`LazyLoadError`."""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from types import FrameType
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


class _HomeGuard(Session):
    """Mixed into the sync ``Session`` inside each scope's ``AsyncSession`` (see :func:`home_session_class`):
    it refuses to touch the database from any thread but the one it was made on (the bridge thread).

    An ORM object in the caller's thread that reads an attribute it has not loaded calls
    :meth:`execute` here (lazy loads, expired and deferred attributes all do), before any autoflush: the
    check stops it while nothing has happened yet, with a message that says what to do instead.
    """

    #: Set by the scope: its facade is the async one (the message then says ``await``).
    _loopbridge_async: bool | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._home = threading.get_ident()

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != self._home:
            statement = args[0] if args else kwargs.get("statement")
            raise LazyLoadError(_lazy_load_message(statement, self._loopbridge_async))
        return super().execute(*args, **kwargs)

    def flush(self, objects: Sequence[Any] | None = None) -> None:
        if threading.get_ident() != self._home:
            raise LazyLoadError(_lazy_load_message(None, self._loopbridge_async))
        super().flush(objects)


_home_classes: dict[type[Session], type[_HomeGuard]] = {}
_home_lock = threading.Lock()


def home_session_class(base: type[Session]) -> type[_HomeGuard]:
    """The guarded sync session class for *base* (``Session``, or a subclass such as SQLModel's), made
    once per base."""
    with _home_lock:
        found = _home_classes.get(base)
        if found is None:
            found = _home_classes[base] = type(f"Home{base.__name__}", (_HomeGuard, base), {})
        return found


def _lazy_load_message(statement: object, in_async: bool | None) -> str:
    """What :class:`LazyLoadError` says: which attribute was read (found in the ORM's frame that fires the
    loader), in which thread, and how to load it instead, with ``await`` where the session is awaited."""
    attribute = _attribute_being_loaded()
    what = "an ORM object"
    if attribute is not None:
        what = f"{attribute[0]}.{attribute[1]}"
    else:
        descriptions = getattr(statement, "column_descriptions", None)
        if descriptions:
            entity = descriptions[0].get("entity")
            if isinstance(entity, type):
                what = f"an ORM object (loading {entity.__name__})"
    name = attribute[1] if attribute is not None else "children"
    refresh = f"session.refresh(obj, [{name!r}])"
    if in_async is None:
        refresh = f"{refresh} (await {refresh} in async code)"
    elif in_async:
        refresh = f"await {refresh}"
    eager = f"{attribute[0]}.{attribute[1]}" if attribute is not None else "Parent.children"
    return (
        f"{what} tried to load from the database in thread {threading.current_thread().name!r}, outside "
        "the bridge loop: an attribute that was not loaded (a lazy relationship, or an expired or deferred "
        "column) was read there. Its session does I/O only on the bridge loop, so lazy loading cannot work "
        f"here. Load it inside the session scope: {refresh}, or eagerly with "
        f"select(...).options(selectinload({eager})); or move the code that walks relationships into "
        "session.run_sync(fn), where lazy loading works"
    )


def _attribute_being_loaded() -> tuple[str, str] | None:
    """(class name, attribute) of the attribute whose loader the ORM is firing, from its frame."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_fire_loader_callables" and code.co_filename.endswith("attributes.py"):
            state, key = frame.f_locals.get("state"), frame.f_locals.get("key")
            class_ = getattr(state, "class_", None)
            if isinstance(class_, type) and isinstance(key, str):
                return class_.__name__, key
        frame = frame.f_back
    return None
