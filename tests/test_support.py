"""The suite's own helpers: what a test creates on the shared server is dropped even when it failed.

A Ctrl-C test whose child was killed in the middle of ``pg_sleep`` left its backend running, holding a
lock in the test's schema, and the fixture's DROP SCHEMA timed out: the schema stayed behind.
"""

from __future__ import annotations

import pytest

from loopbridge import Database
from tests.support import (
    drop_database,
    independent,
    on_database,
    throwaway_database,
    throwaway_schema,
    with_query,
)

pytestmark = pytest.mark.slow  # each waits out a lock timeout


def exists(admin_dsn: str, catalog: str, column: str, name: str) -> bool:
    return bool(independent(admin_dsn, f"SELECT count(*) FROM {catalog} WHERE {column} = $1", name)[0][0])


def test_a_schema_is_dropped_even_while_a_session_holds_a_lock_in_it(admin_dsn: str) -> None:
    with throwaway_schema(admin_dsn) as name:
        # Not tagged with the schema's name: found as the holder of the lock the DROP waits for.
        db = Database(with_query(admin_dsn, search_path=name), max_size=1)
        db.execute("CREATE TABLE held (x int)")
        tx = db.transaction()
        tx.__enter__()
        tx.execute("INSERT INTO held VALUES (1)")  # a lock on the table, and the transaction left open
    assert not exists(admin_dsn, "pg_namespace", "nspname", name)
    db.close(timeout=2)


def test_a_database_is_dropped_even_with_sessions_on_it(admin_dsn: str) -> None:
    with throwaway_database(admin_dsn) as name:
        db = Database(on_database(admin_dsn, name), min_size=2, max_size=2)
        db.open()
    assert not exists(admin_dsn, "pg_database", "datname", name)
    db.close(timeout=2)
    drop_database(admin_dsn, name)  # dropping what is gone is fine
