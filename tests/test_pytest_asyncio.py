"""pytest-asyncio: one module-scoped Database used from function-scoped loops, three tests in a row.

pytest-asyncio gives every test a loop of its own, so a pool created on
the module fixture's loop broke in the next test. Here the module fixture opens the Database and runs
DDL on a module-scoped loop, and each of three tests, on its own function-scoped loop, uses it and
sees what the test before it wrote.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from loopbridge import Database
from tests.support import throwaway_schema, with_query

#: The loops the module fixture and the tests ran on, kept alive so that they can be told apart.
LOOPS: dict[str, asyncio.AbstractEventLoop] = {}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_db(admin_dsn: str) -> AsyncIterator[Database]:
    with throwaway_schema(admin_dsn, "lbt_asyncio_") as schema:
        LOOPS["module"] = asyncio.get_running_loop()
        db = Database(with_query(admin_dsn, search_path=schema), max_size=2)
        try:
            await db.aopen()  # the pool is created now, "on" the module's loop: in fact on the bridge's
            await db.aexecute("CREATE TABLE steps (n int PRIMARY KEY)")
            yield db
        finally:
            await db.aclose()


async def step(db: Database, n: int) -> list[int]:
    LOOPS[f"test {n}"] = asyncio.get_running_loop()
    await db.aexecute("INSERT INTO steps VALUES ($1)", n)
    return [row[0] for row in await db.afetch("SELECT n FROM steps ORDER BY n")]


@pytest.mark.asyncio(loop_scope="function")
async def test_first_on_a_loop_of_its_own(shared_db: Database) -> None:
    assert await step(shared_db, 1) == [1]


@pytest.mark.asyncio(loop_scope="function")
async def test_second_on_another_loop(shared_db: Database) -> None:
    assert await step(shared_db, 2) == [1, 2]


@pytest.mark.asyncio(loop_scope="function")
async def test_third_on_yet_another_loop(shared_db: Database) -> None:
    assert await step(shared_db, 3) == [1, 2, 3]
    loops = [LOOPS[name] for name in ("module", "test 1", "test 2", "test 3")]
    assert len({id(loop) for loop in loops}) == 4  # all alive (held above), so the ids are distinct
    assert all(loop is not shared_db.bridge.loop for loop in loops)
    assert sum(loop.is_closed() for loop in loops) == 2  # tests 1 and 2 are over; their loops closed
