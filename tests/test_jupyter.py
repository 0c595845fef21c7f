"""Jupyter: a notebook executed headless by nbclient on the ipykernel kernel, cells re-run.

The kernel's event loop runs while every cell executes. Plain cells make blocking calls on it; cells
with a top-level ``await`` await the async twins on it; a cell streams a result through a server-side
cursor; then cells are run again, the one creating the Database included. The kernel's loop never
owns a pool: the bridge's does. When the kernel shuts down, every pool it opened is closed.
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

db = Database(max_size=2)  # $LOOPBRIDGE_DSN
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


@pytest.mark.slow
def test_a_notebook_runs_and_reruns_sync_and_await_cells(
    dsn: str, admin_dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOPBRIDGE_DSN", dsn)  # the kernel inherits it
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # jupyter_core's own deprecation notice, silenced
    notebook = notebook_of(SETUP, SYNC, AWAIT, STREAM)
    client = NotebookClient(notebook, timeout=60, startup_timeout=60, kernel_name="python3")
    reports: list[list[dict[str, Any]]] = []
    with client.setup_kernel():
        for _ in range(2):  # the second time re-runs every cell, the Database's creation included
            for index, cell in enumerate(notebook.cells):
                client.execute_cell(cell, index)
            reports.append([last_json(cell) for cell in notebook.cells[1:]])
        assert backends(admin_dsn, schema) >= 1  # both Databases' pools are open in the kernel

    total = sum(range(1000))
    for sync, awaited, streamed in reports:
        assert sync == {"loop_running": True, "count": 1000}
        assert awaited == {
            "rows": [0, 1, 2, 3, 4],
            "bridge_loop_is_kernel_loop": False,
            "bridge_thread": "loopbridge-default",
        }
        assert streamed == {"blocking": [total, 10], "awaited": [total, 4]}

    # The kernel exited normally: loopbridge closed every pool on its way out.
    deadline = time.monotonic() + 15
    while backends(admin_dsn, schema) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert backends(admin_dsn, schema) == 0
