"""Django: the Databases (and SQLAlchemy Engines) named in ``settings.LOOPBRIDGE``, for sync and async
views, WSGI and ASGI.

::

    # settings.py
    INSTALLED_APPS = [..., "loopbridge.contrib.django"]
    LOOPBRIDGE = {
        "default": {"alias": "default", "max_size": 10},              # the server of DATABASES["default"]
        "analytics": {"dsn": os.environ["ANALYTICS_DSN"], "command_timeout": 60},
        "orm": {"alias": "default", "kind": "engine", "pool_size": 5},  # a loopbridge.sqlalchemy.Engine
    }

    # views.py
    from loopbridge.contrib.django import databases, engines

    def report(request):                   # sync view: WSGI, or ASGI's thread-sensitive executor
        return JsonResponse({"users": databases["default"].fetchval("SELECT count(*) FROM users")})

    async def areport(request):            # async view: ASGI's loop, or a loop of its own under WSGI
        return JsonResponse({"users": await databases["default"].afetchval("SELECT count(*) FROM users")})

Each entry takes, besides the keywords of what it builds (:class:`~loopbridge.Database`: ``max_size``,
``pool_timeout``, asyncpg options; with ``"kind": "engine"``, :class:`loopbridge.sqlalchemy.Engine`:
``pool_size``, ``echo``, ...):

``dsn``
    The server: ``postgresql://user:password@host:5432/dbname``. Default: ``$LOOPBRIDGE_DSN``, then
    ``$DATABASE_URL``.
``alias``
    Instead of ``dsn``: the key of a ``DATABASES`` entry (its ENGINE must be PostgreSQL), whose HOST,
    PORT, USER, PASSWORD, NAME and OPTIONS make the DSN. The entry *follows* that alias: when Django's
    test runner (``manage.py test``) or pytest-django switches it to the test database, the Database
    is rebuilt on it at its next lookup, and closed before Django drops the test database. So look it
    up where you use it (``databases["default"]``), rather than keeping it in a module global. Inside
    Django's test environment, a lookup while the alias still names the real database (no test
    database created: a test without database access) raises ``RuntimeError`` rather than touch it.
``kind``
    ``"database"`` (default: ``databases[name]``) or ``"engine"`` (``engines[name]``).

The app builds them when Django starts (no connection is made until first use) and closes them when the
process exits.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Union, cast

from loopbridge._extras import require

require("loopbridge.contrib.django", "django", "django")

from django.core.exceptions import ImproperlyConfigured

from loopbridge.contrib import _held
from loopbridge.database import Database
from loopbridge.errors import BridgeClosedError, ConfigurationError

from ._settings import EXAMPLE, Entry, alias_dsn, parse_entries, redacted, target_of

if TYPE_CHECKING:
    from loopbridge.sqlalchemy import Engine

__all__ = ["Databases", "Engines", "databases", "engines"]

_EXAMPLE = EXAMPLE  # the app config's message

_Resource = Union[Database, "Engine"]

#: How long the close of an entry's pool may take before Django creates or drops a test database.
_CLOSE_TIMEOUT = 10.0


class _Slot:
    """One entry, and what it has built, with what that was built for (for an alias, its target)."""

    __slots__ = ("built", "entry", "real_name")

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        # One attribute, replaced whole: a lookup without the lock never pairs one build's resource with
        # another's target.
        self.built: tuple[_Resource, tuple[Any, ...] | None] | None = None
        # The alias's NAME when Django started (outside any test environment): the real database, which
        # tests must not reach. None when unknown: no guard then.
        self.real_name: object = None

    @property
    def resource(self) -> _Resource | None:
        built = self.built
        return None if built is None else built[0]


class _Registry:
    """The entries of ``settings.LOOPBRIDGE`` and what they built; shared by :data:`databases` and
    :data:`engines`."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] | None = None
        self._lock = threading.Lock()

    def configured(self) -> dict[str, _Slot]:
        slots = self._slots
        if slots is None:
            raise ImproperlyConfigured(
                "loopbridge.contrib.django has no Databases yet: add 'loopbridge.contrib.django' to "
                "INSTALLED_APPS (they are built when Django starts: django.setup(), manage.py, or the "
                "WSGI/ASGI application)"
            )
        return slots

    def configure(self, setting: object) -> None:
        entries = parse_entries(setting)
        slots: dict[str, _Slot] = {}
        try:
            for name, entry in entries.items():
                slot = slots[name] = _Slot(entry)
                settings_dict = _alias_settings(entry) if entry.alias is not None else None
                # Built now, so that a malformed entry stops Django at startup; nothing connects yet.
                target = target_of(settings_dict) if settings_dict is not None else None
                slot.built = (_build(entry, settings_dict), target)
                if settings_dict is not None and not _in_test_environment():
                    slot.real_name = settings_dict.get("NAME")
        except BaseException:
            for slot in slots.values():
                if slot.resource is not None:
                    slot.resource.close()  # never opened: nothing crosses to the bridge
            raise
        with self._lock:
            old, self._slots = self._slots, slots
        for slot in (old or {}).values():
            resource = slot.resource
            if resource is not None and not _held.defer_close(resource):
                resource.close()

    def get(self, name: str, kind: str) -> _Resource:
        slot = self.configured().get(name)
        if slot is None or slot.entry.kind != kind:
            raise KeyError(self._missing(name, kind))
        built = slot.built
        if slot.entry.alias is None:
            assert built is not None  # built by configure, never dropped
            return built[0]
        # Following an alias: what does it name now? (A few dict lookups: this runs on every lookup.)
        settings_dict = _alias_settings(slot.entry)
        if slot.real_name is not None and _in_test_environment():
            self._refuse_the_real_database(slot, settings_dict)
        target = target_of(settings_dict)
        if built is not None and built[1] == target:
            return built[0]
        return self._rebuild(slot, settings_dict, target)

    def _rebuild(self, slot: _Slot, settings_dict: Mapping[str, Any], target: tuple[Any, ...]) -> _Resource:
        with self._lock:
            built = slot.built
            if built is not None and built[1] == target:  # rebuilt by another thread meanwhile
                return built[0]
            new = _build(slot.entry, settings_dict)
            slot.built = (new, target)
        if built is not None:
            _close_soon(built[0])
        return new

    def close_followers(self) -> None:
        """Close what follows an alias, now; it is rebuilt at its next lookup. Before Django creates,
        clones or drops a test database: PostgreSQL refuses to while sessions are connected to it (or
        to its template)."""
        with self._lock:
            found = []
            for slot in (self._slots or {}).values():
                resource = slot.resource
                if slot.entry.alias is not None and resource is not None:
                    found.append(resource)
                    slot.built = None
        for resource in found:
            # Even one the pytest plugin holds: a DROP DATABASE that fails would break the test run.
            resource.close(_CLOSE_TIMEOUT)

    def close_all(self, timeout: float) -> None:
        for slot in (self._slots or {}).values():
            resource = slot.resource
            if resource is not None and not _held.defer_close(resource):
                resource.close(timeout)

    def names(self, kind: str) -> list[str]:
        return [name for name, slot in self.configured().items() if slot.entry.kind == kind]

    def describe(self) -> str:
        slots = self._slots
        if slots is None:
            return "not configured yet"
        return ", ".join(
            f"{name!r}: {'not built yet' if slot.resource is None else repr(slot.resource)}"
            for name, slot in slots.items()
        )

    def _missing(self, name: str, kind: str) -> str:
        slot = self.configured().get(name)
        if slot is not None:
            other = "engines" if slot.entry.kind == "engine" else "databases"
            built = "an Engine ('kind': 'engine')" if slot.entry.kind == "engine" else "a Database"
            return (
                f"settings.LOOPBRIDGE[{name!r}] builds {built}: use "
                f"loopbridge.contrib.django.{other}[{name!r}]"
            )
        mine = ", ".join(repr(key) for key in self.names(kind)) or "none"
        what = "engine" if kind == "engine" else "database"
        hint = " (an entry with 'kind': 'engine')" if kind == "engine" else ""
        return f"no loopbridge {what} {name!r}: settings.LOOPBRIDGE defines {mine}{hint}"

    def _refuse_the_real_database(self, slot: _Slot, settings_dict: Mapping[str, Any]) -> None:
        name = settings_dict.get("NAME")
        if name != slot.real_name:
            return
        entry = slot.entry
        raise RuntimeError(
            f"{entry.setting} follows DATABASES[{entry.alias!r}], which still names {name!r}, the "
            "database Django started with, while Django's test environment is set up: no test database "
            "was created for this test (or not yet: the runner creates it after importing the tests). "
            "loopbridge does not touch the real database from tests. Under pytest-django, give the test "
            "database access (@pytest.mark.django_db, or the db or transactional_db fixture); under "
            "manage.py test, use a TestCase or TransactionTestCase (a SimpleTestCase gets no database). "
            f"Look {'engines' if entry.kind == 'engine' else 'databases'}[{entry.name!r}] up where you use "
            "it, not when a module is imported"
        )


