"""COPY across the boundary: records, files and queries, with the caller's file objects used only on the
caller's side, in chunks; failures keep nothing and give the connection back."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from loopbridge import CallTimeoutError, Database
from tests.boundary import Driver, settled
from tests.support import run_loop, run_script

ROWS = [(1, "one"), (2, "two, with a comma"), (3, "three")]
CSV = b'1,one\n2,"two, with a comma"\n3,three\n'


@pytest.fixture
def table(db: Database) -> str:
    db.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)")
    return "items"


def rows(db: Database) -> list[tuple[int, str]]:
    return [(row["id"], row["name"]) for row in db.fetch("SELECT id, name FROM items ORDER BY id")]


class Recording:
    """A file-like object that records which thread (and loop) each read or write ran on."""

    def __init__(self, data: bytes = b"", chunk: int | None = None) -> None:
        self.buffer = io.BytesIO(data)
        self.chunk = chunk
        self.threads: set[str] = set()

    def read(self, size: int = -1) -> bytes:
        self.threads.add(threading.current_thread().name)
        return self.buffer.read(self.chunk or size)

    def write(self, data: bytes) -> int:
        self.threads.add(threading.current_thread().name)
        return self.buffer.write(data)


class AsyncFile:
    """An async file object (like aiofiles'): usable only on the loop it was made for."""

    def __init__(self, data: bytes = b"") -> None:
        self.buffer = io.BytesIO(data)
        self.loop = asyncio.get_running_loop()
        self.mode = "rb+"

    async def read(self, size: int = -1) -> bytes:
        assert asyncio.get_running_loop() is self.loop, "used on another loop"
        await asyncio.sleep(0)
        return self.buffer.read(min(size, 7))

    async def write(self, data: bytes) -> int:
        assert asyncio.get_running_loop() is self.loop, "used on another loop"
        await asyncio.sleep(0)
        return self.buffer.write(data)


class TestRecordsIn:
    def test_a_list_of_records(self, db: Database, table: str, driver: Driver) -> None:
        assert driver.call(db, "copy_records_to_table", "items", records=ROWS) == "COPY 3"
        assert rows(db) == ROWS

    def test_a_generator_is_read_on_the_callers_side_in_chunks(
        self, db: Database, table: str, driver: Driver
    ) -> None:
        threads: set[str] = set()

        def generate() -> Iterator[tuple[int, str]]:
            for i in range(5000):
                threads.add(threading.current_thread().name)
                yield (i, f"row {i}")

        status = driver.call(db, "copy_records_to_table", "items", records=generate(), columns=["id", "name"])
        assert status == "COPY 5000"
        assert db.fetchval("SELECT count(*) FROM items") == 5000
        assert threads == {driver.thread.name}

    def test_an_async_iterable_is_iterated_on_the_callers_loop(self, db: Database, table: str) -> None:
        async def main() -> str:
            loop = asyncio.get_running_loop()

            async def generate() -> AsyncIterator[tuple[int, str]]:
                for record in ROWS:
                    assert asyncio.get_running_loop() is loop
                    await asyncio.sleep(0)
                    yield record

            return await db.acopy_records_to_table("items", records=generate())

        assert run_loop(main) == "COPY 3"
        assert rows(db) == ROWS

    def test_an_error_in_the_records_keeps_nothing(
        self, db: Database, table: str, driver: Driver, admin_dsn: str, schema: str
    ) -> None:
        with pytest.raises(asyncpg.UniqueViolationError):
            driver.call(db, "copy_records_to_table", "items", records=[*ROWS, (1, "duplicate")])
        assert rows(db) == []
        settled(db, admin_dsn, schema)

    def test_a_failing_generator_keeps_nothing_and_raises_its_error(
        self, db: Database, table: str, driver: Driver, admin_dsn: str, schema: str
    ) -> None:
        class SourceBroke(Exception):
            pass

        def generate() -> Iterator[tuple[int, str]]:
            for i in range(10_000):
                if i == 4321:
                    raise SourceBroke
                yield (i, "x")

        with pytest.raises(SourceBroke):
            driver.call(db, "copy_records_to_table", "items", records=generate())
        assert rows(db) == []
        settled(db, admin_dsn, schema)


class TestFileIn:
    def test_a_binary_file_is_read_in_the_callers_thread(
        self, db: Database, table: str, driver: Driver
    ) -> None:
        source = Recording(CSV, chunk=5)
        assert driver.call(db, "copy_to_table", "items", source=source, format="csv") == "COPY 3"
        assert rows(db) == [(1, "one"), (2, "two, with a comma"), (3, "three")]
        assert source.threads == {driver.thread.name}

    def test_a_text_file_a_path_bytes_and_an_iterable_of_chunks(
        self, db: Database, table: str, driver: Driver, tmp_path: Path
    ) -> None:
        path = tmp_path / "items.csv"
        path.write_bytes(b"4,from a path\n")
        sources: list[Any] = [
            io.StringIO("1,from text\n"),
            b"2,from bytes\n",
            [b"3,from ", b"chunks\n"],
            str(path),
        ]
        for source in sources:
            driver.call(db, "copy_to_table", "items", source=source, format="csv")
        assert [name for _, name in rows(db)] == ["from text", "from bytes", "from chunks", "from a path"]

    def test_an_async_file_is_read_on_the_callers_loop(self, db: Database, table: str) -> None:
        async def main() -> str:
            return await db.acopy_to_table("items", source=AsyncFile(CSV), format="csv")

        assert run_loop(main) == "COPY 3"
        assert len(rows(db)) == 3

    def test_bad_data_raises_asyncpgs_error_and_keeps_nothing(
        self, db: Database, table: str, driver: Driver, admin_dsn: str, schema: str
    ) -> None:
        with pytest.raises(asyncpg.InvalidTextRepresentationError):
            driver.call(
                db, "copy_to_table", "items", source=io.BytesIO(b"1,ok\nnot a number,x\n"), format="csv"
            )
        assert rows(db) == []
        settled(db, admin_dsn, schema)

    def test_a_failing_source_keeps_nothing_and_raises_its_error(
        self, db: Database, table: str, driver: Driver, admin_dsn: str, schema: str
    ) -> None:
        class Broken(io.RawIOBase):
            calls = 0

            def read(self, size: int = -1) -> bytes:
                self.calls += 1
                if self.calls > 3:
                    raise OSError("disk on fire")
                return b"%d,x\n" % self.calls

        with pytest.raises(OSError, match="disk on fire"):
            driver.call(db, "copy_to_table", "items", source=Broken(), format="csv")
        assert rows(db) == []
        settled(db, admin_dsn, schema)

    def test_cancelling_the_awaiting_task_keeps_nothing(
        self, db: Database, table: str, admin_dsn: str, schema: str
    ) -> None:
        async def main() -> None:
            async def slowly() -> AsyncIterator[bytes]:
                for i in range(1000):
                    yield b"%d,x\n" % i
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(db.acopy_to_table("items", source=slowly(), format="csv"))
            await asyncio.sleep(0.3)  # well into the COPY
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run_loop(main)
        settled(db, admin_dsn, schema)
        assert rows(db) == []

    def test_ctrl_c_during_a_copy_keeps_nothing(self, dsn: str) -> None:
        out = run_script(
            """
            import signal, sys, threading, time
            signal.signal(signal.SIGINT, signal.default_int_handler)  # see tests.support.CTRL_C
            from loopbridge import Database
            db = Database(sys.argv[1])
            db.execute("CREATE TABLE copied (id int)")
            def slowly():  # several chunks reach the server before Ctrl-C
                for i in range(1_000_000):
                    if i % 2500 == 0:
                        time.sleep(0.1)
                    yield (i,)
            threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
            try:
                db.copy_records_to_table("copied", records=slowly())
            except KeyboardInterrupt:
                print("interrupted")
            deadline = time.monotonic() + 10
            while db.stats().in_use and time.monotonic() < deadline:
                time.sleep(0.02)
            print("in use:", db.stats().in_use, "rows:", db.fetchval("SELECT count(*) FROM copied"))
            db.execute("DROP TABLE copied")
            db.close()
            """,
            args=(dsn,),
        )
        assert "interrupted" in out
        assert "in use: 0 rows: 0" in out

    def test_an_unknown_table_raises_asyncpgs_error(self, db: Database, driver: Driver) -> None:
        with pytest.raises(asyncpg.UndefinedTableError):
            driver.call(db, "copy_to_table", "no_such_table", source=io.BytesIO(CSV), format="csv")
        assert db.stats().in_use == 0

    def test_something_that_is_not_a_source_is_refused(self, db: Database, table: str) -> None:
        with pytest.raises(TypeError, match="source must be a path, a file object"):
            db.copy_to_table("items", source=12345)


class TestOut:
    def test_a_query_to_a_binary_file_written_in_the_callers_thread(
        self, db: Database, table: str, driver: Driver
    ) -> None:
        db.copy_records_to_table("items", records=ROWS)
        output = Recording()
        status = driver.call(
            db,
            "copy_from_query",
            "SELECT * FROM items WHERE id < $1 ORDER BY id",
            3,
            output=output,
            format="csv",
        )
        assert status == "COPY 2"
        assert output.buffer.getvalue() == b'1,one\n2,"two, with a comma"\n'
        assert output.threads == {driver.thread.name}

    def test_a_table_to_a_text_file_a_path_and_a_function(
        self, db: Database, table: str, driver: Driver, tmp_path: Path
    ) -> None:
        db.copy_records_to_table("items", records=[(1, "naïve ☃")])
        text = io.StringIO()
        driver.call(db, "copy_from_table", "items", output=text, columns=["name"])
        assert text.getvalue() == "naïve ☃\n"
        path = tmp_path / "out.csv"
        driver.call(db, "copy_from_table", "items", output=str(path), format="csv", header=True)
        assert path.read_text() == "id,name\n1,naïve ☃\n"
        chunks: list[bytes] = []
        driver.call(db, "copy_from_query", "SELECT 42", output=chunks.append)
        assert b"".join(chunks) == b"42\n"

    def test_a_large_result_arrives_whole_in_order(self, db: Database, driver: Driver) -> None:
        output = io.BytesIO()
        status = driver.call(
            db, "copy_from_query", "SELECT g FROM generate_series(1, 200000) AS g", output=output
        )
        assert status == "COPY 200000"
        assert output.getvalue().split(b"\n")[:-1] == [str(i).encode() for i in range(1, 200_001)]

    def test_binary_format_round_trips(self, db: Database, table: str, driver: Driver) -> None:
        db.copy_records_to_table("items", records=ROWS)
        binary = io.BytesIO()
        driver.call(db, "copy_from_table", "items", output=binary, format="binary")
        db.execute("CREATE TABLE copied (LIKE items)")
        binary.seek(0)
        driver.call(db, "copy_to_table", "copied", source=binary, format="binary")
        assert db.fetch("SELECT * FROM copied ORDER BY id") == db.fetch("SELECT * FROM items ORDER BY id")

    def test_binary_format_into_a_text_file_says_what_to_do(self, db: Database, table: str) -> None:
        with pytest.raises(TypeError, match=r"open it in binary mode"):
            db.copy_from_table("items", output=io.StringIO(), format="binary")

    def test_an_async_writer_is_awaited_on_the_callers_loop(self, db: Database, table: str) -> None:
        db.copy_records_to_table("items", records=ROWS)

        async def main() -> bytes:
            output = AsyncFile()
            await db.acopy_from_table("items", output=output, format="csv")
            return output.buffer.getvalue()

        assert run_loop(main) == CSV

    def test_a_failing_writer_raises_its_error_and_returns_the_connection(
        self, db: Database, driver: Driver, admin_dsn: str, schema: str
    ) -> None:
        def write(data: bytes) -> None:
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            driver.call(db, "copy_from_query", "SELECT g FROM generate_series(1, 100000) AS g", output=write)
        settled(db, admin_dsn, schema)
        assert db.fetchval("SELECT 1") == 1

    def test_a_timeout_cancels_the_copy(
        self, db: Database, driver: Driver, admin_dsn: str, schema: str
    ) -> None:
        with pytest.raises(CallTimeoutError, match="nothing of it was kept"):
            driver.call(db, "copy_from_query", "SELECT pg_sleep(60)", output=io.BytesIO(), timeout=0.3)
        settled(db, admin_dsn, schema)


class TestInATransaction:
    def test_copy_in_a_transaction_is_rolled_back_with_it(
        self, db: Database, table: str, driver: Driver
    ) -> None:
        class Undo(Exception):
            pass

        def block() -> None:
            with driver.block(db.transaction()) as tx:
                driver.call(tx, "copy_records_to_table", "items", records=ROWS)
                driver.call(tx, "copy_to_table", "items", source=io.BytesIO(b"4,four\n"), format="csv")
                out = io.BytesIO()
                driver.call(tx, "copy_from_table", "items", output=out, format="csv")
                assert out.getvalue().count(b"\n") == 4  # the transaction sees its own COPY
                raise Undo

        with pytest.raises(Undo):
            block()
        assert rows(db) == []

    def test_copy_in_a_committed_transaction_is_kept(self, db: Database, table: str, driver: Driver) -> None:
        with driver.block(db.transaction()) as tx:
            driver.call(tx, "copy_records_to_table", "items", records=iter(ROWS))
        assert rows(db) == ROWS
