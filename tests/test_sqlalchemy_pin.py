"""Engine._pin / _unpin: every session of an Engine on one connection, inside an outer transaction that is
rolled back at the end (what a rollback-per-test fixture needs)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import sqlalchemy.exc
from sqlalchemy import Connection, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loopbridge import Bridge
from loopbridge.sqlalchemy import Engine
from tests.support import WAIT, Caller, in_thread, independent, run_loop


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)


BACKEND = text("SELECT pg_backend_pid()")


@pytest.fixture
def engine(dsn: str, bridge: Bridge) -> Iterator[Engine]:
    engine = Engine(dsn, bridge=bridge, pool_size=3, max_overflow=0)
    engine.run_sync(Base.metadata.create_all)
    yield engine
    engine.close(timeout=5)


@pytest.fixture
def pinned(engine: Engine) -> Iterator[Engine]:
    engine.bridge.run(engine._pin, timeout=WAIT)
    try:
        yield engine
    finally:
        engine.bridge.run(engine._unpin, timeout=WAIT)


def add_and_count(caller: Caller, engine: Engine, name: str) -> int:
    """A session of *caller*'s kind adds an item, and counts the items it sees."""
    count = select(sqlalchemy.func.count()).select_from(Item)
    if caller.kind == "foreign-loop":

        async def awaited() -> int:
            async with engine.session() as session:
                session.add(Item(name=name))
                await session.flush()
                return int(await session.scalar(count) or 0)

        return run_loop(awaited)

    def blocking() -> int:
        with engine.session() as session:
            session.add(Item(name=name))
            session.flush()
            return int(session.scalar(count) or 0)

    if caller.kind == "sync-thread":
        return in_thread(blocking)

    async def inside_a_running_loop() -> int:
        return blocking()

    return run_loop(inside_a_running_loop)


def items_on_the_server(dsn: str) -> list[str]:
    return [row[0] for row in independent(dsn, "SELECT name FROM items ORDER BY name")]


class TestPinnedEngine:
    def test_sessions_see_each_others_writes_and_nothing_survives_unpin(
        self, engine: Engine, dsn: str, caller: Caller
    ) -> None:
        engine.bridge.run(engine._pin, timeout=WAIT)
        try:
            assert add_and_count(caller, engine, "a") == 1
            assert add_and_count(caller, engine, "b") == 2  # the first scope's commit is seen...
            assert items_on_the_server(dsn) == []  # ... inside the pinned transaction only
        finally:
            still_open = engine.bridge.run(engine._unpin, timeout=WAIT)
        assert still_open
        assert items_on_the_server(dsn) == []
        assert add_and_count(caller, engine, "after") == 1  # unpinned: the pool, and real commits
        assert items_on_the_server(dsn) == ["after"]

    def test_commits_inside_are_savepoints_and_a_failing_scope_rolls_back_only_its_own(
        self, pinned: Engine, dsn: str
    ) -> None:
        with pinned.session() as session:
            session.add(Item(name="kept"))
            session.commit()  # releases the scope's savepoint; the outer transaction goes on
            session.add(Item(name="also kept"))

        def fail() -> None:
            with pinned.session() as session:
                session.add(Item(name="rolled back"))
                session.flush()
                raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            fail()
        with pinned.session() as session:
            assert list(session.scalars(select(Item.name).order_by(Item.name))) == ["also kept", "kept"]
        assert items_on_the_server(dsn) == []

    def test_sessions_from_a_thread_and_a_foreign_loop_land_on_the_pinned_connection(
        self, pinned: Engine
    ) -> None:
        async def pinned_backend(connection: object) -> int:
            sessions = pinned._sessions
            assert hasattr(sessions, "connection")
            return int((await sessions.connection.execute(BACKEND)).scalar_one())

        def in_a_thread() -> int:
            with pinned.session() as session:
                return int(session.scalar(BACKEND) or 0)

        async def on_a_loop() -> list[int]:
            async def one() -> int:
                async with pinned.session() as session:
                    return int(await session.scalar(BACKEND) or 0)

            return list(await asyncio.gather(one(), one(), one()))

        expected = pinned.bridge.run(pinned_backend, None, timeout=WAIT)
        assert in_thread(in_a_thread) == expected
        assert run_loop(on_a_loop) == [expected] * 3
        assert pinned.run_sync(lambda connection: connection.execute(BACKEND).scalar_one()) == expected

    def test_nested_scopes_each_get_a_savepoint(self, pinned: Engine, dsn: str) -> None:
        async def nested() -> list[str]:
            async with pinned.session() as outer:
                outer.add(Item(name="outer"))
                await outer.flush()
                async with pinned.session() as inner:  # the app's code, called from the test's scope
                    assert await inner.scalar(select(Item.name)) == "outer"
                    inner.add(Item(name="inner"))
                return list(await outer.scalars(select(Item.name).order_by(Item.name)))

        assert run_loop(nested) == ["inner", "outer"]
        assert items_on_the_server(dsn) == []

    def test_run_sync_runs_in_a_savepoint_of_the_pinned_transaction(self, pinned: Engine, dsn: str) -> None:
        def add(connection: Connection) -> None:
            connection.execute(insert(Item).values(name="core"))

        def fail(connection: Connection) -> None:
            connection.execute(insert(Item).values(name="never"))
            raise ValueError("no")

        pinned.run_sync(add)
        with pytest.raises(ValueError, match="no"):
            pinned.run_sync(fail)
        with pinned.session() as session:
            assert list(session.scalars(select(Item.name))) == ["core"]
        assert items_on_the_server(dsn) == []

    def test_unpin_says_when_the_code_under_test_ended_the_transaction(
        self, engine: Engine, dsn: str
    ) -> None:
        def commit_as_sql() -> None:
            with engine.session() as session:
                session.add(Item(name="escaped"))
                session.flush()
                session.execute(text("COMMIT"))

        engine.bridge.run(engine._pin, timeout=WAIT)
        # The scope's own savepoint went with the transaction: its end says so.
        with pytest.raises(sqlalchemy.exc.DBAPIError, match="RELEASE SAVEPOINT"):
            commit_as_sql()
        assert engine.bridge.run(engine._unpin, timeout=WAIT) is False
        assert items_on_the_server(dsn) == ["escaped"]

    def test_pinning_twice_is_refused_and_unpinning_twice_is_harmless(self, engine: Engine) -> None:
        engine.bridge.run(engine._pin, timeout=WAIT)
        with pytest.raises(RuntimeError, match="already pinned"):
            engine.bridge.run(engine._pin, timeout=WAIT)
        assert engine.bridge.run(engine._unpin, timeout=WAIT) is True
        assert engine.bridge.run(engine._unpin, timeout=WAIT) is False

    def test_closing_a_pinned_engine_rolls_back_and_returns_the_connection(
        self, dsn: str, bridge: Bridge, admin_dsn: str, schema: str
    ) -> None:
        engine = Engine(dsn, bridge=bridge, pool_size=1, max_overflow=0)
        engine.run_sync(Base.metadata.create_all)
        engine.bridge.run(engine._pin, timeout=WAIT)
        with engine.session() as session:
            session.add(Item(name="gone"))
        engine.close(timeout=5)
        assert items_on_the_server(dsn) == []
        rows = independent(
            admin_dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", schema
        )
        assert rows[0][0] == 0
