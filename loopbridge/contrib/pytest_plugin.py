"""The pytest plugin: a Database per test on a fresh schema or database, and tests rolled back.

Registered through the ``pytest11`` entry point, so installing loopbridge makes the fixtures available.
Nothing connects until a test asks for one of them. Their blocking calls go through the bridge, so the
same fixtures serve sync tests and async tests on any event loop, whatever loop scope pytest-asyncio
gives them: no fresh engine or pool per test loop.

Fixtures:

``loopbridge_dsn`` (session)
    The server to test against: ``--loopbridge-dsn``, else the ``loopbridge_dsn`` ini option, else
    ``$LOOPBRIDGE_TEST_DSN``, ``$LOOPBRIDGE_DSN``, ``$DATABASE_URL``. Its role must be allowed to create
    schemas (or databases).
``loopbridge_db`` (function)
    A Database of the test's own on a fresh schema (its ``search_path``), dropped afterwards with all it
    holds. With ``loopbridge_isolation = database`` in the ini file, on a fresh database instead.
``loopbridge_app_db`` (session)
    The Database that ``loopbridge_rollback_db`` wraps. By default one on a fresh schema of the session;
    override it to return the Database your application uses::

        @pytest.fixture(scope="session")
        def loopbridge_app_db():
            from myapp.db import db
            return db

``loopbridge_rollback_db`` (function)
    ``loopbridge_app_db`` with the test inside a transaction that is rolled back at its end. Every call
    made on that Database during the test, by the test or by the code under test (views, handlers, from
    any thread or loop), runs on the connection holding the transaction; a transaction begun inside it
    is a savepoint. Use it for every test of a module with
    ``pytestmark = pytest.mark.usefixtures("loopbridge_rollback_db")``.
``loopbridge_app_engine`` (session)
    The ``loopbridge.sqlalchemy.Engine`` that ``loopbridge_rollback_engine`` wraps. By default one on a
    fresh schema of the session; override it to return your application's (as ``loopbridge_app_db``).
``loopbridge_rollback_engine`` (function)
    ``loopbridge_app_engine`` with the test inside a transaction that is rolled back at its end. Every
    session scope opened on that Engine during the test (``engine.session()``, by the test or by the code
    under test, from any thread or loop) and every ``engine.run_sync`` runs on the connection holding
    the transaction, in a savepoint of its own: a scope's commit releases its savepoint, so the next
    scope sees what it wrote, and nothing outlives the test. (``engine.run(fn)``, which hands out the
    ``AsyncEngine`` itself, is not rolled back.) Needs ``pip install 'loopbridge[sqlalchemy]'``.

From the first test using ``loopbridge_rollback_db`` (``loopbridge_rollback_engine``) to the end of the
session, the plugin owns the lifetime of ``loopbridge_app_db`` (``loopbridge_app_engine``): the
application's shutdown hooks in ``loopbridge.contrib`` (the Starlette/FastAPI ``lifespan`` at the end of
every ``with TestClient(app)`` block, Django's ``close_all``) leave it open, and the plugin closes it once
the session is over (after every fixture's teardown) if one of them asked. Without that, the first
``TestClient`` block would close it for every later test.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
from asyncpg.transaction import Transaction

from loopbridge._asyncpg import quote_ident
from loopbridge._dsn import parse_dsn
from loopbridge._pin import PinnedSource, pin, unpin
from loopbridge.database import Database
from loopbridge.errors import ConfigurationError

from . import _held

if TYPE_CHECKING:
    from loopbridge.sqlalchemy import Engine

__all__ = [
    "loopbridge_app_db",
    "loopbridge_app_engine",
    "loopbridge_db",
    "loopbridge_dsn",
    "loopbridge_rollback_db",
    "loopbridge_rollback_engine",
]

#: Environment variables read, in order, when neither the option nor the ini value is set.
DSN_ENV_VARS = ("LOOPBRIDGE_TEST_DSN", "LOOPBRIDGE_DSN", "DATABASE_URL")

#: Fresh schemas and databases are named with this prefix and a random suffix.
PREFIX = "loopbridge_test_"

#: Bounds every blocking call a fixture makes (setting up and tearing down a schema or a transaction).
TIMEOUT = 60.0

_ISOLATIONS = ("schema", "database")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("loopbridge")
    group.addoption(
        "--loopbridge-dsn",
        dest="loopbridge_dsn",
        default=None,
        help="PostgreSQL server for the loopbridge fixtures (default: ini loopbridge_dsn, "
        "$LOOPBRIDGE_TEST_DSN, $LOOPBRIDGE_DSN, $DATABASE_URL)",
    )
    parser.addini("loopbridge_dsn", "PostgreSQL server for the loopbridge fixtures", default=None)
    parser.addini(
        "loopbridge_isolation",
        "what loopbridge_db creates for each test: 'schema' (default) or 'database'",
        default="schema",
    )


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def loopbridge_dsn(pytestconfig: pytest.Config) -> str:
    """The PostgreSQL server the loopbridge fixtures use (see the module docstring for the order)."""
    dsn = pytestconfig.getoption("loopbridge_dsn") or pytestconfig.getini("loopbridge_dsn")
    if not dsn:
        dsn = next((os.environ[name] for name in DSN_ENV_VARS if os.environ.get(name)), None)
    if not dsn:
        raise ConfigurationError(
            "the loopbridge fixtures need a PostgreSQL server: pass "
            "--loopbridge-dsn=postgresql://user:password@host:5432/dbname, set loopbridge_dsn in the "
            "pytest configuration, or set LOOPBRIDGE_TEST_DSN (its role must be allowed to create schemas)"
        )
    parse_dsn(str(dsn))  # a malformed DSN fails here, with a message that hides its password
    return str(dsn)


@pytest.fixture
def loopbridge_db(loopbridge_dsn: str, pytestconfig: pytest.Config) -> Iterator[Database]:
    """A Database of this test's own on a fresh schema (or database), dropped afterwards."""
    isolation = str(pytestconfig.getini("loopbridge_isolation")).strip().lower()
    if isolation not in _ISOLATIONS:
        raise ConfigurationError(
            f"loopbridge_isolation must be 'schema' or 'database', not {isolation!r} (pytest configuration)"
        )
    with _fresh(loopbridge_dsn, isolation) as dsn:
        db = Database(dsn, min_size=0, max_size=4)
        try:
            yield db
        finally:
            db.close(timeout=TIMEOUT / 2)


