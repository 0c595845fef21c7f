"""What an entry of ``settings.LOOPBRIDGE`` says, and the DSN of a ``DATABASES`` alias.

Pure functions of the settings: nothing here connects, and nothing here keeps state. Every error is an
``ImproperlyConfigured`` naming the setting it is about (``LOOPBRIDGE['default']['dsn']``,
``DATABASES['default']['OPTIONS']``), never showing a password.
"""

from __future__ import annotations

import difflib
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from django.core.exceptions import ImproperlyConfigured

from loopbridge._dsn import DSN_ENV_VARS, redact

__all__ = [
    "ENTRY_KEYS",
    "EXAMPLE",
    "KINDS",
    "Entry",
    "alias_dsn",
    "parse_entries",
    "target_of",
]

EXAMPLE = "LOOPBRIDGE = {'default': {'dsn': 'postgresql://user@host:5432/dbname'}}"

#: What an entry builds: ``"database"`` (a :class:`loopbridge.Database`, the default) or ``"engine"`` (a
#: :class:`loopbridge.sqlalchemy.Engine`).
KINDS = ("database", "engine")

#: The keys of an entry that are loopbridge's own; every other key is a keyword of the Database (or
#: Engine) it builds.
ENTRY_KEYS = ("dsn", "alias", "kind")

#: The ``ENGINE`` values of ``DATABASES`` entries an ``alias`` may name: PostgreSQL, and PostGIS on it.
POSTGRESQL_ENGINES = ("django.db.backends.postgresql", "django.contrib.gis.db.backends.postgis")

# OPTIONS of Django's PostgreSQL backend that concern the ORM's own connections, not the server reached:
# loopbridge has its own pool, transactions and statements, so these are left to the ORM.
_ORM_ONLY_OPTIONS = frozenset({"isolation_level", "server_side_binding", "pool", "cursor_factory"})

# libpq connection parameters asyncpg reads from a DSN's query string as they are.
_DSN_OPTIONS = frozenset(
    {
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "service",
        "passfile",
        "application_name",
    }
)


@dataclass(frozen=True)
class Entry:
    """One entry of ``settings.LOOPBRIDGE``: what to build, and from which DSN or ``DATABASES`` alias."""

    name: str
    kind: str
    dsn: str | None
    alias: str | None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def setting(self) -> str:
        """``settings.LOOPBRIDGE['name']``, for messages."""
        return f"settings.LOOPBRIDGE[{self.name!r}]"


def parse_entries(setting: object) -> dict[str, Entry]:
    """The entries of a ``LOOPBRIDGE`` setting, checked (nothing is built).

    :raises ImproperlyConfigured: for a malformed setting, naming the entry and the key.
    """
    if not isinstance(setting, Mapping) or not setting:
        raise ImproperlyConfigured(
            f"settings.LOOPBRIDGE must be a dict of named databases, such as {EXAMPLE}; "
            f"got {type(setting).__name__}{' (empty)' if isinstance(setting, Mapping) else ''}"
        )
    entries: dict[str, Entry] = {}
    for name, value in setting.items():
        where = f"settings.LOOPBRIDGE[{name!r}]"
        if not isinstance(value, Mapping):
            raise ImproperlyConfigured(
                f"{where} must be a dict of Database options such as "
                f"{{'dsn': 'postgresql://user@host:5432/dbname', 'max_size': 10}} or "
                f"{{'alias': 'default'}}, not {type(value).__name__}"
            )
        options: dict[str, Any] = dict(value)
        dsn, alias = options.pop("dsn", None), options.pop("alias", None)
        kind = options.pop("kind", "database")
        if kind not in KINDS:
            raise ImproperlyConfigured(
                f"{where}['kind'] is {kind!r}: it must be 'database' (a loopbridge.Database, the default) "
                "or 'engine' (a loopbridge.sqlalchemy.Engine)"
            )
        if dsn is not None and not isinstance(dsn, str):
            raise ImproperlyConfigured(
                f"{where}['dsn'] must be a string such as 'postgresql://user@host:5432/dbname', "
                f"not {type(dsn).__name__}"
            )
        if alias is not None and not isinstance(alias, str):
            raise ImproperlyConfigured(
                f"{where}['alias'] must be the name of a DATABASES entry such as 'default', "
                f"not {type(alias).__name__}"
            )
        if dsn is not None and alias is not None:
            raise ImproperlyConfigured(
                f"{where} has both 'dsn' and 'alias': give one. 'alias' takes the server from "
                f"DATABASES[{alias!r}] (and follows it to the test database under tests); 'dsn' names "
                "a server of its own"
            )
        for key in options:  # a misspelt key of ours would be taken for a Database keyword
            _refuse_near_miss(where, str(key), kind)
        if dsn is None and alias is None and not any(os.environ.get(var) for var in DSN_ENV_VARS):
            raise ImproperlyConfigured(
                f"{where} has no DSN: set {where}['dsn'] = 'postgresql://user:password@host:5432/dbname', "
                f"or {where}['alias'] = 'default' to use the server of DATABASES['default'] (the ORM's "
                "database, followed to the test database under tests), or set $LOOPBRIDGE_DSN (or "
                "$DATABASE_URL) in the environment"
            )
        entries[str(name)] = Entry(str(name), kind, dsn, alias, options)
    return entries


