"""The Engine's options, checked in the caller's thread before anything runs on the bridge: its URL
(normalised for asyncpg), the connect options of SQLAlchemy's asyncpg dialect and of ``asyncpg.connect``,
the adjustments for PgBouncer, the engine's own keywords and a session scope's."""

from __future__ import annotations

import difflib
import inspect
import re
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import unquote_plus

import asyncpg
import sqlalchemy.exc
from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from loopbridge._call import describe
from loopbridge._dsn import parse_dsn
from loopbridge.errors import ConfigurationError

__all__: list[str] = []

# The options of SQLAlchemy's asyncpg dialect itself (its adapter around each asyncpg connection), which
# it takes from the URL's query and from connect_args, apart from asyncpg.connect's keywords.
_DIALECT_OPTIONS = frozenset({"prepared_statement_cache_size", "prepared_statement_name_func"})
# asyncpg.connect's keywords, for connect_args. (loop: the connection is always made on the bridge loop.)
_CONNECT_OPTIONS = frozenset(inspect.signature(asyncpg.connect).parameters) - {"dsn", "loop"}
# URL query options that are keywords, not what asyncpg's URL syntax makes of an unknown option (a
# server setting): the dialect's, and asyncpg.connect's that a URL can spell, as SQLAlchemy passes them.
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "prepared_statement_cache_size": int,
    "statement_cache_size": int,
    "max_cached_statement_lifetime": int,
    "max_cacheable_statement_size": int,
    "command_timeout": float,
    "timeout": float,
    "ssl": str,
}
# asyncpg >= 0.31 keeps prepare() unnamed when its statement cache is off: SQLAlchemy's statements are
# then re-parsed at each execution, which survives transaction pooling even outside a transaction, and
# leaves nothing behind on the servers (see _transaction_pooling).
_UNNAMED_PREPARE = tuple(int(part) for part in re.findall(r"\d+", asyncpg.__version__)[:2]) >= (0, 31)

# Keywords the Engine manages itself: it connects with asyncpg on the bridge loop, from the URL.
_RESERVED_ENGINE_OPTIONS = {
    "creator": "the Engine connects with asyncpg on the bridge loop itself; pass asyncpg.connect options "
    "as connect_args={...}",
    "async_creator": "the Engine connects with asyncpg on the bridge loop itself; pass asyncpg.connect "
    "options as connect_args={...}",
    "module": "the Engine always uses asyncpg",
}
# Keywords a session scope manages itself.
_RESERVED_SESSION_OPTIONS = {"bind", "binds", "sync_session_class"}


def _normalize_url(url: str) -> str:
    """*url* for asyncpg, checked (parse_dsn refuses what asyncpg cannot read)."""
    scheme = url.partition("://")[0].lower()
    dialect, plus, driver = scheme.partition("+")
    if plus and dialect in ("postgresql", "postgres") and driver != "asyncpg":
        raise ConfigurationError(
            f"Engine runs SQLAlchemy's asyncpg dialect on the bridge loop, not {driver!r}: write the URL as "
            "'postgresql+asyncpg://user:password@host:5432/dbname' (or 'postgresql://...')"
        )
    return parse_dsn(f"postgresql{url[len(scheme) :]}" if scheme == "postgres+asyncpg" else url).dsn


def _lift_url_options(dsn: str) -> tuple[str, dict[str, Any]]:
    """Take the query options that SQLAlchemy's asyncpg dialect reads as keywords (``_URL_OPTIONS``) out
    of *dsn*, as keywords of their type; the rest of the URL stays as it was, for asyncpg.

    :raises ConfigurationError: for a value of the wrong type, or ``prepared_statement_name_func``
        (a function, which a URL cannot hold).
    """
    base, question, rest = dsn.partition("?")
    if not question:
        return dsn, {}
    query, hash_, fragment = rest.partition("#")
    kept: list[str] = []
    lifted: dict[str, Any] = {}
    for item in query.split("&"):
        key, _, raw = item.partition("=")
        name = unquote_plus(key)
        if name == "prepared_statement_name_func":
            raise ConfigurationError(
                "prepared_statement_name_func is a function, which a URL cannot hold: pass it as "
                "connect_args={'prepared_statement_name_func': ...}"
            )
        convert = _URL_OPTIONS.get(name)
        if convert is None:
            kept.append(item)
            continue
        value = unquote_plus(raw)
        try:
            lifted[name] = convert(value)
        except ValueError:
            raise ConfigurationError(
                f"URL option {name}={value!r} is not a{'n integer' if convert is int else ' number'}"
            ) from None
    query = "&".join(kept)
    return f"{base}{'?' if query else ''}{query}{hash_}{fragment}", lifted