@pytest.fixture(scope="session")
def loopbridge_app_db(loopbridge_dsn: str) -> Iterator[Database]:
    """The Database that ``loopbridge_rollback_db`` wraps: override it to return your application's."""
    with _fresh(loopbridge_dsn, "schema") as dsn:
        db = Database(dsn, min_size=0, max_size=4)
        try:
            yield db
        finally:
            db.close(timeout=TIMEOUT / 2)


@pytest.fixture(scope="session")
def _loopbridge_app_db_held(loopbridge_app_db: Database, pytestconfig: pytest.Config) -> Database:
    """``loopbridge_app_db``, whose lifetime the plugin owns until the session ends: the application's
    shutdown hooks (an app's lifespan at the end of each ``TestClient`` block) leave it open meanwhile
    (see :mod:`loopbridge.contrib._held`). If one of them asked to close it, it is closed once the
    session is over, after every fixture's teardown, ``loopbridge_app_db``'s own included (which may
    still use it)."""
    db = loopbridge_app_db
    if not isinstance(db, Database):
        raise TypeError(
            "the loopbridge_app_db fixture must return the loopbridge.Database your application uses, "
            f"not {type(db).__name__}"
            + (" (for an Engine, override loopbridge_app_engine instead)" if _is_engine(db) else "")
        )
    _hold_for_the_session(db, pytestconfig)
    return db