class Databases(Mapping[str, Database]):
    """The Databases of ``settings.LOOPBRIDGE`` by name: ``databases["default"]``.

    An entry that follows a ``DATABASES`` alias gives the Database for what the alias names now (the
    test database, under tests): look it up where you use it.
    """

    def __init__(self, registry: _Registry | None = None) -> None:
        self._registry = registry if registry is not None else _Registry()

    def __getitem__(self, name: str) -> Database:
        """The Database of entry *name*.

        :raises KeyError: if there is no such entry, or it builds an Engine (the message says so).
        :raises RuntimeError: inside Django's test environment, for an entry that follows an alias that
            still names the real database (no test database was created).
        :raises django.core.exceptions.ImproperlyConfigured: before Django started.
        """
        return cast(Database, self._registry.get(name, "database"))

    def __contains__(self, name: object) -> bool:
        return name in self._registry.names("database")

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.names("database"))

    def __len__(self) -> int:
        return len(self._registry.names("database"))

    def __repr__(self) -> str:
        return f"<loopbridge Databases {self._registry.describe()}>"

    def configure(self, settings: object) -> None:
        """Build the Databases and Engines of *settings* (a ``LOOPBRIDGE`` dict); called by the app at
        startup. Those built by an earlier call are closed first.

        :raises django.core.exceptions.ImproperlyConfigured: for a missing or malformed setting; the
            message names the entry (and the ``DATABASES`` alias), never a password.
        """
        self._registry.configure(settings)

    def close_all(self, timeout: float = 10.0) -> None:
        """Close every Database and Engine (safe twice); the app registers it to run at process exit.

        What the pytest plugin holds for its session (``loopbridge_app_db``, ``loopbridge_app_engine``)
        is left open, and closed by the plugin at the session's end.
        """
        self._registry.close_all(timeout)