def _split_connect_args(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split connect options into the dialect's (for its connection adapter) and asyncpg.connect's.

    :raises ConfigurationError: for an unknown option, or a dialect option of the wrong type.
    """
    dialect_args: dict[str, Any] = {}
    connect_args: dict[str, Any] = {}
    for name, value in options.items():
        if name in _DIALECT_OPTIONS:
            dialect_args[name] = value
        elif name in _CONNECT_OPTIONS:
            connect_args[name] = value
        elif name == "loop":
            raise ConfigurationError(
                "connect_args cannot take 'loop': connections are made on the bridge loop"
            )
        else:
            close = difflib.get_close_matches(name, _DIALECT_OPTIONS | _CONNECT_OPTIONS, n=1)
            raise ConfigurationError(
                f"unknown connect option {name!r}{f'; did you mean {close[0]!r}?' if close else ''} "
                "(connect_args take SQLAlchemy's asyncpg dialect options, prepared_statement_cache_size and "
                "prepared_statement_name_func, and asyncpg.connect's keywords)"
            )
    cache = dialect_args.get("prepared_statement_cache_size", 0)
    if not isinstance(cache, int) or isinstance(cache, bool) or cache < 0:
        raise ConfigurationError(
            f"prepared_statement_cache_size must be a number of statements (0 turns the cache off), "
            f"not {cache!r}"
        )
    name_func = dialect_args.get("prepared_statement_name_func")
    if name_func is not None and not callable(name_func):
        raise ConfigurationError(
            "prepared_statement_name_func must be a function returning a statement name, such as "
            f"lambda: f'__asyncpg_{{uuid.uuid4()}}__', not {type(name_func).__name__}"
        )
    return dialect_args, connect_args


def _transaction_pooling(dialect_args: dict[str, Any], connect_args: dict[str, Any]) -> None:
    """Adjust the options for PgBouncer in transaction pooling mode (``pgbouncer=True``), in place.

    There a server connection is lent for one transaction, so a prepared statement must not outlive its
    execution: no statement cache in SQLAlchemy's adapter nor in asyncpg. SQLAlchemy's dialect then
    prepares each statement anew, and asyncpg (>= 0.31, with its cache off) keeps it unnamed and parses
    it again with its execution, in one exchange: that works inside and outside a transaction
    (autocommit) and leaves nothing on the servers. Older asyncpg names every prepared statement, so
    names are made unique instead (SQLAlchemy's documented recipe; it still needs a transaction).

    :raises ConfigurationError: if the options ask for a statement cache.
    """
    for name, options in (
        ("statement_cache_size", connect_args),
        ("prepared_statement_cache_size", dialect_args),
    ):
        value = options.get(name, 0)
        if value != 0:
            raise ConfigurationError(
                f"pgbouncer=True turns the prepared statement caches off, but {name}={value!r} was given: "
                "cached statements do not survive transaction pooling. Drop "
                f"{name} (or pgbouncer=True if the pooler runs in session mode)"
            )
        options[name] = 0
    if not _UNNAMED_PREPARE:
        dialect_args.setdefault("prepared_statement_name_func", _unique_statement_name)


def _unique_statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4()}__"


def _check_engine_options(url: URL, options: dict[str, Any]) -> None:
    """Let SQLAlchemy judge the options now, in the caller's thread, rather than at first use on the
    bridge: creating an engine makes no connection and binds to no loop, and this one is dropped."""
    try:
        create_async_engine(url, async_creator=_never_connect, **options)
    except (TypeError, sqlalchemy.exc.ArgumentError) as exc:
        raise ConfigurationError(
            f"invalid engine option: {exc} (Engine passes its keyword arguments to SQLAlchemy's "
            "create_async_engine; asyncpg.connect options go in connect_args={...})"
        ) from None


async def _never_connect() -> asyncpg.Connection:  # pragma: no cover - the dry-run engine never connects
    raise AssertionError("the engine built to check options must not connect")


class SessionConfig(NamedTuple):
    """How a scope makes its ``AsyncSession``: the classes, and the keywords for them."""

    async_class: type[AsyncSession]
    sync_class: type[Session]
    options: dict[str, Any]


def _session_options(options: dict[str, Any]) -> SessionConfig:
    """The ``engine.session(**options)`` keywords, checked: ``class_`` chooses the classes (see
    :meth:`Engine.session`), the rest go to the ``AsyncSession``."""
    for name in options:
        if name in _RESERVED_SESSION_OPTIONS:
            raise ConfigurationError(
                f"a session scope does not take {name!r}: it is always bound to its Engine, on the "
                "bridge loop"
            )
    options = dict(options)
    class_ = options.pop("class_", AsyncSession)
    if isinstance(class_, type) and issubclass(class_, AsyncSession):
        # SQLModel's AsyncSession, say: its own sync class (SQLModel's Session) runs inside it.
        async_class, sync_class = class_, class_.sync_session_class
    elif isinstance(class_, type) and issubclass(class_, Session):
        async_class, sync_class = AsyncSession, class_
    else:
        raise ConfigurationError(
            "class_ must be a subclass of sqlalchemy.orm.Session (sqlmodel.Session, say) or of "
            f"sqlalchemy.ext.asyncio.AsyncSession, not {class_!r}"
        )
    # Objects leave the scope with their attributes: expiring them at commit would make every later
    # read a lazy load, which cannot work outside the bridge loop (SQLAlchemy advises the same for
    # asyncio).
    return SessionConfig(async_class, sync_class, {"expire_on_commit": False, **options})


def _check_sync_fn(fn: object, label: str, first: str) -> None:
    if not callable(fn):
        raise TypeError(f"{label} needs a function that takes the {first} first, not {type(fn).__name__}")
    if inspect.iscoroutinefunction(fn):
        raise TypeError(
            f"{label} runs plain (sync) functions, with a sync {first}, but {describe(fn)} is 'async def'. "
            f"incorrect: {label.replace('()', f'({describe(fn)})')}; correct: define it with 'def', "
            "or await the async API directly"
        )