@pytest.fixture
def loopbridge_rollback_db(_loopbridge_app_db_held: Database) -> Iterator[Database]:
    """``loopbridge_app_db``, with this test inside a transaction rolled back at its end."""
    db = _loopbridge_app_db_held
    transaction = db.bridge.run(_begin, db, timeout=TIMEOUT)
    try:
        yield db
    finally:
        still_open = db.bridge.run(_roll_back, db, transaction, timeout=TIMEOUT)
    if not still_open:
        pytest.fail(
            "the test's transaction was ended by the code under test (a COMMIT or ROLLBACK statement), "
            "so what it wrote afterwards was committed and is NOT rolled back. Nest transactions "
            "instead (conn.transaction() in db.run): inside the test's transaction they are savepoints",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def loopbridge_app_engine(loopbridge_dsn: str) -> Iterator[Engine]:
    """The Engine that ``loopbridge_rollback_engine`` wraps: override it to return your application's."""
    from loopbridge.sqlalchemy import Engine

    with _fresh(loopbridge_dsn, "schema") as dsn:
        engine = Engine(dsn, pool_size=4, max_overflow=0)
        try:
            yield engine
        finally:
            engine.close(timeout=TIMEOUT / 2)


@pytest.fixture(scope="session")
def _loopbridge_app_engine_held(loopbridge_app_engine: Engine, pytestconfig: pytest.Config) -> Engine:
    """``loopbridge_app_engine``, held for the session as ``_loopbridge_app_db_held`` holds
    ``loopbridge_app_db``."""
    engine = loopbridge_app_engine
    if not _is_engine(engine):
        raise TypeError(
            "the loopbridge_app_engine fixture must return the loopbridge.sqlalchemy.Engine your "
            f"application uses, not {type(engine).__name__}"
            + (
                " (for a Database, override loopbridge_app_db instead)"
                if isinstance(engine, Database)
                else ""
            )
        )
    _hold_for_the_session(engine, pytestconfig)
    return engine


@pytest.fixture
def loopbridge_rollback_engine(_loopbridge_app_engine_held: Engine) -> Iterator[Engine]:
    """``loopbridge_app_engine``, with this test inside a transaction rolled back at its end: every
    session scope of the Engine runs on that transaction's connection, in a savepoint of its own."""
    engine = _loopbridge_app_engine_held
    engine.bridge.run(engine._pin, timeout=TIMEOUT)
    try:
        yield engine
    finally:
        still_open = engine.bridge.run(engine._unpin, TIMEOUT / 2, timeout=TIMEOUT)
    if not still_open and not engine.closed:
        pytest.fail(
            "the test's transaction was ended by the code under test (a COMMIT or ROLLBACK sent as SQL), "
            "so what it wrote afterwards was committed and is NOT rolled back. Let the session scopes "
            "commit (they are savepoints inside the test's transaction), or use session.begin_nested()",
            pytrace=False,
        )


def _hold_for_the_session(resource: Database | Engine, pytestconfig: pytest.Config) -> None:
    """The contrib shutdown hooks leave *resource* open until the session is over; then it is closed if
    one of them asked (see :mod:`loopbridge.contrib._held`)."""
    _held.hold(resource)

    def let_go() -> None:
        if _held.release(resource):
            resource.close(timeout=TIMEOUT / 2)

    pytestconfig.add_cleanup(let_go)


def _is_engine(obj: object) -> bool:
    # Without importing SQLAlchemy: an application with an Engine has imported loopbridge.sqlalchemy.
    module = sys.modules.get("loopbridge.sqlalchemy")
    return module is not None and isinstance(obj, module.Engine)


# -- on the bridge loop -----------------------------------------------------------------------------


async def _begin(db: Database) -> Transaction:
    """Pin *db* to one connection and begin the test's transaction on it."""
    pinned = await pin(db)
    try:
        # asyncpg's own Transaction, so that asyncpg knows the connection is in one and makes the
        # transactions begun inside the test savepoints.
        async with pinned.turn():
            transaction = pinned.con.transaction()
            await transaction.start()
    except BaseException:
        await unpin(db)
        raise
    return transaction


async def _roll_back(db: Database, transaction: Transaction) -> bool:
    """Roll the test's transaction back and unpin *db*; False if the test had already ended it."""
    pinned = db._source
    try:
        if not isinstance(pinned, PinnedSource):  # unpinned meanwhile (the Database was closed)
            return True
        async with pinned.turn():  # waits for the call holding the connection, if any
            con = pinned.con
            if con.is_closed():  # terminated (a test that killed it, a timeout): the server rolled back
                return True
            still_open: bool = con.is_in_transaction()
            if still_open:
                await transaction.rollback()
    finally:
        await unpin(db)  # returns the connection to the pool, which resets it (ROLLBACK included)
    return still_open


# -- fresh schemas and databases --------------------------------------------------------------------


@contextmanager
def _fresh(dsn: str, isolation: str) -> Iterator[str]:
    """``with _fresh(dsn, isolation) as fresh_dsn``: a new schema or database, dropped afterwards."""
    fresh = f"{PREFIX}{uuid.uuid4().hex[:12]}"
    name = quote_ident(fresh)  # asyncpg's quoting: the identifier in SQL and in search_path
    # A one-connection Database of its own for the DDL: CREATE DATABASE cannot run in a transaction, and
    # the Database under test may be pinned to one.
    admin = Database(dsn, min_size=0, max_size=1)
    try:
        if isolation == "database":
            admin.execute(f"CREATE DATABASE {name}", timeout=TIMEOUT)
            try:
                yield _with(dsn, path=f"/{fresh}")
            finally:
                # FORCE (PostgreSQL 13+) ends sessions the test left open.
                force = int(admin.fetchval("SHOW server_version_num", timeout=TIMEOUT)) >= 130000
                option = " WITH (FORCE)" if force else ""
                admin.execute(f"DROP DATABASE IF EXISTS {name}{option}", timeout=TIMEOUT)
        else:
            admin.execute(f"CREATE SCHEMA {name}", timeout=TIMEOUT)
            try:
                yield _with(dsn, search_path=name)
            finally:
                admin.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE", timeout=TIMEOUT)
    finally:
        admin.close()


def _with(dsn: str, *, path: str | None = None, **query: str) -> str:
    """*dsn* with another database (*path*) or more query options (asyncpg makes unknown ones server
    settings, so ``search_path=...`` sets the schema)."""
    parts = urlsplit(dsn)
    params: dict[str, Any] = dict(parse_qsl(parts.query, keep_blank_values=True))
    if path is not None:
        for key in ("dbname", "database"):  # the path's database would lose to these
            params.pop(key, None)
    params.update(query)
    return urlunsplit(
        (parts.scheme, parts.netloc, parts.path if path is None else path, urlencode(params), parts.fragment)
    )
