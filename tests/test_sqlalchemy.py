"""loopbridge.sqlalchemy: the Engine on the bridge, one session scope from every context, lazy loading,
cancellation, close, fork, and the situations loopbridge exists for (tables created from a lifespan, a
CLI wizard's loop then a server's) in SQLAlchemy terms.

Session tests run once per kind of caller (see tests.support.Caller): the sync kinds use
``with engine.session()``, the foreign loop ``async with engine.session()``. The test bodies are
written once, against the async session's interface; for the sync kinds, :func:`in_session` hands them
the sync session behind an adapter whose coroutines never suspend (each call just blocks).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
import pytest
import sqlalchemy.exc
from sqlalchemy import Connection, ForeignKey, Table, column, event, insert, make_url, select, table, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    defer,
    mapped_column,
    relationship,
    selectinload,
)
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import await_only

from loopbridge import (
    Bridge,
    BridgeClosedError,
    CallTimeoutError,
    ConfigurationError,
    ConnectError,
    DatabaseClosedError,
    DeadlockError,
    LoopBridgeError,
)
from loopbridge.sqlalchemy import (
    AsyncBridgedConnection,
    AsyncBridgedSession,
    BridgedConnection,
    BridgedSession,
    Engine,
    EngineClosedError,
    LazyLoadError,
    Savepoint,
    SessionScope,
    StreamResult,
)
from tests.boundary import wait_until
from tests.pgbouncer import PgBouncer
from tests.pgcluster import PASSWORD, PrivateCluster
from tests.support import (
    WAIT,
    Caller,
    all_at_once,
    in_thread,
    independent,
    run_loop,
    run_script,
    with_query,
)
from tests.test_pgbouncer import _need_pgbouncer

T = TypeVar("T")


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    addresses: Mapped[list[Address]] = relationship(back_populates="user", order_by="Address.id")


class Address(Base):
    __tablename__ = "addresses"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    user: Mapped[User] = relationship(back_populates="addresses")


users_table = cast(Table, User.__table__)


@pytest.fixture
def engine(dsn: str, bridge: Bridge) -> Iterator[Engine]:
    # A small pool: the server is shared with other test runs.
    engine = Engine(dsn, bridge=bridge, pool_size=2, max_overflow=2)
    yield engine
    engine.close(timeout=5)


@pytest.fixture
def tables(engine: Engine) -> None:
    engine.run_sync(Base.metadata.create_all)


# -- helpers ---------------------------------------------------------------------------------------


def in_session(
    caller: Caller, engine: Engine, work: Callable[[AsyncBridgedSession], Coroutine[Any, Any, T]]
) -> T:
    """Run ``await work(session)`` inside one session scope, as this kind of caller."""
    if caller.kind == "foreign-loop":

        async def scoped() -> T:
            async with engine.session() as session:
                return await work(session)

        return run_loop(scoped)

    def blocking() -> T:
        with engine.session() as session:
            return _drive(work(cast(AsyncBridgedSession, _Blocking(session))))

    if caller.kind == "sync-thread":
        return in_thread(blocking)

    async def inside_a_running_loop() -> T:
        return blocking()  # blocks the running loop on purpose, as DDL in a lifespan does

    return run_loop(inside_a_running_loop)


# What AsyncBridgedSession (and AsyncBridgedConnection) await; everything else is a plain call.
_AWAITED = {
    "execute", "scalar", "scalars", "exec", "get", "get_one", "merge", "delete", "refresh", "flush", "commit",
    "rollback", "run_sync", "connection", "stream", "stream_scalars",
}  # fmt: skip
_AWAITED_ON_CONNECTIONS = {"execute", "scalar", "scalars", "exec_driver_sql", "run_sync"}


class _Blocking:
    """A BridgedSession (or BridgedConnection) seen through the async facade's interface: each blocking
    call wrapped in a coroutine that never suspends, and what it returns seen the same way."""

    def __init__(self, target: BridgedSession | BridgedConnection, awaited: set[str] = _AWAITED) -> None:
        self._target = target
        self._awaited = awaited

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)
        if name == "begin_nested":
            return lambda: _BlockingContext(method())
        if name not in self._awaited:
            return method

        async def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if isinstance(result, BridgedConnection):
                return _Blocking(result, _AWAITED_ON_CONNECTIONS)
            if isinstance(result, StreamResult):
                return _BlockingStream(result)
            return result

        return call

    def __contains__(self, instance: object) -> bool:
        return instance in self._target  # type: ignore[operator]

    def __iter__(self) -> Iterator[object]:
        return iter(self._target)  # type: ignore[arg-type]


class _BlockingContext:
    """``async with`` over a context manager whose enter and exit block."""

    def __init__(self, context: Savepoint) -> None:
        self._context = context

    async def __aenter__(self) -> Any:
        return self._context.__enter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        self._context.__exit__(*exc_info)


class _BlockingStream:
    """A StreamResult read with ``for`` and ``close()``, seen through ``async for`` and ``aclose()``."""

    def __init__(self, stream: StreamResult[Any]) -> None:
        self._stream = stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __repr__(self) -> str:
        return repr(self._stream)

    def __aiter__(self) -> _BlockingStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return next(self._stream)
        except StopIteration:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self._stream.close()

    async def __aenter__(self) -> _BlockingStream:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._stream.close()


def entered(obj: Any) -> None:
    """``with obj: pass``, for an object that is not meant for it."""
    with obj:
        pass


async def async_entered(obj: Any) -> None:
    """``async with obj: pass``, for an object that is not meant for it."""
    async with obj:
        pass


async def awaited(obj: Any) -> Any:
    """``await obj``, for an object that is not meant for it."""
    return await obj


def _drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise AssertionError("the test body awaited something that is not a session call")


async def checked_out(async_engine: AsyncEngine) -> int:
    """Connections the engine's pool has handed out (run on the bridge with engine.run)."""
    pool = async_engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedout()


async def engine_identity(async_engine: AsyncEngine) -> int:
    return id(async_engine)


def backend_states(admin_dsn: str, application_name: str) -> list[str]:
    """The state of every server backend opened with this application_name (the test's schema)."""
    rows = independent(
        admin_dsn,
        "SELECT coalesce(state, '') FROM pg_stat_activity WHERE application_name = $1",
        application_name,
    )
    return [row[0] for row in rows]


def names_in_db(dsn: str) -> list[str]:
    return [row[0] for row in independent(dsn, "SELECT name FROM users ORDER BY name")]


