"""Closing a bridge while calls race it: nothing is left open on a loop that has stopped.

The process-level exits (interpreter shutdown with calls in flight) are in ``test_process.py``.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from loopbridge import Bridge, BridgeClosedError, Database
from tests.support import WAIT, independent


def sessions(admin_dsn: str, application_name: str) -> int:
    rows = independent(
        admin_dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", application_name
    )
    count: int = rows[0][0]
    return count


def test_a_call_racing_close_opens_its_pool_finishes_and_the_pool_is_closed(
    dsn: str, admin_dsn: str, schema: str
) -> None:
    """Found by the exit tests: a call that started just before close() opened its pool after close()
    had let go of the loop thread. Registering the pool with the bridge then raised BridgeClosedError:
    the call failed although a graceful close should have let it finish, and the half-open pool was
    known to nobody but the shutdown's sweep of stray tasks."""
    bridge = Bridge("racing-close")
    db = Database(dsn, bridge=bridge, min_size=2)
    holding, release = threading.Event(), threading.Event()
    waiting, close_began = threading.Event(), threading.Event()

    async def hold_the_loop() -> None:
        holding.set()
        release.wait(WAIT)  # blocks the loop, so the next two calls start in one batch

    async def wait_for_close() -> None:
        waiting.set()
        close_began.wait(WAIT)  # blocks the loop until close() has begun, before the next call's step

    first = bridge.submit(hold_the_loop)
    assert holding.wait(WAIT)
    second = bridge.submit(wait_for_close)
    # The coroutine that runs on the bridge loop (not the twin, whose crossing would check the bridge
    # first): it opens the pool in its very first step, after close() has begun.
    query = bridge.submit(db._fetchval, "SELECT 1")
    release.set()
    assert waiting.wait(WAIT)  # both calls have started; the query's first step comes next
    closer = threading.Thread(target=bridge.close, args=(10,))
    closer.start()
    deadline = time.monotonic() + WAIT
    while bridge.state == "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    close_began.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    first.result(WAIT)
    second.result(WAIT)
    assert query.result(WAIT) == 1  # a graceful close lets a call that began before it finish
    deadline = time.monotonic() + 10
    while sessions(admin_dsn, schema) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sessions(admin_dsn, schema) == 0


def test_closing_the_bridge_ends_a_transaction_left_open_between_calls_without_waiting_for_it(
    dsn: str, admin_dsn: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A thread between two statements of a transaction when the bridge closes can never finish it (the
    bridge takes no more calls), so closing the pool does not wait its timeout for that connection: it
    is terminated, with a warning (the holder's work was cut short), and the server rolls it back."""
    bridge = Bridge("close-with-open-transaction")
    db = Database(dsn, bridge=bridge)
    db.execute("CREATE TABLE t (n int)")
    inside, closed = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def holder() -> None:
        try:
            with db.transaction() as tx:
                tx.execute("INSERT INTO t VALUES (1)")
                inside.set()
                closed.wait(WAIT)
                tx.execute("INSERT INTO t VALUES (2)")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=holder)
    thread.start()
    assert inside.wait(WAIT)
    with caplog.at_level(logging.WARNING, logger="loopbridge"):
        bridge.close(timeout=WAIT)  # the timeout is not waited for: the holder cannot give it back
    closed.set()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert [type(error) for error in errors] == [BridgeClosedError]
    assert "still held across calls" in caplog.text
    assert "connections still in use after" not in caplog.text
    deadline = time.monotonic() + 10
    while sessions(admin_dsn, schema) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sessions(admin_dsn, schema) == 0
    assert independent(admin_dsn, f"SELECT count(*) FROM {schema}.t")[0][0] == 0
