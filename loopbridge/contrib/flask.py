"""Flask: one Database (or SQLAlchemy Engine) per process, for sync and async views.

::

    from flask import Flask
    from loopbridge.contrib.flask import LoopBridge

    app = Flask(__name__)
    app.config["LOOPBRIDGE_DSN"] = "postgresql://app@db:5432/app"   # default: $LOOPBRIDGE_DSN
    app.config["LOOPBRIDGE_OPTIONS"] = {"max_size": 10}             # any Database keyword
    lb = LoopBridge(app)

    @app.get("/users/<int:user_id>")
    def user(user_id):                                # sync view
        row = lb.database.fetchrow("SELECT * FROM users WHERE id = $1", user_id)
        return dict(row) if row else ("not found", 404)

    @app.get("/count")
    async def count():                                # async view (flask[async]): a loop per request
        return {"users": await lb.database.afetchval("SELECT count(*) FROM users")}

With ``app.config["LOOPBRIDGE_KIND"] = "engine"`` the extension builds a :class:`loopbridge.sqlalchemy.Engine`
instead (``LOOPBRIDGE_OPTIONS`` then holds Engine keywords: ``pool_size``, ``echo``, ...), which views reach
as ``lb.engine`` (or :func:`get_engine`): ``with lb.engine.session() as session:`` in sync views,
``async with`` in async ones.

What the extension uses is built once, by :meth:`LoopBridge.init_app`, not per request. Under ``gunicorn
--preload`` that happens in the master: each forked worker then opens a pool of its own on first use and
never touches the master's connections. Pools close when the process exits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loopbridge._extras import require

require("loopbridge.contrib.flask", "flask", "flask")

from flask import Flask, current_app, has_app_context

from loopbridge._dsn import DSN_ENV_VARS
from loopbridge.database import Database
from loopbridge.errors import ConfigurationError

if TYPE_CHECKING:
    from loopbridge.sqlalchemy import Engine

__all__ = ["LoopBridge", "get_database", "get_engine"]

_EXTENSION = "loopbridge"

#: What ``LOOPBRIDGE_KIND`` may say: build a Database (the default) or a loopbridge.sqlalchemy Engine.
KINDS = ("database", "engine")


@dataclass(frozen=True)
class _Resources:
    """What an app's extension holds (``app.extensions["loopbridge"]``)."""

    database: Database | None
    engine: Engine | None


