"""loopbridge.sqlalchemy as users meet it: SQLModel, names they reach for that the sessions do not have,
what a lazy load says, a missing extra, and concurrent updates that lose nothing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import sqlalchemy.exc
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import ForeignKey, text, update
from sqlalchemy import select as sa_select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlmodel import Field, SQLModel, col, select
from sqlmodel import Session as SQLModelSession
from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelAsyncSession

from loopbridge import Bridge, ConfigurationError
from loopbridge.sqlalchemy import AsyncBridgedSession, BridgedSession, Engine, LazyLoadError
from tests.support import WAIT, Caller, all_at_once, independent, run_loop, run_script


class Hero(SQLModel, table=True):
    __tablename__ = "heroes"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
    age: int | None = None


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    visits: Mapped[int] = mapped_column(default=0)
    books: Mapped[list[Book]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = "books"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    author_id: Mapped[int] = mapped_column(ForeignKey("authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


@pytest.fixture
def engine(dsn: str, bridge: Bridge) -> Iterator[Engine]:
    engine = Engine(dsn, bridge=bridge, pool_size=4, max_overflow=2)
    yield engine
    engine.close(timeout=5)


@pytest.fixture
def heroes(engine: Engine) -> None:
    engine.run_sync(SQLModel.metadata.create_all)
    with engine.session(class_=SQLModelSession) as session:
        session.add_all([Hero(name="Deadpond", age=30), Hero(name="Spider-Boy", age=16)])


@pytest.fixture
def authors(engine: Engine) -> None:
    engine.run_sync(Base.metadata.create_all)
    with engine.session() as session:
        session.add(Author(id=1, name="ada", books=[Book(title="notes")]))


class TestSQLModel:
    @pytest.mark.parametrize("class_", [SQLModelSession, SQLModelAsyncSession])
    def test_exec_returns_models_in_both_facades(
        self, engine: Engine, heroes: None, caller: Caller, class_: type[Any]
    ) -> None:
        adults = select(Hero).where(col(Hero.age) >= 18)  # sqlmodel's select: a SelectOfScalar

        def sync() -> list[str]:
            with engine.session(class_=class_) as session:
                found = session.exec(adults).all()
                assert all(isinstance(hero, Hero) for hero in found)
                return [hero.name for hero in found]

        async def awaited() -> list[str]:
            async with engine.session(class_=class_) as session:
                found = (await session.exec(adults)).all()
                return [hero.name for hero in found]

        if caller.kind == "foreign-loop":
            assert run_loop(awaited) == ["Deadpond"]
        else:
            assert caller.call(_Call(sync), "go") == ["Deadpond"]

    def test_exec_of_a_statement_that_is_not_a_select_of_one_model_returns_rows(
        self, engine: Engine, heroes: None
    ) -> None:
        with engine.session(class_=SQLModelSession) as session:
            rows = session.exec(select(Hero.name, Hero.age).order_by(Hero.name)).all()
            session.exec(update(Hero).where(col(Hero.name) == "Deadpond").values(age=31))
        assert [tuple(row) for row in rows] == [("Deadpond", 30), ("Spider-Boy", 16)]
        assert independent_ages(engine) == {"Deadpond": 31, "Spider-Boy": 16}

    def test_exec_without_a_sqlmodel_session_says_how_to_get_one(self, engine: Engine, heroes: None) -> None:
        with engine.session() as session, pytest.raises(AttributeError, match=r"class_=sqlmodel\.Session"):
            session.exec(select(Hero))

    def test_class_must_be_a_session_class(self, engine: Engine) -> None:
        with pytest.raises(ConfigurationError, match="class_ must be a subclass"):
            engine.session(class_=dict)

    def test_sqlmodel_in_a_fastapi_app_with_sync_and_async_handlers(self, engine: Engine, dsn: str) -> None:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            await engine.arun_sync(SQLModel.metadata.create_all)
            yield

        app = FastAPI(lifespan=lifespan)

        @app.post("/heroes")
        async def create(hero: Hero) -> Hero:
            async with engine.session(class_=SQLModelAsyncSession) as session:
                session.add(hero)
                await session.flush()
                await session.refresh(hero)
                return hero

        @app.get("/heroes/{name}")
        def read(name: str) -> list[Hero]:  # a sync handler, in FastAPI's threadpool
            with engine.session(class_=SQLModelSession) as session:
                return list(session.exec(select(Hero).where(col(Hero.name) == name)).all())

        with TestClient(app) as client:
            created = client.post("/heroes", json={"name": "Rusty-Man", "age": 48})
            assert created.status_code == 200, created.text
            assert created.json() == {"id": 1, "name": "Rusty-Man", "age": 48}
            found = client.get("/heroes/Rusty-Man")
            assert found.json() == [{"id": 1, "name": "Rusty-Man", "age": 48}]
        rows = independent(dsn, "SELECT name, age FROM heroes")
        assert [tuple(row) for row in rows] == [("Rusty-Man", 48)]


class _Call:
    """An object whose ``go()`` (and awaited ``ago()``) runs *fn*: for Caller.call on a plain function."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def go(self) -> Any:
        return self._fn()


def independent_ages(engine: Engine) -> dict[str, int]:
    with engine.session() as session:
        rows = session.execute(text("SELECT name, age FROM heroes")).all()
        return {str(row[0]): int(row[1]) for row in rows}