class Engines(Mapping[str, "Engine"]):
    """The ``loopbridge.sqlalchemy`` Engines of ``settings.LOOPBRIDGE`` (entries with ``"kind":
    "engine"``) by name: ``engines["orm"]``. They follow a ``DATABASES`` alias as Databases do."""

    def __init__(self, registry: _Registry) -> None:
        self._registry = registry

    def __getitem__(self, name: str) -> Engine:
        """The Engine of entry *name*; raises as :meth:`Databases.__getitem__` does."""
        return cast("Engine", self._registry.get(name, "engine"))

    def __contains__(self, name: object) -> bool:
        return name in self._registry.names("engine")

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.names("engine"))

    def __len__(self) -> int:
        return len(self._registry.names("engine"))

    def __repr__(self) -> str:
        return f"<loopbridge Engines {self._registry.describe()}>"


def _alias_settings(entry: Entry) -> Mapping[str, Any]:
    """The ``DATABASES`` entry *entry* follows, as the ORM's connections see it now (Django's test
    setup changes its NAME in place)."""
    from django.db import connections

    found: Mapping[str, Any] | None = connections.settings.get(entry.alias or "")
    if found is None:
        known = ", ".join(repr(alias) for alias in connections.settings) or "none"
        raise ImproperlyConfigured(
            f"{entry.setting}['alias'] is {entry.alias!r}, which settings.DATABASES does not define "
            f"(it defines {known})"
        )
    return found


def _build(entry: Entry, settings_dict: Mapping[str, Any] | None) -> _Resource:
    """The Database (or Engine) of *entry*, for the ``DATABASES`` entry it follows as it is now."""
    options: dict[str, Any] = dict(entry.options)
    dsn = entry.dsn
    source = ""
    if settings_dict is not None:
        dsn, keywords = alias_dsn(entry, settings_dict)
        source = f" (the server of DATABASES[{entry.alias!r}])"
        for key, value in keywords.items():  # the entry's own keywords win
            if entry.kind == "engine":
                connect_args = dict(options.get("connect_args") or {})
                connect_args.setdefault(key, value)
                options["connect_args"] = connect_args
            else:
                options.setdefault(key, value)
    try:
        if entry.kind == "engine":
            try:
                from loopbridge.sqlalchemy import Engine
            except ModuleNotFoundError as exc:
                raise ImproperlyConfigured(f"{entry.setting} has 'kind': 'engine': {exc}") from exc
            return Engine(dsn, **options)
        return Database(dsn, **options)
    except (ConfigurationError, TypeError) as exc:
        message = str(exc) if settings_dict is None else redacted(str(exc), settings_dict)
        raise ImproperlyConfigured(f"{entry.setting}{source}: {message}") from None


def _close_soon(resource: _Resource) -> None:
    """Close a Database (or Engine) an entry no longer uses, without waiting: the lookup that replaced
    it may be in an async view, on a running loop."""
    if _held.defer_close(resource):
        return
    if not resource.bridge.running:  # never used, or after a fork: nothing to cross to the bridge for
        resource.close()
        return
    try:
        resource.bridge.submit(resource.aclose)
    except BridgeClosedError:  # closed with its bridge
        pass


def _in_test_environment() -> bool:
    """Has Django's test environment been set up (``setup_test_environment()``, which both
    ``manage.py test`` and pytest-django call)? It keeps what it changed on ``_TestState`` until
    ``teardown_test_environment()``. Should that ever move, this says False: no guard, nothing else."""
    utils = sys.modules.get("django.test.utils")
    return utils is not None and hasattr(getattr(utils, "_TestState", None), "saved_data")


def _before_test_databases(sender: object, connection: Any, **kwargs: object) -> None:
    """Django's ``connection_created`` signal: a connection to no database in particular is how Django
    creates, clones and drops test databases (``connection.creation``), with either test runner."""
    from django.db.backends.base.base import NO_DB_ALIAS

    if getattr(connection, "alias", None) == NO_DB_ALIAS:
        _registry.close_followers()


_registry = _Registry()

#: The Databases of ``settings.LOOPBRIDGE``, built when Django starts.
databases = Databases(_registry)

#: The ``loopbridge.sqlalchemy`` Engines of ``settings.LOOPBRIDGE`` (``"kind": "engine"``).
engines = Engines(_registry)
