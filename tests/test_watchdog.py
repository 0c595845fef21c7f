"""The blocked-loop watchdog, through a Database: a synchronous call hidden in code on the bridge loop.

The Bridge-level tests (stack in the warning, lag in stats, off switch, thread lifecycle) are in
``test_bridge.py::TestStatsAndWatchdog``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from loopbridge import Bridge, Database
from tests.support import WAIT


def blocked_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "loopbridge" and r.levelno == logging.WARNING and "has been blocked" in r.getMessage()
    ]


def test_a_sync_call_hidden_in_database_run_is_reported_with_its_stack(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loopbridge")

    async def report_with_a_hidden_sync_call(conn: Any) -> int:
        time.sleep(1.5)  # noqa: ASYNC251 - the bug the watchdog exists for
        value: int = await conn.fetchval("SELECT 7")
        return value

    with Bridge("watched-db", block_threshold=0.3) as bridge:
        db = Database(dsn, bridge=bridge)
        assert db.run(report_with_a_hidden_sync_call, timeout=WAIT) == 7
        assert db.fetchval("SELECT 1") == 1  # and it keeps serving
        deadline = time.monotonic() + WAIT  # the watchdog also says when the loop runs again
        while not any("runs again" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = bridge.stats()
        db_stats = db.stats()  # the Database reports its bridge loop's lag too
        db.close()
    assert db_stats.max_loop_lag > 0.3
    assert stats.blocked_episodes == 1
    assert stats.max_loop_lag > 0.3
    [warning] = blocked_warnings(caplog)
    assert "(threshold 0.30 s)" in warning
    assert "report_with_a_hidden_sync_call" in warning
    assert "time.sleep(1.5)" in warning
    assert any("runs again after being blocked" in r.getMessage() for r in caplog.records)


def test_a_block_shorter_than_the_threshold_is_not_reported(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="loopbridge")

    async def brief_sync_call(conn: Any) -> None:
        time.sleep(0.1)  # noqa: ASYNC251 - short, well under the threshold

    with Bridge("lenient", block_threshold=3.0) as bridge:
        db = Database(dsn, bridge=bridge)
        db.run(brief_sync_call, timeout=WAIT)
        stats = bridge.stats()
        db.close()
    assert stats.blocked_episodes == 0
    assert blocked_warnings(caplog) == []