class LoopBridge:
    """The Flask extension: ``LoopBridge(app)``, or ``LoopBridge()`` and later ``init_app(app)``.

    :param app: the app to set up now.
    :param database: use this Database instead of building one from the app's config.
    :param engine: use this ``loopbridge.sqlalchemy.Engine`` instead of building one from the app's
        config. Given both, the app has both, and its config is not read.
    """

    def __init__(
        self, app: Flask | None = None, *, database: Database | None = None, engine: Engine | None = None
    ) -> None:
        self._app = app
        self._database = database
        self._engine = engine
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Set *app* up. Unless given to the constructor, build what ``LOOPBRIDGE_KIND`` says
        (``"database"``, the default, or ``"engine"``) from ``LOOPBRIDGE_DSN`` (default
        ``$LOOPBRIDGE_DSN``, then ``$DATABASE_URL``) and ``LOOPBRIDGE_OPTIONS`` (keywords of
        :class:`~loopbridge.Database`, or of :class:`loopbridge.sqlalchemy.Engine`).

        :raises ConfigurationError: for a malformed or missing DSN, option or kind, or a DSN given among
            the options, naming the config key.
        :raises RuntimeError: if the app is already set up.
        """
        if _EXTENSION in app.extensions:
            raise RuntimeError(f"LoopBridge is already set up on the Flask app {app.name!r}")
        database, engine = self._database, self._engine
        if database is None and engine is None:
            kind = app.config.get("LOOPBRIDGE_KIND") or "database"
            if kind not in KINDS:
                raise ConfigurationError(
                    f"Flask app {app.name!r}: app.config['LOOPBRIDGE_KIND'] is {kind!r}; it must be "
                    "'database' (a loopbridge.Database, the default) or 'engine' (a "
                    "loopbridge.sqlalchemy.Engine)"
                )
            if kind == "engine":
                engine = _build_engine(app)
            else:
                database = _build(app, Database, "Database")
        app.extensions[_EXTENSION] = _Resources(database, engine)

    @property
    def database(self) -> Database:
        """The Database of the current app (or, outside an app context, of the app given to the
        constructor).

        :raises RuntimeError: outside an app context when no app was given to the constructor, if the
            app was not set up with :meth:`init_app`, or if it has an Engine and no Database.
        """
        if has_app_context():
            return get_database()
        return _database_of(self._app_outside_a_context("database"))

    @property
    def engine(self) -> Engine:
        """The ``loopbridge.sqlalchemy.Engine`` of the current app (or, outside an app context, of the
        app given to the constructor).

        :raises RuntimeError: as :attr:`database` does, or if the app has a Database and no Engine.
        """
        if has_app_context():
            return get_engine()
        return _engine_of(self._app_outside_a_context("engine"))

    def _app_outside_a_context(self, what: str) -> Flask:
        if self._app is None:
            raise RuntimeError(
                f"LoopBridge.{what} outside an application context: use it in a view, or inside "
                "'with app.app_context():'"
            )
        return self._app


def get_database() -> Database:
    """The Database of ``flask.current_app``.

    :raises RuntimeError: outside an app context, or if the app has no LoopBridge Database.
    """
    return _database_of(_current_app("get_database()"))


def get_engine() -> Engine:
    """The ``loopbridge.sqlalchemy.Engine`` of ``flask.current_app``.

    :raises RuntimeError: outside an app context, or if the app has no LoopBridge Engine.
    """
    return _engine_of(_current_app("get_engine()"))


def _current_app(what: str) -> Flask:
    if not has_app_context():
        raise RuntimeError(
            f"{what} outside an application context: call it in a view, or inside 'with app.app_context():'"
        )
    return current_app


def _resources_of(app: Flask) -> _Resources:
    found = app.extensions.get(_EXTENSION)
    if not isinstance(found, _Resources):
        raise RuntimeError(
            f"the Flask app {app.name!r} has no loopbridge extension: call LoopBridge(app) or "
            "LoopBridge().init_app(app) when creating it"
        )
    return found


def _database_of(app: Flask) -> Database:
    database = _resources_of(app).database
    if database is None:
        raise RuntimeError(
            f"the Flask app {app.name!r} has a loopbridge.sqlalchemy Engine (LOOPBRIDGE_KIND = 'engine'), "
            "no Database: use lb.engine (or get_engine())"
        )
    return database


def _engine_of(app: Flask) -> Engine:
    engine = _resources_of(app).engine
    if engine is None:
        raise RuntimeError(
            f"the Flask app {app.name!r} has a loopbridge Database, no Engine: set "
            "app.config['LOOPBRIDGE_KIND'] = 'engine' to build a loopbridge.sqlalchemy Engine instead, or "
            "pass LoopBridge(app, engine=Engine(...))"
        )
    return engine


def _build_engine(app: Flask) -> Engine:
    try:
        from loopbridge.sqlalchemy import Engine
    except ModuleNotFoundError as exc:
        raise ConfigurationError(f"Flask app {app.name!r} has LOOPBRIDGE_KIND = 'engine': {exc}") from exc
    engine: Engine = _build(app, Engine, "Engine")
    return engine


def _build(app: Flask, cls: Any, what: str) -> Any:
    """``cls(LOOPBRIDGE_DSN, **LOOPBRIDGE_OPTIONS)``, errors naming the config keys."""
    options: Any = app.config.get("LOOPBRIDGE_OPTIONS") or {}
    if not isinstance(options, dict):
        raise ConfigurationError(
            f"app.config['LOOPBRIDGE_OPTIONS'] must be a dict of {what} keywords such as "
            f"{{'max_size': 10}}, not {type(options).__name__}"
        )
    if "dsn" in options or "url" in options:  # Database(dsn, dsn=...) would be a bare TypeError
        raise ConfigurationError(
            f"Flask app {app.name!r}: the DSN goes in app.config['LOOPBRIDGE_DSN'] (default "
            "$LOOPBRIDGE_DSN, then $DATABASE_URL), not in app.config['LOOPBRIDGE_OPTIONS'], which "
            f"holds the other {what} keywords, such as {{'max_size': 10}}"
        )
    dsn = app.config.get("LOOPBRIDGE_DSN")
    if dsn is None and not any(os.environ.get(var) for var in DSN_ENV_VARS):
        raise ConfigurationError(
            f"Flask app {app.name!r} has no DSN: set app.config['LOOPBRIDGE_DSN'] = "
            "'postgresql://user:password@host:5432/dbname', or $LOOPBRIDGE_DSN (or $DATABASE_URL) in the "
            "environment"
        )
    try:
        return cls(dsn, **options)
    except (ConfigurationError, TypeError) as exc:
        raise ConfigurationError(
            f"Flask app {app.name!r} (LOOPBRIDGE_DSN / LOOPBRIDGE_OPTIONS): {exc}"
        ) from exc
