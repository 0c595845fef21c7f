"""One SQLAlchemy engine for a CLI wizard, a server's loop, sync views and a test loop.

Run it (PostgreSQL at $LOOPBRIDGE_DSN, else postgresql://postgres@127.0.0.1:5432/postgres):

    pip install -e '.[sqlalchemy]' && python examples/sqlalchemy_app.py

Without loopbridge, such an application needs two session scopes: ``session_scope()`` for code on the server's loop and
``session_scope_fresh()`` (a new engine per request) for everything that might run on another loop. Here
there is one ``Engine`` and one scope, whatever the caller: ``engine.session()``, entered with ``with`` in
sync code and with ``async with`` in async code on any loop. The app creates its tables (really, or it raises), runs a
setup wizard on one ``asyncio.run()`` loop, serves requests on a second loop while sync views write from
threads, reuses a sync report function through ``run_sync``, then checks every row over a connection of
its own, not through the engine.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import asyncpg
from sqlalchemy import ForeignKey, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload

from loopbridge.sqlalchemy import AsyncBridgedSession, BridgedSession, Engine

DSN = os.environ.get("LOOPBRIDGE_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUESTS = 40
VIEWS = 4


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "example_sqlalchemy_team"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    members: Mapped[list[Member]] = relationship(back_populates="team")


class Member(Base):
    __tablename__ = "example_sqlalchemy_member"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("example_sqlalchemy_team.id"))
    team: Mapped[Team] = relationship(back_populates="members")


# One engine for the whole process: created on the bridge loop at first use, never bound to yours.
engine = Engine(DSN, pool_size=4, max_overflow=0)


# -- the CLI wizard: `python main.py setup` runs asyncio.run(setup_wizard()) on loop A ------------------


async def setup_wizard() -> None:
    await engine.arun_sync(Base.metadata.create_all)  # really created, or it raises
    async with engine.session() as session:
        session.add_all([Team(name="core"), Team(name="web")])


# -- the server: uvicorn's loop B, with async handlers ------------------------------------------------


async def join_team(session: AsyncBridgedSession, member: str, team: str) -> None:
    found = (await session.scalars(select(Team).where(Team.name == team))).one()
    session.add(Member(name=member, team=found))


async def serve() -> None:
    async def request(n: int) -> None:
        async with engine.session() as session:  # the one scope, on a loop the engine never saw
            await join_team(session, f"async-{n:02}", "core" if n % 2 else "web")

    await asyncio.gather(*(request(n) for n in range(REQUESTS)))


# -- sync views (Django, Flask), in threads ------------------------------------------------------------


def view(n: int) -> None:
    with engine.session() as session:  # the same scope, blocking this thread only
        team = session.scalars(select(Team).where(Team.name == "web")).one()
        session.add(Member(name=f"sync-{n:02}", team=team))


# -- existing sync code, reused as it is: lazy loading works inside run_sync ------------------------


def team_sizes(session: Session) -> dict[str, int]:
    return {team.name: len(team.members) for team in session.scalars(select(Team))}


def report(session: BridgedSession) -> dict[str, int]:
    return session.run_sync(team_sizes)


async def test_a_member_lookup() -> None:
    # What a pytest-asyncio test does: a fresh loop, the same engine.
    async with engine.session() as session:
        member = (
            await session.scalars(
                select(Member).options(selectinload(Member.team)).where(Member.name == "async-01")
            )
        ).one()
        assert member.team.name == "core"


# -- the check: what the server really has, over a connection of its own (not through the engine) -----


async def rows_on_the_server() -> tuple[int, dict[str, int]]:
    connection = await asyncpg.connect(DSN.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        total = await connection.fetchval("SELECT count(*) FROM example_sqlalchemy_member")
        sizes = await connection.fetch(
            "SELECT t.name, count(m.id) FROM example_sqlalchemy_team t "
            "LEFT JOIN example_sqlalchemy_member m ON m.team_id = t.id GROUP BY t.name"
        )
    finally:
        await connection.close()
    return total, {row["name"]: row["count"] for row in sizes}


def main() -> int:
    try:
        asyncio.run(setup_wizard())
        print("1. setup wizard on asyncio.run() loop A: tables created, teams added")
        with ThreadPoolExecutor(VIEWS, thread_name_prefix="view") as views:
            writing = [views.submit(view, n) for n in range(VIEWS)]
            asyncio.run(serve())
            for future in writing:
                future.result(timeout=60)
        print(f"2. server on loop B: {REQUESTS} requests, while {VIEWS} sync views wrote from threads")
        asyncio.run(test_a_member_lookup())
        print("3. a test on a third fresh loop: same engine, no session_scope_fresh()")
        with engine.session() as session:
            sizes = report(session)
            counted = session.scalar(select(func.count()).select_from(Member))
        print(f"4. report through run_sync (lazy loading on the bridge): {sizes}, {counted} members")
        total, on_server = asyncio.run(rows_on_the_server())
        expected = {"core": REQUESTS // 2, "web": REQUESTS // 2 + VIEWS}
        ok = total == REQUESTS + VIEWS and on_server == expected == sizes and counted == total
        print(
            f"verified over an independent connection: {total} members, {REQUESTS + VIEWS} expected, "
            f"teams {on_server}: {'OK' if ok else 'FAILED'}"
        )
        return 0 if ok else 1
    finally:
        engine.run_sync(Base.metadata.drop_all)
        engine.close()


if __name__ == "__main__":
    raise SystemExit(main())
