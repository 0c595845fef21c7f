"""Options for a server behind PgBouncer (or another pooler) in transaction or statement pooling mode.

In those modes PgBouncer lends a server connection for one transaction only; the next transaction of
the same client may run on another server connection. What asyncpg keeps per *session* then breaks:

* **named prepared statements**: asyncpg caches each query as ``__asyncpg_stmt_N__`` on the server
  session that prepared it; the next call, on another session, fails with ``prepared statement
  "__asyncpg_stmt_N__" does not exist`` (or ``already exists``). ``statement_cache_size=0`` makes asyncpg
  use the unnamed statement, which lives within one Parse/Bind/Execute exchange (asyncpg sends Flush,
  not Sync, between Parse and Bind, so PgBouncer keeps the server connection for the whole exchange).
  asyncpg >= 0.31 also keeps ``prepare()`` and ``copy_records_to_table()`` unnamed then.
* **the pool's reset query** (``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``)
  would run, on every release, on whichever server connection PgBouncer lends at that moment: one more
  round trip per call that resets nothing of ours. Behind a transaction pooler only the rollback of an
  open transaction matters, and asyncpg does that before any custom reset.

What no client option can fix stays the application's to avoid: session state (``SET`` without
``LOCAL``, ``LISTEN``, session advisory locks, ``WITH HOLD`` cursors, temporary tables outside a
transaction) and startup parameters PgBouncer does not track (``search_path`` in the DSN is refused
unless PgBouncer lists it in ``ignore_startup_parameters``; set it per role instead).
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigurationError

__all__ = ["transaction_pooling_options"]


async def _no_session_reset(connection: object) -> None:
    """The pool's reset behind a transaction pooler: nothing beyond asyncpg's own rollback.

    asyncpg calls ``Connection._reset()`` (which rolls back an open transaction and drops listeners)
    before this custom reset, so a connection never goes back to the pool inside a transaction.
    """


def transaction_pooling_options(options: dict[str, Any]) -> dict[str, Any]:
    """*options* for ``asyncpg.create_pool``, adjusted for PgBouncer in transaction pooling mode.

    :raises ConfigurationError: if *options* ask for named prepared statements, which cannot work there.
    """
    cache = options.get("statement_cache_size", 0)
    if cache != 0:
        raise ConfigurationError(
            f"pgbouncer=True turns asyncpg's statement cache off, but statement_cache_size={cache!r} was "
            "given: named prepared statements do not survive transaction pooling. Drop "
            "statement_cache_size (or pgbouncer=True if the pooler runs in session mode)"
        )
    adjusted = dict(options)
    adjusted["statement_cache_size"] = 0
    adjusted.setdefault("reset", _no_session_reset)
    return adjusted