def _refuse_near_miss(where: str, key: str, kind: str) -> None:
    if key == "engine":
        suggestion = "'kind': 'engine'"
    else:
        close = difflib.get_close_matches(key.lower(), ENTRY_KEYS, n=1, cutoff=0.65)
        if not close:
            return
        suggestion = repr(close[0])
    raise ImproperlyConfigured(
        f"{where} has the key {key!r}: did you mean {suggestion}? The keys of an entry are "
        f"{', '.join(map(repr, ENTRY_KEYS))}, and the keywords of the {kind} it builds"
    )


def target_of(settings_dict: Mapping[str, Any]) -> tuple[Any, ...]:
    """What, in a ``DATABASES`` entry, decides the server and database reached: equal targets give equal
    DSNs. Cheap: it is compared on every lookup of an entry that follows an alias."""
    options = settings_dict.get("OPTIONS") or {}
    return (
        settings_dict.get("ENGINE"),
        settings_dict.get("NAME"),
        settings_dict.get("HOST"),
        settings_dict.get("PORT"),
        settings_dict.get("USER"),
        settings_dict.get("PASSWORD"),
        list(options.items()) if isinstance(options, Mapping) else options,
    )


def alias_dsn(entry: Entry, settings_dict: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The DSN of the ``DATABASES`` entry *settings_dict* (the one ``entry.alias`` names, as it is now),
    and the keywords it needs beyond the DSN (``connect_timeout`` becomes asyncpg's ``timeout``).

    ``HOST`` (several, comma-separated; a directory for a Unix socket), ``PORT``, ``USER``, ``PASSWORD``,
    ``NAME`` and ``OPTIONS`` are read as Django's PostgreSQL backend reads them; an empty one is left to
    the same defaults as libpq's (``$PGHOST``, ``$PGPORT``, ...).

    :raises ImproperlyConfigured: for another ENGINE than PostgreSQL, or OPTIONS asyncpg has no
        equivalent for; the message names the setting and never shows the password.
    """
    where = f"DATABASES[{entry.alias!r}]"
    engine = settings_dict.get("ENGINE")
    if engine not in POSTGRESQL_ENGINES:
        raise ImproperlyConfigured(
            f"{entry.setting}['alias'] names {where}, whose ENGINE is {engine!r}: loopbridge talks to "
            f"PostgreSQL only ({' or '.join(map(repr, POSTGRESQL_ENGINES))}). Give the entry a 'dsn' "
            "instead"
        )
    password = _text(settings_dict.get("PASSWORD"))
    query: dict[str, str] = {}
    keywords: dict[str, Any] = {}
    options = settings_dict.get("OPTIONS") or {}
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured(f"{where}['OPTIONS'] must be a dict, not {type(options).__name__}")
    for key, value in options.items():
        if key in _ORM_ONLY_OPTIONS:
            continue
        if key in _DSN_OPTIONS:
            query[key] = _text(value)
        elif key == "connect_timeout":
            keywords["timeout"] = _seconds(entry, where, value)
        elif key == "options":
            query.update(_server_settings(entry, where, _text(value)))
        else:
            raise ImproperlyConfigured(
                f"{entry.setting}['alias'] names {where}, whose OPTIONS has {key!r}, which loopbridge "
                f"cannot pass on to asyncpg. It takes {', '.join(sorted(_DSN_OPTIONS))}, connect_timeout "
                f"and options ('-c name=value ...'), and leaves {', '.join(sorted(_ORM_ONLY_OPTIONS))} to "
                "the ORM. Give the entry a 'dsn' of its own instead"
            )
    hosts = [host.strip() for host in _text(settings_dict.get("HOST")).split(",") if host.strip()]
    ports = [port.strip() for port in _text(settings_dict.get("PORT")).split(",") if port.strip()]
    sockets = [host for host in hosts if host.startswith("/")]
    if sockets:  # a Unix socket's directory goes in the query: it is no URL host
        if len(sockets) != len(hosts):
            raise ImproperlyConfigured(
                f"{where}['HOST'] mixes socket directories and host names; give the entry a 'dsn' instead"
            )
        query["host"] = ",".join(hosts)
        if ports:
            query["port"] = ",".join(ports)
        netloc_hosts = ""
    else:
        if len(ports) > 1 and len(ports) != len(hosts):
            raise ImproperlyConfigured(
                f"{where} lists {len(hosts)} HOST(s) but {len(ports)} PORTs: give one port, or one per host"
            )
        if len(ports) == 1:
            ports = ports * max(len(hosts), 1)
        if hosts:
            netloc_hosts = ",".join(
                _host(host) + (f":{ports[i]}" if ports else "") for i, host in enumerate(hosts)
            )
        else:
            netloc_hosts = ""
            if ports:
                query["port"] = ports[0]
    user = _text(settings_dict.get("USER"))
    userinfo = quote(user, safe="")
    if password:
        userinfo += ":" + quote(password, safe="")
    name = _text(settings_dict.get("NAME"))
    dsn = f"postgresql://{userinfo}{'@' if userinfo else ''}{netloc_hosts}/{quote(name, safe='')}"
    if query:
        dsn += "?" + urlencode(query, quote_via=quote)
    return dsn, keywords


def redacted(text: str, settings_dict: Mapping[str, Any]) -> str:
    """*text* with the password of a ``DATABASES`` entry (raw and percent-encoded) replaced by ``***``."""
    password = _text(settings_dict.get("PASSWORD"))
    return redact(text, password, quote(password, safe="")) if password else text


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _seconds(entry: Entry, where: str, value: object) -> float:
    try:
        seconds = float(value) if isinstance(value, (int, float, str)) else float("nan")
    except ValueError:
        seconds = float("nan")
    if seconds != seconds:  # NaN: not a number at all
        raise ImproperlyConfigured(
            f"{where}['OPTIONS']['connect_timeout'] must be a number of seconds, not {value!r}"
        )
    if seconds <= 0:
        raise ImproperlyConfigured(
            f"{where}['OPTIONS']['connect_timeout'] must be a positive number of seconds, not {value!r}"
        )
    return seconds


def _server_settings(entry: Entry, where: str, options: str) -> dict[str, str]:
    """libpq's ``options`` (``-c search_path=app -c statement_timeout=5000``, or ``--name=value``) as
    server settings, which asyncpg takes from unknown query options of a DSN."""
    found: dict[str, str] = {}
    try:
        words = shlex.split(options)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{where}['OPTIONS']['options'] could not be read: {exc}") from None
    words_iter = iter(words)
    for word in words_iter:
        if word == "-c":
            setting = next(words_iter, "")
        elif word.startswith(("-c", "--")):
            setting = word[2:]
        else:
            setting = ""
        name, equals, value = setting.partition("=")
        if not equals or not name:
            raise ImproperlyConfigured(
                f"{entry.setting}['alias'] names {where}, whose OPTIONS['options'] is {options!r}: "
                "loopbridge reads '-c name=value' (or '--name=value') settings there, and nothing else. "
                "Give the entry a 'dsn' of its own instead"
            )
        found[name.replace("-", "_")] = value
    return found