class TestNamesTheSessionsDoNotHave:
    def test_query_says_what_to_use_instead(self, engine: Engine, authors: None) -> None:
        with engine.session() as session, pytest.raises(AttributeError) as info:
            session.query(Author)  # type: ignore[attr-defined]
        message = str(info.value)
        assert "session.execute(select(User).where(...))" in message
        assert "session.scalars(select(User))" in message
        assert "session.run_sync(lambda s: s.query(User).all())" in message
        assert "await" not in message

        async def awaited() -> str:
            async with engine.session() as session:
                try:
                    session.query(Author)  # type: ignore[attr-defined]
                except AttributeError as exc:
                    return str(exc)
            raise AssertionError("no AttributeError")

        assert "await session.scalars(select(User))" in run_loop(awaited)

    def test_begin_says_the_scope_is_the_transaction(self, engine: Engine) -> None:
        with engine.session() as session, pytest.raises(AttributeError) as info:
            session.begin()  # type: ignore[attr-defined]
        assert "the scope is the transaction" in str(info.value)
        assert "'with session.begin_nested():'" in str(info.value)

    @pytest.mark.parametrize(
        ("typo", "meant"), [("scalers", "scalars"), ("exceute", "execute"), ("ad", "add")]
    )
    def test_a_near_miss_gets_did_you_mean(self, engine: Engine, typo: str, meant: str) -> None:
        for facade in (BridgedSession, AsyncBridgedSession):
            with pytest.raises(AttributeError, match=f"did you mean {meant!r}"):
                getattr(facade.__new__(facade), typo)


class TestLazyLoadError:
    def test_it_names_the_attribute_and_the_refresh_for_the_callers_kind(
        self, engine: Engine, authors: None, caller: Caller
    ) -> None:
        def sync() -> str:
            with engine.session() as session:
                author = session.scalars(sa_select(Author)).one()
                with pytest.raises(LazyLoadError) as info:
                    _ = author.books
                session.refresh(author, ["books"])  # what it says to do, as it says it
                assert [book.title for book in author.books] == ["notes"]
                return str(info.value)

        async def awaited() -> str:
            async with engine.session() as session:
                author = (await session.scalars(sa_select(Author))).one()
                with pytest.raises(LazyLoadError) as info:
                    _ = author.books
                await session.refresh(author, ["books"])
                assert [book.title for book in author.books] == ["notes"]
                return str(info.value)

        if caller.kind == "foreign-loop":
            message = run_loop(awaited)
            assert "await session.refresh(obj, ['books'])" in message
        else:
            message = caller.call(_Call(sync), "go")
            assert "session.refresh(obj, ['books'])" in message
            assert "await" not in message
        assert message.startswith("Author.books tried to load from the database in thread")
        assert "selectinload(Author.books)" in message


class TestMissingExtras:
    @pytest.mark.parametrize(
        ("module", "blocked", "extra"),
        [
            ("loopbridge.sqlalchemy", "sqlalchemy", "sqlalchemy"),
            ("loopbridge.sqlalchemy", "greenlet", "sqlalchemy"),
            ("loopbridge.contrib.fastapi", "fastapi", "fastapi"),
            ("loopbridge.contrib.starlette", "starlette", "fastapi"),
            ("loopbridge.contrib.flask", "flask", "flask"),
            ("loopbridge.contrib.django", "django", "django"),
        ],
    )
    def test_importing_without_the_extra_says_what_to_install(
        self, module: str, blocked: str, extra: str
    ) -> None:
        out = run_script(
            f"""
            import sys
            sys.modules[{blocked!r}] = None  # as if it were not installed
            try:
                import {module}
            except ModuleNotFoundError as exc:
                print(type(exc.__cause__).__name__)
                print(exc)
            """
        )
        cause, message = out.splitlines()[:2]
        assert cause == "ModuleNotFoundError"
        assert f"{module} needs {blocked!r}" in message
        assert f"pip install 'loopbridge[{extra}]'" in message


class TestConcurrentUpdates:
    def test_fifty_concurrent_increments_from_threads_and_tasks_record_fifty(
        self, engine: Engine, authors: None, dsn: str
    ) -> None:
        """The SQLAlchemy guide's showcase: one atomic UPDATE per request. (``author.visits += 1`` on a loaded
        object writes back what it read, and concurrent requests overwrite each other's visit.)"""
        increment = update(Author).where(Author.id == 1).values(visits=Author.visits + 1)
        started = threading.Barrier(10, timeout=WAIT)

        def view() -> None:  # a sync view in a thread of its own: 5 requests
            started.wait()
            for _ in range(5):
                with engine.session() as session:
                    session.execute(increment)

        def server() -> None:  # a server's loop: 5 concurrent requests
            async def handler() -> None:
                async with engine.session() as session:
                    await session.execute(increment)

            async def main() -> None:
                started.wait()
                await asyncio.gather(*(handler() for _ in range(5)))

            asyncio.run(main())

        all_at_once(*([view] * 5 + [server] * 5), timeout=90)
        assert independent(dsn, "SELECT visits FROM authors WHERE id = 1")[0][0] == 50

    def test_the_read_modify_write_it_replaces_loses_updates(
        self, engine: Engine, authors: None, dsn: str
    ) -> None:
        """The control: the non-atomic form really does lose visits under concurrency."""
        both_read = threading.Barrier(2, timeout=WAIT)

        def view() -> None:
            with engine.session() as session:
                author = session.get_one(Author, 1)
                both_read.wait()  # both have read visits=0...
                author.visits += 1  # ... and both write 1

        all_at_once(view, view, timeout=60)
        assert independent(dsn, "SELECT visits FROM authors WHERE id = 1")[0][0] == 1

    def test_a_session_error_still_reaches_the_caller_unchanged(self, engine: Engine, authors: None) -> None:
        with pytest.raises(sqlalchemy.exc.IntegrityError), engine.session() as session:
            session.add(Author(id=1, name="again"))