def tables_in(dsn: str, schema: str) -> set[str]:
    rows = independent(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    return {row[0] for row in rows}


# -- the engine ------------------------------------------------------------------------------------


class TestEngine:
    def test_the_engine_is_created_on_the_bridge_loop_at_first_use(self, dsn: str, bridge: Bridge) -> None:
        engine = Engine(dsn, bridge=bridge, pool_size=1)
        assert "not opened yet" in repr(engine)
        assert bridge.thread is None  # nothing started at construction

        async def where(async_engine: AsyncEngine) -> tuple[str, str]:
            return threading.current_thread().name, async_engine.dialect.driver

        assert engine.run(where) == (f"loopbridge-{bridge.name}", "asyncpg")
        assert "open" in repr(engine)
        engine.close()
        assert "closed" in repr(engine)

    @pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+asyncpg"])
    def test_postgresql_postgres_and_asyncpg_urls_are_accepted(
        self, dsn: str, bridge: Bridge, scheme: str
    ) -> None:
        url = scheme + dsn[dsn.index("://") :]
        with Engine(url, bridge=bridge, pool_size=1) as engine, engine.session() as session:
            assert (
                session.scalar(text("SELECT current_setting('search_path')"))
                == make_url(dsn).query["search_path"]
            )

    def test_the_url_defaults_to_loopbridge_dsn(
        self, dsn: str, bridge: Bridge, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("LOOPBRIDGE_DSN", dsn)
        with Engine(bridge=bridge, pool_size=1) as engine, engine.session() as session:
            assert session.scalar(text("SELECT 1")) == 1

    def test_a_sqlalchemy_url_object_is_accepted(self, dsn: str, bridge: Bridge) -> None:
        with Engine(make_url(dsn), bridge=bridge, pool_size=1) as engine, engine.session() as session:
            assert session.scalar(text("SELECT 1")) == 1

    def test_another_driver_is_refused_with_what_to_write(self) -> None:
        with pytest.raises(ConfigurationError, match=r"write the URL as 'postgresql\+asyncpg://") as info:
            Engine("postgresql+psycopg2://app:s3cret@localhost/app")
        assert "s3cret" not in str(info.value)

    def test_invalid_engine_options_are_refused_at_once(self, dsn: str) -> None:
        with pytest.raises(ConfigurationError, match="pool_sise"):
            Engine(dsn, pool_sise=3)
        with pytest.raises(ConfigurationError, match="connect_args"):
            Engine(dsn, creator=lambda: None)

    def test_reserved_session_options_are_refused(self, engine: Engine) -> None:
        with pytest.raises(ConfigurationError, match="always bound to its Engine"):
            engine.session(bind=None)

    def test_the_public_names_exist_and_the_errors_are_documented(self) -> None:
        import loopbridge.sqlalchemy as module

        for name in module.__all__:
            assert getattr(module, name).__doc__, name
        assert issubclass(EngineClosedError, DatabaseClosedError)
        assert issubclass(EngineClosedError, RuntimeError)
        assert issubclass(LazyLoadError, LoopBridgeError)
        assert issubclass(LazyLoadError, sqlalchemy.exc.MissingGreenlet)

    def test_import_loopbridge_does_not_import_sqlalchemy(self) -> None:
        out = run_script(
            """
            import sys
            import loopbridge
            print("sqlalchemy" in sys.modules, "loopbridge.sqlalchemy" in sys.modules)
            """
        )
        assert out.split() == ["False", "False"]

    def test_run_hands_fn_the_async_engine_on_the_bridge_loop(
        self, engine: Engine, bridge: Bridge, caller: Caller
    ) -> None:
        async def work(async_engine: AsyncEngine, n: int) -> tuple[str, int]:
            async with async_engine.connect() as connection:
                value = (await connection.execute(text("SELECT :n * 2"), {"n": n})).scalar_one()
            return threading.current_thread().name, value

        assert caller.call(engine, "run", work, 21) == (f"loopbridge-{bridge.name}", 42)

    def test_run_refuses_a_sync_function(self, engine: Engine) -> None:
        with pytest.raises(TypeError, match="define it with 'async def'"):
            engine.run(lambda async_engine: 1)  # type: ignore[arg-type,return-value]

    def test_run_sync_commits_when_fn_returns_and_rolls_back_when_it_raises(
        self, engine: Engine, tables: None, dsn: str, caller: Caller
    ) -> None:
        def add(connection: Connection, name: str) -> int:
            assert isinstance(connection, Connection)
            connection.execute(insert(users_table).values(name=name))
            return int(connection.execute(text("SELECT count(*) FROM users")).scalar_one())

        def add_then_fail(connection: Connection) -> None:
            connection.execute(insert(users_table).values(name="never"))
            raise ValueError("changed my mind")

        assert caller.call(engine, "run_sync", add, "ada") == 1
        with pytest.raises(ValueError, match="changed my mind"):
            caller.call(engine, "run_sync", add_then_fail)
        assert names_in_db(dsn) == ["ada"]

    def test_run_sync_refuses_an_async_function_and_says_what_to_do(self, engine: Engine) -> None:
        async def create(connection: Connection) -> None:
            pass

        with pytest.raises(TypeError, match=r"is 'async def'.*correct: define it with 'def'"):
            _ = engine.run_sync(create)


class TestConnectOptions:
    """SQLAlchemy's asyncpg dialect options and asyncpg.connect's, from the URL and from connect_args, as
    with create_async_engine (regression: the dialect's options never reached the connections)."""

    @pytest.mark.parametrize("where", ["url", "connect_args"])
    def test_the_dialects_and_asyncpgs_options_reach_every_connection(
        self, dsn: str, bridge: Bridge, where: str
    ) -> None:
        options = {"prepared_statement_cache_size": 0, "statement_cache_size": 0, "command_timeout": 0.5}
        server_settings = {"server_settings": {"statement_timeout": "12345"}}
        if where == "url":
            url = with_query(dsn, **{name: str(value) for name, value in options.items()})
            engine = Engine(url, bridge=bridge, pool_size=1, connect_args=server_settings)
        else:
            engine = Engine(dsn, bridge=bridge, pool_size=1, connect_args={**options, **server_settings})
        control = Engine(dsn, bridge=bridge, pool_size=1)
        prepared = text("SELECT count(*) FROM pg_prepared_statements")
        try:
            for each in (engine, control):
                with each.session() as session:
                    for n in range(3):
                        assert session.scalar(text("SELECT CAST(:n AS int)"), {"n": n}) == n
                    left = session.scalar(prepared)
                    if each is control:  # SQLAlchemy's and asyncpg's caches keep named statements...
                        assert left > 0
                    else:  # ... and with both turned off nothing outlives its execution
                        assert left == 0
                        assert session.scalar(text("SHOW statement_timeout")) == "12345ms"
            with pytest.raises(TimeoutError), engine.session() as session:
                session.execute(text("SELECT pg_sleep(10)"))  # command_timeout
        finally:
            engine.close()
            control.close()

    def test_prepared_statement_name_func_names_the_dialects_statements(
        self, dsn: str, bridge: Bridge
    ) -> None:
        names: list[str] = []

        def name_func() -> str:
            names.append(f"__lb_{uuid.uuid4().hex}__")
            return names[-1]

        with (
            Engine(
                dsn, bridge=bridge, pool_size=1, connect_args={"prepared_statement_name_func": name_func}
            ) as engine,
            engine.session() as session,
        ):
            assert session.scalar(text("SELECT CAST(:n AS int)"), {"n": 7}) == 7
            statements = session.scalars(text("SELECT name FROM pg_prepared_statements")).all()
        assert names
        assert set(names) <= set(statements)

    @pytest.mark.parametrize(
        ("url_query", "connect_args", "message"),
        [
            ("", {"prepared_statement_cache_sise": 0}, "did you mean 'prepared_statement_cache_size'"),
            ("", {"statment_cache_size": 0}, "did you mean 'statement_cache_size'"),
            ("", {"loop": None}, "made on the bridge loop"),
            ("", {"prepared_statement_cache_size": -1}, "must be a number of statements"),
            ("", {"prepared_statement_name_func": "__mine__"}, "must be a function"),
            ("?prepared_statement_cache_size=none", {}, "is not an integer"),
            ("?command_timeout=soon", {}, "is not a number"),
            ("?prepared_statement_name_func=x", {}, "a URL cannot hold"),
        ],
    )
    def test_unknown_or_malformed_connect_options_are_refused_at_construction(
        self, url_query: str, connect_args: dict[str, Any], message: str
    ) -> None:
        with pytest.raises(ConfigurationError, match=message) as info:
            Engine(f"postgresql://app:hunter2@db.invalid/app{url_query}", connect_args=connect_args)
        assert "hunter2" not in str(info.value)

    def test_pgbouncer_true_refuses_a_statement_cache(self) -> None:
        for connect_args in ({"statement_cache_size": 100}, {"prepared_statement_cache_size": 100}):
            with pytest.raises(ConfigurationError, match="cached statements do not survive"):
                Engine("postgresql://app@db.invalid/app", pgbouncer=True, connect_args=connect_args)
        with pytest.raises(ConfigurationError, match="prepared_statement_cache_size=50"):
            Engine("postgresql://app@db.invalid/app?prepared_statement_cache_size=50", pgbouncer=True)


def admin_execute(dsn: str, command: str) -> None:
    """A command that cannot run in a transaction (CREATE/DROP DATABASE), over a connection of its own."""

    async def go() -> None:
        con = await asyncpg.connect(dsn, timeout=10)
        try:
            await con.execute(command)
        finally:
            await con.close()

    run_loop(go)


@pytest.fixture
def bounced_dsn(cluster: PrivateCluster) -> Iterator[str]:
    """A database of the test's own on the private cluster, reached through a PgBouncer of its own in
    transaction pooling mode with 2 server connections (so which server serves whom is known)."""
    _need_pgbouncer()
    database = f"lbsa_{uuid.uuid4().hex[:12]}"
    admin_execute(cluster.dsn(), f"CREATE DATABASE {database}")
    bouncer = PgBouncer(cluster, pool_size=2)
    try:
        bouncer.start()
        yield bouncer.dsn(database=database)
    finally:
        bouncer.destroy()
        admin_execute(cluster.dsn(), f"DROP DATABASE {database} WITH (FORCE)")


async def autocommit_value(async_engine: AsyncEngine, n: int) -> int:
    """A statement outside any transaction: prepared and executed in separate exchanges, each of which
    PgBouncer may send to another server connection."""
    async with async_engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        return int((await autocommit.execute(text("SELECT CAST(:n AS int)"), {"n": n})).scalar_one())


class TestPgBouncer:
    """Engine(pgbouncer=True) behind a real PgBouncer in transaction pooling mode."""

    def hold_a_transaction(self, engine: Engine) -> tuple[threading.Thread, threading.Event]:
        """A scope of *engine* holding a transaction, so PgBouncer pins the server connection it ran on
        last (the most recently used) to it; set the event to end it."""
        holding, release = threading.Event(), threading.Event()

        def hold() -> None:
            with engine.session() as session:
                session.execute(text("SELECT 1"))
                holding.set()
                release.wait(WAIT)

        holder = threading.Thread(target=hold)
        holder.start()
        assert holding.wait(WAIT)
        return holder, release

    def test_without_the_option_sqlalchemys_cached_statements_break(self, bounced_dsn: str) -> None:
        """The control: this PgBouncer really pools by transaction, so SQLAlchemy's statement cache fails."""
        with Bridge("sa-pgb-control") as bridge:
            first = Engine(bounced_dsn, bridge=bridge, pool_size=1, max_overflow=0)
            second = Engine(bounced_dsn, bridge=bridge, pool_size=1, max_overflow=0)
            query = text("SELECT CAST(:n AS int)")
            with first.session() as session:
                assert session.scalar(query, {"n": 1}) == 1  # prepared, named, on server connection S1
            holder, release = self.hold_a_transaction(second)  # pins S1
            try:
                with (
                    pytest.raises(sqlalchemy.exc.DBAPIError, match="does not exist"),
                    first.session() as session,
                ):
                    session.scalar(query, {"n": 2})  # on S2, where that statement was never prepared
            finally:
                release.set()
                holder.join(WAIT)

    def test_with_pgbouncer_true_the_same_sequence_works_in_and_out_of_transactions(
        self, bounced_dsn: str
    ) -> None:
        with Bridge("sa-pgb-option") as bridge:
            first = Engine(bounced_dsn, bridge=bridge, pgbouncer=True, pool_size=1, max_overflow=0)
            second = Engine(bounced_dsn, bridge=bridge, pgbouncer=True, pool_size=1, max_overflow=0)
            first.run_sync(Base.metadata.create_all)
            query = text("SELECT CAST(:n AS int)")
            with first.session() as session:
                assert session.scalar(query, {"n": 1}) == 1
                session.add_all([User(name=f"user-{n}") for n in range(30)])
            assert first.run(autocommit_value, 1) == 1
            holder, release = self.hold_a_transaction(second)
            try:
                with first.session() as session:
                    assert session.scalar(query, {"n": 2}) == 2
                    streamed = list(session.stream_scalars(select(User.name), prefetch=7))
                assert len(streamed) == 30
                assert [first.run(autocommit_value, n) for n in range(3, 6)] == [3, 4, 5]
            finally:
                release.set()
                holder.join(WAIT)

    def test_every_kind_of_caller_shares_one_engine_and_nothing_is_left_on_the_servers(
        self, bounced_dsn: str, cluster: PrivateCluster
    ) -> None:
        per_caller = 10
        with Bridge("sa-pgb-load") as bridge:
            # More client connections (6) than PgBouncer's server connections (2).
            engine = Engine(bounced_dsn, bridge=bridge, pgbouncer=True, pool_size=6, max_overflow=0)
            engine.run_sync(Base.metadata.create_all)

            def view(i: int) -> None:
                for n in range(per_caller):
                    with engine.session() as session:
                        session.add(User(name=f"view-{i}-{n}", addresses=[Address(email=f"{i}-{n}@v")]))
                        session.flush()
                        found = session.scalars(
                            select(User)
                            .options(selectinload(User.addresses))
                            .where(User.name == f"view-{i}-{n}")
                        ).one()
                        assert found.addresses[0].email == f"{i}-{n}@v"
                    assert engine.run(autocommit_value, n) == n

            def loop(i: int) -> None:
                async def task(t: int) -> None:
                    for n in range(per_caller):
                        async with engine.session() as session:
                            session.add(User(name=f"loop-{i}-{t}-{n}"))
                            await session.flush()
                            assert await session.scalar(
                                select(User.id).where(User.name == f"loop-{i}-{t}-{n}")
                            )
                        assert await engine.arun(autocommit_value, n) == n

                async def main() -> None:
                    await asyncio.gather(*(task(t) for t in range(4)))

                asyncio.run(main())

            def running_loop() -> None:
                async def main() -> None:
                    for n in range(per_caller):
                        with engine.session() as session:  # a sync call blocking a running loop
                            session.add(User(name=f"running-{n}"))

                asyncio.run(main())

            all_at_once(
                *(functools.partial(view, i) for i in range(4)),
                *(functools.partial(loop, i) for i in range(2)),
                running_loop,
                timeout=90,
            )
            left = []
            for _ in range(4):  # whichever server connections PgBouncer lends
                with engine.session() as session:
                    left.append(session.scalar(text("SELECT count(*) FROM pg_prepared_statements")))
            assert left == [0, 0, 0, 0]
        database = bounced_dsn.rpartition("/")[2]
        count = independent(cluster.dsn(database=database), "SELECT count(*) FROM users")[0][0]
        assert count == (4 + 2 * 4 + 1) * per_caller


class TestConnectErrors:
    def test_a_refused_connection_names_the_place_but_never_the_password(
        self, bridge: Bridge, caller: Caller
    ) -> None:
        engine = Engine("postgresql://alice:hunter2@127.0.0.1:1/inventory", bridge=bridge)
        with pytest.raises(ConnectError) as info:
            caller.call(engine, "open")
        message = str(info.value)
        assert "database 'inventory' on 127.0.0.1:1 as user 'alice'" in message
        assert "is PostgreSQL running there" in message
        for text_ in (message, repr(engine), engine.url):
            assert "hunter2" not in text_
        engine.close()

    def test_a_wrong_password_never_shows_in_errors_reprs_tracebacks_or_logs(
        self,
        cluster: PrivateCluster,
        bridge: Bridge,
        caller: Caller,
        caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        caplog.set_level(logging.DEBUG)
        wrong = "not-the-" + PASSWORD
        engine = Engine(
            cluster.dsn(password=wrong), bridge=bridge, echo="debug", echo_pool="debug", pool_size=1
        )
        with pytest.raises(ConnectError, match="check the user name and password") as info:
            caller.call(engine, "open")
        assert f"database 'postgres' on 127.0.0.1:{cluster.port} as user 'postgres'" in str(info.value)
        assert isinstance(info.value.__cause__, asyncpg.InvalidPasswordError)  # scram said no
        with pytest.raises(ConnectError) as in_a_scope, engine.session() as session:
            session.execute(text("SELECT 1"))
        engine.close()
        shown = [engine.url, repr(engine), caplog.text, capsys.readouterr().out]
        for error in (info.value, in_a_scope.value):
            shown += [str(error), repr(error), "".join(traceback.format_exception(error))]
        for text_ in shown:
            assert wrong not in text_
            assert PASSWORD not in text_
        good = Engine(cluster.dsn(), bridge=bridge, echo="debug", pool_size=1)
        with good.session() as session:
            assert session.scalar(text("SELECT 1")) == 1
        good.close()
        assert PASSWORD not in caplog.text + capsys.readouterr().out

    def test_a_driver_error_that_repeats_the_password_is_scrubbed_from_message_and_traceback(
        self,
        cluster: PrivateCluster,
        bridge: Bridge,
        caller: Caller,
        caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Regression: no test reached the scrubbing of the Engine's connect errors,
        and the driver's own error, kept as the ConnectError's cause, showed the password in tracebacks."""
        caplog.set_level(logging.DEBUG)
        # Two settings swapped by mistake: the password given as the port. asyncpg's error repeats it.
        engine = Engine(
            cluster.dsn(), bridge=bridge, echo="debug", pool_size=1, connect_args={"port": PASSWORD}
        )
        with pytest.raises(ConnectError, match=r"ValueError: invalid literal for int\(\).*'\*\*\*'") as info:
            caller.call(engine, "open")
        engine.close()
        error = info.value
        assert error.__cause__ is None
        assert error.__suppress_context__ or error.__context__ is None
        for text_ in (
            str(error),
            repr(error),
            "".join(traceback.format_exception(error)),
            repr(engine),
            caplog.text,
            capsys.readouterr().out,
        ):
            assert PASSWORD not in text_


# -- the session scopes ----------------------------------------------------------------------------


class TestSessionScopes:
    def test_a_scope_commits_when_it_ends_normally(
        self, engine: Engine, tables: None, dsn: str, caller: Caller
    ) -> None:
        async def work(session: AsyncBridgedSession) -> None:
            session.add(User(name="ada", addresses=[Address(email="ada@example.com")]))
            session.add_all([User(name="bob"), User(name="cy")])

        in_session(caller, engine, work)
        assert names_in_db(dsn) == ["ada", "bob", "cy"]
        assert independent(dsn, "SELECT email FROM addresses")[0][0] == "ada@example.com"

    def test_a_scope_rolls_back_when_it_raises(
        self, engine: Engine, tables: None, dsn: str, schema: str, admin_dsn: str, caller: Caller
    ) -> None:
        async def work(session: AsyncBridgedSession) -> None:
            session.add(User(name="ada"))
            await session.flush()  # the INSERT reached the server...
            assert await session.scalar(select(User.name)) == "ada"
            raise ValueError("... but the request failed")

        with pytest.raises(ValueError, match="the request failed"):
            in_session(caller, engine, work)
        assert names_in_db(dsn) == []
        assert engine.run(checked_out) == 0
        assert "idle in transaction" not in backend_states(admin_dsn, schema)

    def test_core_statements_and_text_run_through_the_scope(
        self, engine: Engine, tables: None, caller: Caller
    ) -> None:
        users = table("users", column("id"), column("name"))

        async def work(session: AsyncBridgedSession) -> list[Any]:
            await session.execute(insert(users), [{"name": "ada"}, {"name": "bob"}])
            await session.execute(text("INSERT INTO users (name) VALUES (:name)"), {"name": "cy"})
            rows = (await session.execute(select(users.c.name).order_by(users.c.name))).all()
            count = await session.scalar(text("SELECT count(*) FROM users"))
            names = (
                await session.scalars(text("SELECT name FROM users WHERE name > :n ORDER BY 1"), {"n": "b"})
            ).all()
            return [[row.name for row in rows], count, names]

        assert in_session(caller, engine, work) == [["ada", "bob", "cy"], 3, ["bob", "cy"]]

    def test_orm_get_merge_delete_and_refresh(
        self, engine: Engine, tables: None, dsn: str, caller: Caller
    ) -> None:
        with engine.session() as session:
            session.add_all([User(id=1, name="ada"), User(id=2, name="bob")])

        async def work(session: AsyncBridgedSession) -> list[Any]:
            ada = await session.get_one(User, 1)
            ada.name = "ada lovelace"
            bob = await session.get(User, 2)
            assert bob is not None
            await session.delete(bob)
            await session.flush()
            merged = await session.merge(User(id=3, name="cy"))
            await session.flush()
            await session.execute(text("UPDATE users SET name = 'cy young' WHERE id = 3"))
            await session.refresh(merged)
            with pytest.raises(sqlalchemy.exc.NoResultFound):
                await session.get_one(User, 99)
            return [ada in session, merged.name, await session.get(User, 2)]

        assert in_session(caller, engine, work) == [True, "cy young", None]
        assert names_in_db(dsn) == ["ada lovelace", "cy young"]

    def test_commit_inside_a_scope_keeps_what_came_before_a_later_failure(
        self, engine: Engine, tables: None, dsn: str, caller: Caller
    ) -> None:
        async def work(session: AsyncBridgedSession) -> None:
            session.add(User(name="ada"))
            await session.commit()
            assert not session.in_transaction()
            session.add(User(name="bob"))
            await session.flush()
            raise ValueError("bob fails")

        with pytest.raises(ValueError, match="bob fails"):
            in_session(caller, engine, work)
        assert names_in_db(dsn) == ["ada"]

    def test_a_commit_that_fails_raises_and_commits_nothing(
        self, engine: Engine, tables: None, dsn: str, caller: Caller
    ) -> None:
        with engine.session() as session:
            session.add(User(name="ada"))

        async def work(session: AsyncBridgedSession) -> None:
            session.add(User(name="bob"))
            session.add(User(name="ada"))  # unique violation, found only at the commit's flush

        with pytest.raises(sqlalchemy.exc.IntegrityError, match="unique"):
            in_session(caller, engine, work)
        assert names_in_db(dsn) == ["ada"]
        assert engine.run(checked_out) == 0

    def test_run_sync_hands_fn_the_real_sync_session_on_the_bridge(
        self, engine: Engine, tables: None, bridge: Bridge, caller: Caller
    ) -> None:
        def legacy_report(session: Session, prefix: str) -> list[str]:
            # Existing sync ORM code, unchanged: lazy loading works here.
            assert isinstance(session, Session)
            session.add(User(name="ada", addresses=[Address(email="a@1"), Address(email="a@2")]))
            session.flush()
            user = session.execute(select(User)).scalar_one()
            return [threading.current_thread().name, *(prefix + a.email for a in user.addresses)]

        async def work(session: AsyncBridgedSession) -> list[str]:
            return await session.run_sync(legacy_report, "mail:")

        assert in_session(caller, engine, work) == [f"loopbridge-{bridge.name}", "mail:a@1", "mail:a@2"]

    def test_a_timeout_cancels_the_statement_and_the_scope_rolls_back(
        self, engine: Engine, tables: None, dsn: str, schema: str, admin_dsn: str, caller: Caller
    ) -> None:
        async def work(session: AsyncBridgedSession) -> None:
            session.add(User(name="ada"))
            await session.flush()
            await session.execute(text("SELECT pg_sleep(30)"), timeout=0.3)

        with pytest.raises(CallTimeoutError):
            in_session(caller, engine, work)
        assert names_in_db(dsn) == []
        assert engine.run(checked_out) == 0
        wait_until(lambda: not {"active", "idle in transaction"} & set(backend_states(admin_dsn, schema)))

    def test_a_session_used_after_its_block_says_it_has_ended(self, engine: Engine, tables: None) -> None:
        scope = engine.session()
        with scope as session:
            session.add(User(name="ada"))
        with pytest.raises(sqlalchemy.exc.InvalidRequestError, match="has ended"):
            session.scalar(text("SELECT 1"))
        with pytest.raises(sqlalchemy.exc.InvalidRequestError, match="has ended"):
            session.add(User(name="bob"))
        with pytest.raises(sqlalchemy.exc.InvalidRequestError, match="already used"), scope:
            pass

        async def reuse() -> None:
            async with engine.session() as asession:
                pass
            with pytest.raises(sqlalchemy.exc.InvalidRequestError, match="has ended"):
                await asession.scalar(text("SELECT 1"))

        run_loop(reuse)

    def test_a_session_method_on_the_scope_itself_says_to_open_it_first(self, engine: Engine) -> None:
        scope = engine.session()
        with pytest.raises(AttributeError, match=r"'with engine.session\(\) as session: session.execute"):
            scope.execute(text("SELECT 1"))  # type: ignore[attr-defined]
        with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
            scope.no_such_thing  # type: ignore[attr-defined]  # noqa: B018

    def test_one_scope_binds_the_sync_session_with_with_and_the_async_one_with_async_with(
        self, engine: Engine
    ) -> None:
        with engine.session() as session:
            assert type(session) is BridgedSession
            assert session.scalar(text("SELECT 1")) == 1

        async def awaited() -> type[Any]:
            async with engine.session() as asession:
                assert await asession.scalar(text("SELECT 1")) == 1
                return type(asession)

        assert run_loop(awaited) is AsyncBridgedSession
        assert isinstance(engine.session(), SessionScope)

    def test_each_object_used_in_the_wrong_form_names_the_right_one(self, engine: Engine) -> None:
        async def misuse() -> None:
            with pytest.raises(TypeError, match=r"use 'async with engine.session\(\) as session:'"):
                await awaited(engine.session())
            async with engine.session() as asession:
                with pytest.raises(TypeError, match=r"'with' on a AsyncBridgedSession.*async with engine"):
                    entered(asession)
                with pytest.raises(TypeError, match="'await' on a AsyncBridgedSession"):
                    await awaited(asession)
                with pytest.raises(TypeError, match=r"use 'async with session.begin_nested\(\):'"):
                    await awaited(asession.begin_nested())
                connection = await asession.connection()
                with pytest.raises(TypeError, match=r"'with' on a AsyncBridgedConnection.*await session"):
                    entered(connection)
                stream = await asession.stream(text("SELECT 1"))
                with pytest.raises(TypeError, match="'async for row in result:'"):
                    await awaited(stream)
                await stream.aclose()
            with pytest.raises(TypeError, match=r"'async with Engine\(...\) as engine:'"):
                await awaited(engine)

        run_loop(misuse)
        with (
            engine.session() as session,
            pytest.raises(TypeError, match=r"'async with' on a BridgedSession.*`with engine.session"),
        ):
            _drive(async_entered(session))

    @pytest.mark.parametrize(
        ("sync_class", "async_class", "names"),
        [
            (BridgedSession, AsyncBridgedSession, _AWAITED),
            (BridgedConnection, AsyncBridgedConnection, _AWAITED_ON_CONNECTIONS),
        ],
    )
    def test_both_facades_take_each_method_from_one_implementation(
        self, sync_class: type[Any], async_class: type[Any], names: set[str]
    ) -> None:
        for name in sorted(names):
            sync, async_ = getattr(sync_class, name), getattr(async_class, name)
            assert sync.__qualname__ == f"{sync_class.__name__}.{name}"
            assert async_.__qualname__ == f"{async_class.__name__}.{name}"
            assert asyncio.iscoroutinefunction(async_)
            assert not asyncio.iscoroutinefunction(sync)
            assert sync.__doc__.split("\n\n")[0] == async_.__doc__.split("\n\n")[0]
            assert f"awaits ``{async_class.__name__}.{name}``" in sync.__doc__


# -- the rest of the session API ---------------------------------------------------------------------


class TestSessionAPI:
    """What an ORM user of AsyncSession reaches for beyond queries: savepoints, the session's state,
    no_autoflush, its connection, streaming."""

    def test_begin_nested_rolls_back_to_its_savepoint_and_the_scope_goes_on(
        self, engine: Engine, tables: None, dsn: str, caller: Caller
    ) -> None:
        async def add_bob_then_fail(session: AsyncBridgedSession) -> None:
            async with session.begin_nested():
                session.add(User(name="bob"))
                await session.flush()
                assert session.in_nested_transaction()
                raise ValueError("not bob")

        async def work(session: AsyncBridgedSession) -> list[str]:
            session.add(User(name="ada"))
            with pytest.raises(ValueError, match="not bob"):
                await add_bob_then_fail(session)
            assert not session.in_nested_transaction()
            with pytest.raises(sqlalchemy.exc.IntegrityError, match="unique"):
                async with session.begin_nested():
                    session.add(User(name="ada"))  # found at the savepoint's release (its flush)
            async with session.begin_nested() as savepoint:
                session.add(User(name="cy"))
            assert isinstance(savepoint, Savepoint)
            assert "ended" in repr(savepoint)
            return list(await session.scalars(select(User.name).order_by(User.name)))

        assert in_session(caller, engine, work) == ["ada", "cy"]
        assert names_in_db(dsn) == ["ada", "cy"]

    def test_new_dirty_deleted_is_modified_expire_all_and_expunge_all(
        self, engine: Engine, tables: None, dsn: str, caller: Caller
    ) -> None:
        async def work(session: AsyncBridgedSession) -> str:
            ada, bob = User(name="ada"), User(name="bob")
            session.add_all([ada, bob])
            assert set(session.new) == {ada, bob}
            assert not session.dirty
            await session.flush()
            assert not session.new
            assert set(session) == {ada, bob}
            ada.name = "ada lovelace"
            assert list(session.dirty) == [ada]
            assert session.is_modified(ada)
            assert not session.is_modified(bob)
            await session.delete(bob)
            assert list(session.deleted) == [bob]
            await session.flush()
            session.expire_all()
            with pytest.raises(LazyLoadError):
                _ = ada.name
            await session.refresh(ada)
            session.expunge_all()
            assert ada not in session
            assert list(session) == []
            return ada.name

        assert in_session(caller, engine, work) == "ada lovelace"
        assert names_in_db(dsn) == ["ada lovelace"]

    def test_no_autoflush_keeps_pending_objects_out_of_queries_in_its_block(
        self, engine: Engine, tables: None, caller: Caller
    ) -> None:
        count = select(sqlalchemy.func.count()).select_from(User)

        async def work(session: AsyncBridgedSession) -> list[int]:
            session.add(User(name="ada"))
            with session.no_autoflush:
                inside = await session.scalar(count)
                assert len(session.new) == 1
            return [inside, await session.scalar(count)]

        assert in_session(caller, engine, work) == [0, 1]

    def test_connection_runs_core_in_the_scopes_transaction_with_its_options(
        self, engine: Engine, tables: None, dsn: str, caller: Caller
    ) -> None:
        def count_users(connection: Connection) -> int:
            return int(connection.execute(text("SELECT count(*) FROM users")).scalar_one())

        async def work(session: AsyncBridgedSession) -> list[Any]:
            connection = await session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
            level = await connection.scalar(text("SHOW transaction_isolation"))
            await connection.execute(insert(users_table), [{"name": "ada"}, {"name": "bob"}])
            session.add(User(name="cy"))
            before_flush = await connection.run_sync(count_users)  # the connection does not autoflush
            await session.flush()
            by_driver = await connection.exec_driver_sql("SELECT name FROM users WHERE name > $1", ("b",))
            names = (await connection.scalars(text("SELECT name FROM users ORDER BY name"))).all()
            return [level, before_flush, sorted(by_driver.scalars()), names]

        assert in_session(caller, engine, work) == [
            "serializable",
            2,
            ["bob", "cy"],
            ["ada", "bob", "cy"],
        ]
        assert names_in_db(dsn) == ["ada", "bob", "cy"]

    def test_stream_yields_every_row_prefetch_rows_per_crossing(
        self, engine: Engine, tables: None, bridge: Bridge, caller: Caller
    ) -> None:
        rows = [{"name": f"user-{n:04}"} for n in range(1050)]
        engine.run_sync(lambda connection: connection.execute(insert(users_table), rows))

        async def work(session: AsyncBridgedSession) -> list[Any]:
            started = bridge.stats().calls_started
            names = await session.stream_scalars(select(User.name).order_by(User.id), prefetch=100)
            read = [name async for name in names]
            crossings = bridge.stats().calls_started - started
            users = [u async for u in await session.stream_scalars(select(User).order_by(User.id))]
            first = [tuple(r) async for r in await session.stream(select(User.id, User.name).limit(2))]
            return [read, crossings, [type(u) for u in users[:1]], len(users), first]

        read, crossings, kinds, count, first = in_session(caller, engine, work)
        assert read == [row["name"] for row in rows]
        if caller.kind == "foreign-loop":
            # Opening, 11 batches (10 of 100, one of 50), and the end: a crossing per batch.
            assert crossings == 1 + 11 + 1
        else:  # a sync consumer reads the batches from the pipe directly: only the opening crosses
            assert crossings == 1
        assert (kinds, count) == ([User], 1050)
        assert first == [(1, "user-0000"), (2, "user-0001")]

    def test_a_stream_left_early_is_closed_and_the_scope_goes_on(
        self, engine: Engine, tables: None, dsn: str, caller: Caller
    ) -> None:
        engine.run_sync(
            lambda connection: connection.execute(insert(users_table), [{"name": f"u{n}"} for n in range(50)])
        )
        query = select(User.name).order_by(User.id)

        async def work(session: AsyncBridgedSession) -> Any:
            # Closed by its block, at once: reading on says so.
            async with await session.stream_scalars(query, prefetch=10) as names:
                async for name in names:
                    if name == "u2":
                        break
            assert "closed" in repr(names)
            with pytest.raises(sqlalchemy.exc.ResourceClosedError, match="stream was closed"):
                async for _ in names:
                    pass
            # Dropped unfinished: closed on the bridge when garbage collected.
            dropped = await session.stream_scalars(query, prefetch=10)
            async for _ in dropped:
                break
            dropped_result = dropped._core.batches.result  # type: ignore[attr-defined]
            del dropped
            session.add(User(name="after"))
            await session.flush()  # the scope goes on...
            wait_until(lambda: bool(dropped_result.closed))
            # ... and a stream still open when the scope ends is closed by its end.
            left_open = await session.stream_scalars(query, prefetch=10)
            async for _ in left_open:
                break
            return left_open._core.batches.result  # type: ignore[attr-defined]

        left_open_result = in_session(caller, engine, work)
        assert left_open_result.closed
        assert "after" in names_in_db(dsn)
        assert engine.run(checked_out) == 0


# -- lazy loading ----------------------------------------------------------------------------------


class TestLazyLoading:
    @pytest.fixture
    def ada(self, engine: Engine, tables: None) -> None:
        with engine.session() as session:
            session.add(User(name="ada", addresses=[Address(email="a@1"), Address(email="a@2")]))

    def test_a_lazy_load_outside_the_bridge_raises_a_clear_error(
        self, engine: Engine, ada: None, dsn: str, caller: Caller
    ) -> None:
        async def work(session: AsyncBridgedSession) -> None:
            user = (await session.scalars(select(User))).one()
            user.name = "ada lovelace"  # a pending change: no autoflush may run in the caller's thread
            with pytest.raises(LazyLoadError) as info:
                _ = user.addresses
            message = str(info.value)
            assert message.startswith("User.addresses tried to load from the database")
            refresh = "session.refresh(obj, ['addresses'])"
            if caller.kind == "foreign-loop":  # the async session: the fix is awaited
                assert f"await {refresh}" in message
            else:
                assert refresh in message
                assert "await" not in message
            assert "selectinload(User.addresses)" in message
            assert "session.run_sync(fn)" in message
            assert isinstance(info.value, sqlalchemy.exc.MissingGreenlet)
            # Nothing broke: the session goes on and commits the change.
            assert [a.email for a in await session.run_sync(lambda s: s.get(User, user.id).addresses)] == [
                "a@1",
                "a@2",
            ]

        in_session(caller, engine, work)
        assert names_in_db(dsn) == ["ada lovelace"]

    def test_an_expired_attribute_cannot_be_loaded_outside_the_bridge(
        self, engine: Engine, ada: None, caller: Caller
    ) -> None:
        async def work(session: AsyncBridgedSession) -> str:
            user: User = (await session.scalars(select(User))).one()
            session.expire(user)
            with pytest.raises(LazyLoadError, match=r"^User\.name tried to load"):
                _ = user.name
            await session.refresh(user)
            return user.name

        assert in_session(caller, engine, work) == "ada"

    def test_a_deferred_column_cannot_be_loaded_outside_the_bridge(
        self, engine: Engine, ada: None, caller: Caller
    ) -> None:
        async def work(session: AsyncBridgedSession) -> str:
            user: User = (await session.scalars(select(User).options(defer(User.name)))).one()
            with pytest.raises(LazyLoadError, match=r"^User\.name .*session\.refresh\(obj, \['name'\]\)"):
                _ = user.name
            await session.refresh(user, ["name"])  # what the message says to do
            return user.name

        assert in_session(caller, engine, work) == "ada"

    def test_appending_to_an_unloaded_collection_cannot_load_it_outside_the_bridge(
        self, engine: Engine, ada: None, dsn: str, caller: Caller
    ) -> None:
        async def work(session: AsyncBridgedSession) -> list[str]:
            user = (await session.scalars(select(User))).one()
            with pytest.raises(LazyLoadError, match=r"^User\.addresses tried to load"):
                user.addresses.append(Address(email="a@3"))  # the ORM loads the collection first
            assert not session.new  # nothing was added half-way
            await session.refresh(user, ["addresses"])
            user.addresses.append(Address(email="a@3"))
            return [address.email for address in user.addresses]

        assert in_session(caller, engine, work) == ["a@1", "a@2", "a@3"]
        assert [row[0] for row in independent(dsn, "SELECT email FROM addresses ORDER BY id")] == [
            "a@1",
            "a@2",
            "a@3",
        ]

    def test_eager_loading_and_refresh_load_what_the_caller_reads(
        self, engine: Engine, ada: None, caller: Caller
    ) -> None:
        async def work(session: AsyncBridgedSession) -> list[list[str]]:
            eager = (await session.scalars(select(User).options(selectinload(User.addresses)))).one()
            session.expunge(eager)
            refreshed = (await session.scalars(select(User))).one()
            await session.refresh(refreshed, ["addresses"])
            return [[a.email for a in eager.addresses], [a.email for a in refreshed.addresses]]

        assert in_session(caller, engine, work) == [["a@1", "a@2"], ["a@1", "a@2"]]

    def test_objects_keep_their_attributes_after_the_scope_commits(
        self, engine: Engine, tables: None
    ) -> None:
        # expire_on_commit=False: an object returned from a scope is readable afterwards.
        with engine.session() as session:
            user = User(name="ada")
            session.add(user)
        assert (user.id, user.name) == (1, "ada")


# -- cancellation and close ------------------------------------------------------------------------


class TestCancellationAndClose:
    @pytest.mark.parametrize("where", ["in a statement", "between statements"])
    def test_cancelling_an_awaiting_caller_closes_the_scope_and_returns_its_connection(
        self, engine: Engine, tables: None, dsn: str, schema: str, admin_dsn: str, where: str
    ) -> None:
        """The scope's end closes its session whatever cancels the caller (an earlier form of this test
        passed with the close removed, since a statement cancelled mid-way makes SQLAlchemy discard the
        connection anyway; cancelled between statements, only the close gives the connection back)."""
        started = threading.Event()
        scopes: list[AsyncBridgedSession] = []

        async def handler() -> None:
            async with engine.session() as session:
                scopes.append(session)
                session.add(User(name="ada"))
                await session.flush()  # the INSERT holds a transaction open on the server
                started.set()
                if where == "in a statement":
                    await session.execute(text("SELECT pg_sleep(30)"))
                else:
                    await asyncio.sleep(30)  # the handler's own await, between two statements

        async def main() -> None:
            task = asyncio.ensure_future(handler())
            await asyncio.to_thread(started.wait, WAIT)
            await asyncio.sleep(0.2)  # let the pg_sleep reach the server
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run_loop(main)
        (scope,) = scopes
        assert scope._session is not None
        assert scope._session.sync_session.get_transaction() is None  # closed: no transaction left
        assert engine.run(checked_out) == 0
        wait_until(lambda: not {"active", "idle in transaction"} & set(backend_states(admin_dsn, schema)))
        if where == "between statements":  # rolled back and pooled, not discarded
            assert backend_states(admin_dsn, schema) == ["idle"]
        assert names_in_db(dsn) == []
        with engine.session() as session:  # and the engine serves on
            assert session.scalar(text("SELECT 1")) == 1

    @pytest.mark.slow  # waits out timeouts: 2 s or more
    def test_a_method_without_io_waits_for_a_call_still_unwinding_on_the_bridge(
        self, engine: Engine, tables: None, dsn: str, caller: Caller
    ) -> None:
        """Regression: add() and the other methods that need no database used the
        Session in the caller's thread even while a call whose caller had given up still unwound on the
        bridge with it: one Session in two threads at once. Now they wait their turn."""
        timed_out, release = threading.Event(), threading.Event()
        events: list[str] = []

        def slow_to_unwind(session: Session) -> None:
            try:
                await_only(asyncio.sleep(WAIT))
            except asyncio.CancelledError:
                # Like a statement whose cancellation the server is slow to confirm: the call holds the
                # session after its caller stopped waiting (through the caller's second cancel too).
                while not release.is_set():
                    try:
                        await_only(asyncio.sleep(0.02))
                    except asyncio.CancelledError:
                        pass
                events.append("unwound")
                raise

        def watch_attach(session: Session) -> None:
            event.listen(session, "before_attach", lambda session, instance: events.append("attach"))

        async def work(session: AsyncBridgedSession) -> None:
            await session.run_sync(watch_attach)
            with pytest.raises(CallTimeoutError):
                await session.run_sync(slow_to_unwind, timeout=0.2)
            timed_out.set()
            session.add(User(name="bob"))  # must wait until slow_to_unwind has let go of the session
            events.append("added")

        errors: list[BaseException] = []

        def scoped() -> None:
            try:
                in_session(caller, engine, work)
            except BaseException as exc:
                errors.append(exc)

        scope = threading.Thread(target=scoped)
        scope.start()
        assert timed_out.wait(WAIT)
        time.sleep(0.3)  # the caller is in add() by now (or, on a loaded machine, about to be)
        release.set()
        scope.join(WAIT)
        assert not scope.is_alive()
        assert errors == []
        assert events == ["unwound", "attach", "added"]
        assert names_in_db(dsn) == ["bob"]

    def test_a_caller_cancelled_while_opening_leaves_no_scope_open(
        self, engine: Engine, tables: None
    ) -> None:
        async def main() -> SessionScope:
            scope = engine.session()
            opening = asyncio.ensure_future(scope.__aenter__())
            await asyncio.sleep(0)  # the opening is submitted; the task awaits the bridge
            # Block this loop while the opening completes on the bridge, then cancel: the caller never
            # gets its session, and no __aexit__ will come.
            time.sleep(0.3)  # noqa: ASYNC251
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            return scope

        scope = run_loop(main)
        wait_until(lambda: scope._session is not None and scope._session._state == "ended")
        assert engine._scopes == set()

    def test_a_call_in_flight_when_the_engine_closes_gets_engine_closed_error(
        self, engine: Engine, tables: None, dsn: str, schema: str, admin_dsn: str
    ) -> None:
        inside = threading.Event()
        errors: list[BaseException] = []

        def view() -> None:
            try:
                with engine.session() as session:
                    session.add(User(name="ada"))
                    session.flush()
                    inside.set()
                    session.execute(text("SELECT pg_sleep(10)"))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=view)
        thread.start()
        assert inside.wait(WAIT)
        time.sleep(0.2)
        engine.close(timeout=0.2)
        thread.join(WAIT)
        assert [type(error) for error in errors] == [EngineClosedError]
        assert names_in_db(dsn) == []
        wait_until(lambda: backend_states(admin_dsn, schema) == [])

    def test_close_disposes_of_the_connections_and_later_use_says_so(
        self, dsn: str, bridge: Bridge, schema: str, admin_dsn: str, caller: Caller
    ) -> None:
        engine = Engine(dsn, bridge=bridge, pool_size=2)
        engine.open()
        assert backend_states(admin_dsn, schema) == ["idle"]
        engine.close()
        engine.close()
        assert backend_states(admin_dsn, schema) == []
        with pytest.raises(EngineClosedError, match="create a new Engine") as info:
            caller.call(engine, "run_sync", lambda connection: None)
        assert isinstance(info.value, DatabaseClosedError)
        with pytest.raises(EngineClosedError), engine.session():
            pass

    def test_close_on_the_bridge_thread_raises_deadlock_error_and_leaves_the_engine_open(
        self, engine: Engine, bridge: Bridge, schema: str, admin_dsn: str
    ) -> None:
        """Regression: close() marked the engine closed before it found out it could
        not cross to the bridge, leaving an engine that refused every caller and never released its
        pool's connections."""
        engine.open()

        async def on_the_bridge() -> str:
            with pytest.raises(DeadlockError), engine.session():
                pass
            with pytest.raises(DeadlockError) as info:
                engine.close()
            return str(info.value)

        message = bridge.run(on_the_bridge)
        assert not engine.closed
        assert "await engine.aclose() instead" in message
        assert "still open" in message
        assert engine._scopes == set()
        with engine.session() as session:  # it serves on...
            assert session.scalar(text("SELECT 1")) == 1
        engine.close()  # ... and closes normally, releasing its connections
        assert repr(engine).endswith(", closed>")
        assert backend_states(admin_dsn, schema) == []

    def test_closing_the_bridge_disposes_of_the_engine(self, dsn: str, schema: str, admin_dsn: str) -> None:
        with Bridge("sa-close") as bridge:
            engine = Engine(dsn, bridge=bridge, pool_size=1)
            engine.open()
            assert backend_states(admin_dsn, schema) == ["idle"]
        assert backend_states(admin_dsn, schema) == []

    def test_closing_the_bridge_under_an_open_scope_commits_nothing_and_says_so(
        self, dsn: str, schema: str, admin_dsn: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        inside, go_on = threading.Event(), threading.Event()
        errors: list[BaseException] = []
        bridge = Bridge("sa-open-scope")
        engine = Engine(dsn, bridge=bridge, pool_size=1)
        engine.run_sync(Base.metadata.create_all)

        def view() -> None:
            try:
                with engine.session() as session:
                    session.add(User(name="ada"))
                    session.flush()
                    inside.set()
                    go_on.wait(WAIT)
                    session.add(User(name="bob"))
                    session.flush()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=view)
        thread.start()
        assert inside.wait(WAIT)
        bridge.close(timeout=0.2)
        go_on.set()
        thread.join(WAIT)
        # The scope's next call says the engine ended it (the bridge took the engine with it).
        assert [type(error) for error in errors] == [EngineClosedError]
        assert "ended without committing" in str(errors[0])
        assert names_in_db(dsn) == []
        assert backend_states(admin_dsn, schema) == []
        assert "ending it without commit" in caplog.text
        with pytest.raises(BridgeClosedError), engine.session():
            pass

    def test_close_lets_open_scopes_commit_within_the_timeout(
        self, engine: Engine, tables: None, dsn: str
    ) -> None:
        inside = threading.Event()

        def view() -> None:
            with engine.session() as session:
                session.add(User(name="ada"))
                session.flush()
                inside.set()
                time.sleep(0.3)
                session.add(User(name="bob"))

        thread = threading.Thread(target=view)
        thread.start()
        assert inside.wait(WAIT)
        engine.close(timeout=10)
        thread.join(WAIT)
        assert names_in_db(dsn) == ["ada", "bob"]

    def test_scopes_still_open_after_the_close_timeout_end_without_committing(
        self, engine: Engine, tables: None, dsn: str, schema: str, admin_dsn: str
    ) -> None:
        inside, go_on = threading.Event(), threading.Event()
        errors: list[BaseException] = []

        def view() -> None:
            try:
                with engine.session() as session:
                    session.add(User(name="ada"))
                    session.flush()
                    inside.set()
                    go_on.wait(WAIT)
                    session.add(User(name="bob"))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=view)
        thread.start()
        assert inside.wait(WAIT)
        engine.close(timeout=0.2)
        go_on.set()
        thread.join(WAIT)
        assert len(errors) == 1
        assert isinstance(errors[0], EngineClosedError)
        assert "ended without committing" in str(errors[0])
        assert names_in_db(dsn) == []
        wait_until(lambda: backend_states(admin_dsn, schema) == [])


# -- tables created from a lifespan; a wizard's loop, then a server's ------------------------------


class TestTablesCreatedFromARunningLoop:
    """Tables created from a lifespan, a CLI and a script, verified from outside."""

    def test_create_all_from_a_fastapi_style_lifespan(self, engine: Engine, dsn: str, schema: str) -> None:
        async def lifespan() -> None:
            # A create_tables(): a sync call while the server's loop runs...
            engine.run_sync(Base.metadata.create_all, tables=[users_table])
            # ... and an ensure_table_exists(): an await on that loop.
            await engine.arun_sync(Base.metadata.create_all)
            async with engine.session() as session:
                session.add(User(name="ada"))

        run_loop(lifespan)
        assert tables_in(dsn, schema) == {"users", "addresses"}
        assert names_in_db(dsn) == ["ada"]

    def test_create_all_from_a_real_fastapi_lifespan(self, engine: Engine, dsn: str, schema: str) -> None:
        """A FastAPI app whose lifespan creates the tables, driven by TestClient on a loop of its own (not
        the engine's, not the test's), verified from an independent connection."""
        from fastapi import FastAPI
        from fastapi.testclient import TestClient

        created: list[set[str]] = []

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            # A create_tables(): a sync call while the server's loop runs...
            engine.run_sync(Base.metadata.create_all, tables=[users_table])
            # ... and its ensure_table_exists(): an await on that loop.
            await engine.arun_sync(Base.metadata.create_all)
            created.append(tables_in(dsn, schema))  # before the app takes its first request
            yield

        app = FastAPI(lifespan=lifespan)

        @app.post("/users/{name}")
        async def create_user(name: str) -> dict[str, Any]:
            async with engine.session() as session:
                user = User(name=name)
                session.add(user)
                await session.flush()
                return {"id": user.id, "name": user.name}

        with TestClient(app) as client:
            assert created == [{"users", "addresses"}]
            response = client.post("/users/ada")
            assert response.status_code == 200
            assert response.json() == {"id": 1, "name": "ada"}
        assert tables_in(dsn, schema) == {"users", "addresses"}
        assert names_in_db(dsn) == ["ada"]

    def test_create_all_from_a_cli_asyncio_run(self, engine: Engine, dsn: str, schema: str) -> None:
        async def cli() -> None:
            await engine.arun_sync(Base.metadata.create_all)

        asyncio.run(cli())
        assert tables_in(dsn, schema) == {"users", "addresses"}

    def test_create_all_from_a_sync_script(self, engine: Engine, dsn: str, schema: str) -> None:
        engine.run_sync(Base.metadata.create_all)
        assert tables_in(dsn, schema) == {"users", "addresses"}

    def test_a_failing_create_all_creates_nothing_and_says_so(
        self, engine: Engine, dsn: str, schema: str, caller: Caller
    ) -> None:
        def create_then_fail(connection: Connection) -> None:
            Base.metadata.create_all(connection)
            connection.execute(text("CREATE TABLE broken (id int,"))

        with pytest.raises(sqlalchemy.exc.ProgrammingError, match="syntax"):
            caller.call(engine, "run_sync", create_then_fail)
        assert tables_in(dsn, schema) == set()  # PostgreSQL DDL is transactional: all or nothing


class TestWizardThenServer:
    def test_wizard_loop_then_server_loop_then_test_loops_share_one_engine(
        self, engine: Engine, dsn: str
    ) -> None:
        """End to end: asyncio.run(setup_wizard()) on loop A, uvicorn-style requests on loop B,
        then a pytest-asyncio-style sequence of loops, all through one Engine and no fresh engines."""
        identities: set[int] = set()

        async def setup_wizard() -> None:
            await engine.arun_sync(Base.metadata.create_all)
            async with engine.session() as session:
                session.add(User(name="admin"))
            identities.add(await engine.arun(engine_identity))

        async def serve() -> list[str]:
            async def request(i: int) -> str:
                async with engine.session() as session:
                    session.add(User(name=f"user-{i:02}"))
                    admin: User = (await session.scalars(select(User).where(User.name == "admin"))).one()
                    return admin.name

            results = await asyncio.gather(*(request(i) for i in range(20)))
            identities.add(await engine.arun(engine_identity))
            return list(results)

        asyncio.run(setup_wizard())  # loop A
        assert asyncio.run(serve()) == ["admin"] * 20  # loop B
        for n in range(3):  # a new loop per test, as pytest-asyncio makes

            async def one_test(n: int = n) -> int:
                async with engine.session() as session:
                    session.add(User(name=f"test-{n}"))
                    await session.flush()
                    count = await session.scalar(select(sqlalchemy.func.count()).select_from(User))
                identities.add(await engine.arun(engine_identity))
                return int(count)

            assert asyncio.run(one_test()) == 22 + n
        assert len(identities) == 1  # one AsyncEngine, from the wizard to the last test
        assert len(names_in_db(dsn)) == 24
        assert engine.run(checked_out) == 0

    def test_orm_objects_created_in_one_context_are_queried_and_changed_in_others(
        self, engine: Engine, tables: None, dsn: str
    ) -> None:
        # A sync view creates them...
        def view() -> User:
            with engine.session() as session:
                user = User(name="ada", addresses=[Address(email="ada@1")])
                session.add(user)
            return user

        ada = in_thread(view)

        # ... a handler on a foreign loop queries them (eagerly) and changes one, from another scope...
        async def handler() -> list[str]:
            async with engine.session() as session:
                user = (
                    await session.scalars(
                        select(User).options(selectinload(User.addresses)).where(User.id == ada.id)
                    )
                ).one()
                user.addresses.append(Address(email="ada@2"))
                return [a.email for a in user.addresses]

        assert run_loop(handler) == ["ada@1", "ada@2"]

        # ... and a lifespan's sync call takes the very object the view returned into a new scope.
        async def lifespan() -> str:
            with engine.session() as session:
                session.add(ada)
                ada.name = "ada lovelace"
                return ada.name

        assert run_loop(lifespan) == "ada lovelace"
        assert names_in_db(dsn) == ["ada lovelace"]
        assert [row[0] for row in independent(dsn, "SELECT email FROM addresses ORDER BY id")] == [
            "ada@1",
            "ada@2",
        ]

    def test_threads_and_loops_at_once_commit_every_row_exactly_once(
        self, engine: Engine, tables: None, dsn: str
    ) -> None:
        per_caller = 10

        def view(i: int) -> None:
            for n in range(per_caller):
                with engine.session() as session:
                    session.add(User(name=f"view-{i}-{n}"))

        def loop(i: int) -> None:
            async def task(t: int) -> None:
                for n in range(per_caller):
                    async with engine.session() as session:
                        session.add(User(name=f"loop-{i}-{t}-{n}"))

            async def main() -> None:
                await asyncio.gather(*(task(t) for t in range(4)))

            asyncio.run(main())

        all_at_once(
            *(functools.partial(view, i) for i in range(4)),
            *(functools.partial(loop, i) for i in range(2)),
            timeout=90,
        )
        assert len(set(names_in_db(dsn))) == (4 + 2 * 4) * per_caller


# -- processes -------------------------------------------------------------------------------------

# Forking a process that runs threads is the point here; Python 3.12+ warns about it.
ALLOW_FORK = (
    "import warnings; "
    "warnings.filterwarnings('ignore', message='.*multi-threaded.*fork', category=DeprecationWarning)"
)


@pytest.mark.slow
class TestFork:
    def test_a_forked_child_gets_a_fresh_engine_and_the_parents_connections_survive(self, dsn: str) -> None:
        out = run_script(
            f"""
            {ALLOW_FORK}
            import asyncio, json, os, sys
            import sqlalchemy.exc
            from sqlalchemy import text
            from loopbridge.sqlalchemy import Engine

            engine = Engine({dsn!r}, pool_size=1, max_overflow=0)
            backend = text("SELECT pg_backend_pid()")
            with engine.session() as s:
                parent_backend = s.scalar(backend)
            scope = engine.session()
            held = scope.__enter__()  # a scope open across the fork
            held.scalar(text("SELECT 1"))
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: uses the engine, then exits normally (atexit and all)
                os.close(r)
                report = {{}}
                try:
                    held.scalar(text("SELECT 1"))
                except sqlalchemy.exc.InvalidRequestError as exc:
                    report["held"] = str(exc)

                async def handler():
                    async with engine.session() as s:
                        return await s.scalar(backend)

                with engine.session() as s:
                    report["sync"] = s.scalar(backend)
                report["awaited"] = asyncio.run(handler())
                os.write(w, json.dumps(report).encode())
                os.close(w)
                sys.exit(0)
            os.close(w)
            with os.fdopen(r) as pipe:
                child = json.loads(pipe.read())
            _, status = os.waitpid(pid, 0)
            child["exit"] = os.waitstatus_to_exitcode(status)
            child["parent_backend"] = parent_backend
            child["held_after"] = held.scalar(backend)
            scope.__exit__(None, None, None)
            with engine.session() as s:
                child["parent_after"] = s.scalar(backend)
            print(json.dumps(child))
            """
        )
        report = json.loads(out)
        assert report["exit"] == 0
        assert "opened before os.fork()" in report["held"]
        assert report["sync"] == report["awaited"]  # the child's own, fresh pool of one
        assert report["sync"] != report["parent_backend"]
        # The parent's connection was never closed by the child: same backend, same open scope.
        assert report["held_after"] == report["parent_backend"]
        assert report["parent_after"] == report["parent_backend"]


class TestExample:
    def test_the_example_app_runs_and_verifies_its_rows(self, dsn: str) -> None:
        example = Path(__file__).parent.parent / "examples" / "sqlalchemy_app.py"
        out = run_script(example.read_text(), env={"LOOPBRIDGE_DSN": dsn}, timeout=90)
        assert "verified over an independent connection: 44 members, 44 expected" in out
        assert out.rstrip().endswith("OK")
