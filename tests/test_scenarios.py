"""The two situations loopbridge exists for, each as it fails without it and must work with it.

* Tables created from a lifespan while the server's loop runs (a sync ``create_tables()`` and an awaited
  ``ensure_table_exists()``), and migrations on loops made by hand: they must really be created, or
  raise; never reported as "ensured" when they were not.
* A CLI wizard on one ``asyncio.run()`` loop, then a server on another loop, then test loops: one pool
  for all of them, and no fresh engine per request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools

import pytest

from loopbridge import Bridge, Database
from tests.support import WAIT, all_at_once, in_thread, independent, pool_source, run_loop


def tables(dsn: str, schema: str) -> set[str]:
    rows = independent(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    return {row[0] for row in rows}


class TestTablesCreatedFromARunningLoop:
    def test_fastapi_style_lifespan_creates_tables_with_sync_and_async_calls(
        self, db: Database, dsn: str, schema: str
    ) -> None:
        """create_tables() (sync) and ensure_table_exists() (async) inside a lifespan."""

        async def lifespan() -> None:
            # What DataFlow's create_tables() did: a sync call while uvicorn's loop is running.
            db.execute("CREATE TABLE organization (id text PRIMARY KEY, name text)")
            # What ensure_table_exists() did: an await on the server's loop.
            await db.aexecute("CREATE TABLE project (id text PRIMARY KEY, org text REFERENCES organization)")
            await db.aexecute("INSERT INTO organization VALUES ('o1', 'Acme')")
            assert db.fetchval("SELECT name FROM organization") == "Acme"

        run_loop(lifespan)
        # Verified from an independent connection, not trusted from a log line.
        assert tables(dsn, schema) == {"organization", "project"}

    def test_thread_pool_running_asyncio_run_works(self, db: Database) -> None:
        """executor.submit(asyncio.run, migration()) while a loop runs, each migration on a loop of
        its own, all on one Database."""
        db.execute("CREATE TABLE migrations (name text PRIMARY KEY)")

        async def run_migration(name: str) -> str:
            await db.aexecute("INSERT INTO migrations VALUES ($1)", name)
            return str(await db.afetchval("SELECT name FROM migrations WHERE name = $1", name))

        async def server() -> list[str]:
            asyncio.get_running_loop()  # a loop is running, as in FastAPI
            with concurrent.futures.ThreadPoolExecutor() as executor:
                futures = [executor.submit(asyncio.run, run_migration(f"m{i}")) for i in range(4)]
                return [future.result(timeout=WAIT) for future in futures]

        assert sorted(run_loop(server)) == ["m0", "m1", "m2", "m3"]
        assert db.fetchval("SELECT count(*) FROM migrations") == 4

    def test_new_event_loop_and_run_until_complete_work(self, db: Database) -> None:
        """A fresh loop made by hand, used with run_until_complete."""

        def legacy() -> int:
            loop = asyncio.new_event_loop()
            try:
                result: int = loop.run_until_complete(db.afetchval("SELECT 41 + 1"))
                return result
            finally:
                loop.close()

        assert in_thread(legacy) == 42

    def test_a_failing_ddl_is_never_reported_as_ensured(self, db: Database, dsn: str, schema: str) -> None:
        """A table is reported as ensured only after its DDL ran; a failing DDL raises."""
        ensured: set[str] = set()

        def ensure_table(name: str, ddl: str) -> None:
            db.execute(ddl)  # raises on failure, so the next line only runs after the DDL
            ensured.add(name)

        ensure_table("good", "CREATE TABLE good (id int)")
        with pytest.raises(Exception, match="syntax"):
            ensure_table("bad", "CREATE TABLE bad (id int,,)")
        assert ensured == {"good"}
        assert tables(dsn, schema) == {"good"}


class TestWizardThenServer:
    def test_cli_wizard_loop_then_server_loop_share_one_database(self, db: Database) -> None:
        """asyncio.run(setup_wizard()) on loop A, then uvicorn serves on loop B."""

        async def setup_wizard() -> None:
            await db.aexecute("CREATE TABLE settings (key text PRIMARY KEY, value text)")
            await db.aexecute("INSERT INTO settings VALUES ('initialized', 'yes')")

        async def serve() -> list[str]:
            async def request(i: int) -> str:
                await db.aexecute("INSERT INTO settings VALUES ($1, 'r')", f"req-{i}")
                return str(await db.afetchval("SELECT value FROM settings WHERE key = 'initialized'"))

            return list(await asyncio.gather(*(request(i) for i in range(20))))

        asyncio.run(setup_wizard())
        assert asyncio.run(serve()) == ["yes"] * 20
        assert db.fetchval("SELECT count(*) FROM settings") == 21

    def test_three_consecutive_asyncio_runs_like_pytest_asyncio(self, db: Database) -> None:
        db.execute("CREATE TABLE runs (n int)")
        for n in range(3):

            async def one_test(n: int = n) -> int:
                await db.aexecute("INSERT INTO runs VALUES ($1)", n)
                return int(await db.afetchval("SELECT count(*) FROM runs"))

            assert asyncio.run(one_test()) == n + 1

    def test_worker_process_style_fresh_database_objects_are_not_needed(self, dsn: str) -> None:
        """The "fresh engine per request" workaround, session_scope_fresh(). With loopbridge one Database
        serves every loop; this pins that no new pool is created per loop."""
        with Bridge("fresh") as bridge, Database(dsn, bridge=bridge, max_size=2) as db:
            pools = set()
            for _ in range(3):

                async def handler() -> None:
                    await db.afetchval("SELECT 1")

                asyncio.run(handler())
                pools.add(id(pool_source(db).pool))
            assert len(pools) == 1

    def test_threads_and_foreign_loops_insert_every_key_exactly_once(self, db: Database) -> None:
        """16 threads + 2 foreign loops x 16 tasks, unique keys: the exact count lands."""
        db.execute("CREATE TABLE hits (who text, n int, PRIMARY KEY (who, n))")
        per_caller = 20

        def thread_caller(i: int) -> None:
            for n in range(per_caller):
                db.execute("INSERT INTO hits VALUES ($1, $2)", f"thread-{i}", n, timeout=WAIT)

        def loop_caller(i: int) -> None:
            async def task(t: int) -> None:
                for n in range(per_caller):
                    await db.aexecute("INSERT INTO hits VALUES ($1, $2)", f"loop-{i}-{t}", n, timeout=WAIT)

            async def main() -> None:
                await asyncio.gather(*(task(t) for t in range(16)))

            asyncio.run(main())

        all_at_once(
            *(functools.partial(thread_caller, i) for i in range(16)),
            *(functools.partial(loop_caller, i) for i in range(2)),
        )
        assert db.fetchval("SELECT count(*) FROM hits") == (16 + 2 * 16) * per_caller
