"""Jupyter: a notebook executed headless by nbclient on the ipykernel kernel, cells re-run.

The kernel's event loop runs while every cell executes. Plain cells make blocking calls on it; cells
with a top-level ``await`` await the async twins on it; cells stream a result with the library's own
``db.iterate()`` (a plain cell) and ``async for ... in db.iterate()`` (a top-level-await cell), and
through a raw server-side cursor inside ``db.run``; then every cell is run again, several times, the one
creating the Database included. The kernel's loop never owns a pool: the bridge's does. However often
the setup cell re-runs, the server sees the sessions of one pool only: a Database the cell's re-run
replaced does not keep its pool. When the kernel shuts down, every pool it opened is closed.
"""

from __future__ import annotations

import json
import time
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from tests.support import independent

SETUP = """\
import asyncio, json
from loopbridge import Database

db = Database(min_size=1, max_size=1)  # $LOOPBRIDGE_DSN; one connection: one pool is one session
"""

SYNC = """\
try:
    kernel_loop = asyncio.get_running_loop()
except RuntimeError:
    kernel_loop = None
db.execute("CREATE TABLE IF NOT EXISTS events (n int PRIMARY KEY)")
db.executemany("INSERT INTO events VALUES ($1) ON CONFLICT DO NOTHING", [(n,) for n in range(1000)])
count = db.fetchval("SELECT count(*) FROM events")
print(json.dumps({"loop_running": kernel_loop is not None, "count": count}))
"""

AWAIT = """\
rows = await db.afetch("SELECT n FROM events WHERE n < $1 ORDER BY n", 5)
print(json.dumps({
    "rows": [row["n"] for row in rows],
    "bridge_loop_is_kernel_loop": asyncio.get_running_loop() is db.bridge.loop,
    "bridge_thread": db.bridge.thread.name,
}))
"""

STREAM = """\
async def stream(con, chunk):
    total = chunks = 0
    async with con.transaction():  # a server-side cursor lives in a transaction
        cursor = await con.cursor("SELECT n FROM events ORDER BY n")
        while rows := await cursor.fetch(chunk):
            total += sum(row["n"] for row in rows)
            chunks += 1
    return total, chunks

blocking = db.run(stream, 100)
awaited = await db.arun(stream, 250)
print(json.dumps({"blocking": blocking, "awaited": awaited}))
"""

ITERATE = """\
total = count = 0
for row in db.iterate("SELECT n FROM events ORDER BY n", prefetch=128):  # a plain cell: blocking
    total += row["n"]
    count += 1
print(json.dumps({"total": total, "count": count}))
"""

AITERATE = """\
total = count = 0
async for row in db.iterate("SELECT n FROM events ORDER BY n", prefetch=64):  # top-level await
    total += row["n"]
    count += 1
print(json.dumps({"total": total, "count": count, "loop_running": asyncio.get_running_loop() is not None}))
"""

#: How many times every cell runs, the setup cell (a new Database bound to ``db``) included.
RUNS = 4


def notebook_of(*sources: str) -> Any:
    """A notebook of code cells, validated by nbformat."""
    cells: list[dict[str, Any]] = [
        {
            "cell_type": "code",
            "id": f"c{n}",
            "metadata": {},
            "source": source,
            "outputs": [],
            "execution_count": None,
        }
        for n, source in enumerate(sources)
    ]
    notebook = nbformat.from_dict({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5})
    nbformat.validate(notebook)
    return notebook


def last_json(cell: Any) -> dict[str, Any]:
    text = "".join(out.get("text", "") for out in cell.outputs if out.get("output_type") == "stream")
    errors = [out for out in cell.outputs if out.get("output_type") == "error"]
    assert not errors, errors
    result: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
    return result


def backends(admin_dsn: str, application_name: str) -> int:
    rows = independent(
        admin_dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", application_name
    )
    return int(rows[0][0])


def sessions_settle_at(admin_dsn: str, application_name: str, want: int, timeout: float = 10) -> int:
    """The number of the kernel's sessions once it is *want*, or after *timeout* seconds (a pool being
    closed takes a moment to leave ``pg_stat_activity``)."""
    deadline = time.monotonic() + timeout
    while (found := backends(admin_dsn, application_name)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


@pytest.mark.slow
def test_a_notebook_runs_and_reruns_sync_await_and_streaming_cells(
    dsn: str, admin_dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOPBRIDGE_DSN", dsn)  # the kernel inherits it
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # jupyter_core's own deprecation notice, silenced
    notebook = notebook_of(SETUP, SYNC, AWAIT, STREAM, ITERATE, AITERATE)
    client = NotebookClient(notebook, timeout=60, startup_timeout=60, kernel_name="python3")
    reports: list[list[dict[str, Any]]] = []
    sessions: list[int] = []
    with client.setup_kernel():
        for _ in range(RUNS):  # each run re-runs every cell, the Database's creation included
            for index, cell in enumerate(notebook.cells):
                client.execute_cell(cell, index)
            reports.append([last_json(cell) for cell in notebook.cells[1:]])
            # One pool of one connection is open, whatever the number of runs: not one per run.
            sessions.append(sessions_settle_at(admin_dsn, schema, want=1))

    total = sum(range(1000))
    assert len(reports) == RUNS
    for sync, awaited, streamed, iterated, aiterated in reports:
        assert sync == {"loop_running": True, "count": 1000}
        assert awaited == {
            "rows": [0, 1, 2, 3, 4],
            "bridge_loop_is_kernel_loop": False,
            "bridge_thread": "loopbridge-default",
        }
        assert streamed == {"blocking": [total, 10], "awaited": [total, 4]}
        assert iterated == {"total": total, "count": 1000}
        assert aiterated == {"total": total, "count": 1000, "loop_running": True}
    assert sessions == [1] * RUNS, f"sessions of the kernel after each run: {sessions}"

    # The kernel exited normally: loopbridge closed every pool on its way out.
    assert sessions_settle_at(admin_dsn, schema, want=0) == 0


DISPLAYED = """\
from loopbridge import Database

db = Database(min_size=2, max_size=2)  # $LOOPBRIDGE_DSN
db.fetchval("SELECT pg_sleep(0.2)")  # blocks the kernel's loop, as cells do: no warning in a kernel
db  # displayed: IPython's output history (Out[n], _, __, ___) keeps this Database alive for good
"""


@pytest.mark.slow
def test_rerunning_a_cell_that_displays_its_database_leaves_one_pool(
    dsn: str, admin_dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOPBRIDGE_DSN", dsn)  # the kernel inherits it
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    notebook = notebook_of(DISPLAYED)
    client = NotebookClient(notebook, timeout=60, startup_timeout=60, kernel_name="python3")
    with client.setup_kernel():
        for _ in range(RUNS):
            client.execute_cell(notebook.cells[0], 0)
            outputs = notebook.cells[0].outputs
            assert not [out for out in outputs if out.get("output_type") == "error"], outputs
            assert any("<Database " in json.dumps(out.get("data", {})) for out in outputs)
            assert "blocked the event loop" not in json.dumps(outputs)
        # Every run's Database is still referenced by the output history: they share one pool.
        assert sessions_settle_at(admin_dsn, schema, want=2) == 2
    assert sessions_settle_at(admin_dsn, schema, want=0) == 0
