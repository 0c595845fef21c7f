"""Flask: one Database per process, for sync and async views.

::

    from flask import Flask
    from loopbridge.contrib.flask import LoopBridge

    app = Flask(__name__)
    app.config["LOOPBRIDGE_DSN"] = "postgresql://app@db:5432/app"   # default: $LOOPBRIDGE_DSN
    app.config["LOOPBRIDGE_OPTIONS"] = {"max_size": 10}             # any Database keyword
    lb = LoopBridge(app)

    @app.get("/users/<int:user_id>")
    def user(user_id):                                # sync view
        return dict(lb.database.fetchrow("SELECT * FROM users WHERE id = $1", user_id))

    @app.get("/count")
    async def count():                                # async view (flask[async]): a loop per request
        return {"users": await lb.database.afetchval("SELECT count(*) FROM users")}

The Database is built once, by :meth:`LoopBridge.init_app`, not per request. Under ``gunicorn
--preload`` that happens in the master: each forked worker then opens a pool of its own on first use
and never touches the master's connections. Pools close when the process exits.
"""

from __future__ import annotations

from typing import Any

from loopbridge._extras import require

require("loopbridge.contrib.flask", "flask", "flask")

from flask import Flask, current_app, has_app_context

from loopbridge.database import Database
from loopbridge.errors import ConfigurationError

__all__ = ["LoopBridge", "get_database"]

_EXTENSION = "loopbridge"


class LoopBridge:
    """The Flask extension: ``LoopBridge(app)``, or ``LoopBridge()`` and later ``init_app(app)``.

    :param app: the app to set up now.
    :param database: use this Database instead of building one from the app's config.
    """

    def __init__(self, app: Flask | None = None, *, database: Database | None = None) -> None:
        self._app = app
        self._database = database
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Build the app's Database from ``LOOPBRIDGE_DSN`` (default ``$LOOPBRIDGE_DSN``, then
        ``$DATABASE_URL``) and ``LOOPBRIDGE_OPTIONS`` (keywords of :class:`~loopbridge.Database`).

        :raises ConfigurationError: for a malformed DSN or option, or a DSN given among the options,
            naming the config key.
        """
        if _EXTENSION in app.extensions:
            raise RuntimeError(f"LoopBridge is already set up on the Flask app {app.name!r}")
        database = self._database
        if database is None:
            options: Any = app.config.get("LOOPBRIDGE_OPTIONS") or {}
            if not isinstance(options, dict):
                raise ConfigurationError(
                    "app.config['LOOPBRIDGE_OPTIONS'] must be a dict of Database keywords such as "
                    f"{{'max_size': 10}}, not {type(options).__name__}"
                )
            if "dsn" in options:  # Database(dsn, dsn=...) would be a bare TypeError
                raise ConfigurationError(
                    f"Flask app {app.name!r}: the DSN goes in app.config['LOOPBRIDGE_DSN'] (default "
                    "$LOOPBRIDGE_DSN, then $DATABASE_URL), not in app.config['LOOPBRIDGE_OPTIONS'], which "
                    "holds the other Database keywords, such as {'max_size': 10}"
                )
            try:
                database = Database(app.config.get("LOOPBRIDGE_DSN"), **options)
            except (ConfigurationError, TypeError) as exc:
                raise ConfigurationError(
                    f"Flask app {app.name!r} (LOOPBRIDGE_DSN / LOOPBRIDGE_OPTIONS): {exc}"
                ) from exc
        app.extensions[_EXTENSION] = database

    @property
    def database(self) -> Database:
        """The Database of the current app (or, outside an app context, of the app given to the
        constructor).

        :raises RuntimeError: outside an app context when no app was given to the constructor, or if
            the app was not set up with :meth:`init_app`.
        """
        if has_app_context():
            return get_database()
        if self._app is not None:
            return _database_of(self._app)
        raise RuntimeError(
            "LoopBridge.database outside an application context: use it in a view, or inside "
            "'with app.app_context():'"
        )


def get_database() -> Database:
    """The Database of ``flask.current_app``.

    :raises RuntimeError: outside an app context, or if the app has no LoopBridge.
    """
    if not has_app_context():
        raise RuntimeError(
            "get_database() outside an application context: call it in a view, or inside "
            "'with app.app_context():'"
        )
    return _database_of(current_app)


def _database_of(app: Flask) -> Database:
    database = app.extensions.get(_EXTENSION)
    if not isinstance(database, Database):
        raise RuntimeError(
            f"the Flask app {app.name!r} has no loopbridge Database: call LoopBridge(app) or "
            "LoopBridge().init_app(app) when creating it"
        )
    return database
