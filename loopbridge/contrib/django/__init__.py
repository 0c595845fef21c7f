"""Django: the Databases named in ``settings.LOOPBRIDGE``, for sync and async views, WSGI and ASGI.

::

    # settings.py
    INSTALLED_APPS = [..., "loopbridge.contrib.django"]
    LOOPBRIDGE = {
        "default": {"dsn": "postgresql://app@db:5432/app", "max_size": 10},
        "analytics": {"dsn": os.environ["ANALYTICS_DSN"], "command_timeout": 60},
    }

    # views.py
    from loopbridge.contrib.django import databases

    def report(request):                   # sync view: WSGI, or ASGI's thread-sensitive executor
        return JsonResponse({"users": databases["default"].fetchval("SELECT count(*) FROM users")})

    async def areport(request):            # async view: ASGI's loop, or a loop of its own under WSGI
        return JsonResponse({"users": await databases["default"].afetchval("SELECT count(*) FROM users")})

Each entry takes ``dsn`` (default: ``$LOOPBRIDGE_DSN``, then ``$DATABASE_URL``) and any keyword of
:class:`~loopbridge.Database` (``max_size``, ``pool_timeout``, asyncpg options). The app builds them
when Django starts (no connection is made until first use) and closes them when the process exits.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from loopbridge._extras import require

require("loopbridge.contrib.django", "django", "django")

from loopbridge.contrib import _held
from loopbridge.database import Database
from loopbridge.errors import ConfigurationError

__all__ = ["Databases", "databases"]

_EXAMPLE = "LOOPBRIDGE = {'default': {'dsn': 'postgresql://user@host:5432/dbname'}}"


class Databases(Mapping[str, Database]):
    """The Databases of ``settings.LOOPBRIDGE`` by name: ``databases["default"]``."""

    def __init__(self) -> None:
        self._databases: dict[str, Database] | None = None
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Database:
        found = self._configured().get(name)
        if found is None:
            raise KeyError(
                f"no loopbridge database {name!r}: settings.LOOPBRIDGE defines "
                f"{', '.join(repr(key) for key in self._configured()) or 'none'}"
            )
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._configured())

    def __len__(self) -> int:
        return len(self._configured())

    def __repr__(self) -> str:
        if self._databases is None:
            return "<loopbridge Databases: not configured yet>"
        return f"<loopbridge Databases {self._databases!r}>"

    def _configured(self) -> dict[str, Database]:
        found = self._databases
        if found is None:
            from django.core.exceptions import ImproperlyConfigured

            raise ImproperlyConfigured(
                "loopbridge.contrib.django has no Databases yet: add 'loopbridge.contrib.django' to "
                "INSTALLED_APPS (they are built when Django starts: django.setup(), manage.py, or the "
                "WSGI/ASGI application)"
            )
        return found

    def configure(self, settings: object) -> None:
        """Build the Databases from *settings* (a ``LOOPBRIDGE`` dict); called by the app at startup.

        Databases already built by an earlier call are closed first.

        :raises django.core.exceptions.ImproperlyConfigured: for a missing or malformed setting; the
            message names the entry, never a password.
        """
        built = build(settings)
        with self._lock:
            old, self._databases = self._databases, built
        for db in (old or {}).values():
            if not _held.defer_close(db):
                db.close()

    def close_all(self, timeout: float = 10.0) -> None:
        """Close every Database (safe twice); the app registers it to run at process exit.

        A Database the pytest plugin holds for its session (``loopbridge_app_db``) is left open, and
        closed by the plugin at the session's end.
        """
        for db in (self._databases or {}).values():
            if not _held.defer_close(db):
                db.close(timeout)


def build(settings: object) -> dict[str, Database]:
    """The Databases a ``LOOPBRIDGE`` setting describes (see the module docstring).

    :raises django.core.exceptions.ImproperlyConfigured: for a malformed setting.
    """
    from django.core.exceptions import ImproperlyConfigured

    if not isinstance(settings, Mapping) or not settings:
        raise ImproperlyConfigured(
            f"settings.LOOPBRIDGE must be a dict of named databases, such as {_EXAMPLE}; "
            f"got {type(settings).__name__}{' (empty)' if isinstance(settings, Mapping) else ''}"
        )
    built: dict[str, Database] = {}
    for name, entry in settings.items():
        if not isinstance(entry, Mapping):
            raise ImproperlyConfigured(
                f"settings.LOOPBRIDGE[{name!r}] must be a dict of Database options such as "
                f"{{'dsn': 'postgresql://user@host:5432/dbname', 'max_size': 10}}, not {type(entry).__name__}"
            )
        options: dict[str, Any] = dict(entry)
        dsn = options.pop("dsn", None)
        try:
            built[str(name)] = Database(dsn, **options)
        except (ConfigurationError, TypeError) as exc:
            raise ImproperlyConfigured(f"settings.LOOPBRIDGE[{name!r}]: {exc}") from exc
    return built


#: The Databases of ``settings.LOOPBRIDGE``, built when Django starts.
databases = Databases()
