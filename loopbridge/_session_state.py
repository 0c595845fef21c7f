"""Which SQL can change a session's state, so that a connection that ran none goes back unreset.

asyncpg resets every connection it takes back into its pool with a query of its own
(``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``): a round trip, and about as much
server CPU as the call itself, after every call. Yet most calls change nothing that outlives them. So
loopbridge resets only a connection that may carry session state: one whose statements (all of them,
multi-statement strings included, comments stripped) began with a command that sets it, or called a
function that does, or on which the caller's own code ran (``db.run(fn)``: anything may have happened).
Every other connection goes back with asyncpg's own cheap step only (a ROLLBACK if it is somehow inside a
transaction, its listeners dropped).

What is recognised, case-insensitively, at the start of any statement: ``SET`` (``SET ROLE``, ``SET
SESSION AUTHORIZATION`` included), ``RESET``, ``LISTEN``, ``UNLISTEN``, ``DECLARE`` (a ``WITH HOLD``
cursor outlives its transaction), ``CLOSE``, ``PREPARE``, ``DEALLOCATE``, ``DISCARD``, ``LOAD``, ``DO``
(an anonymous block may do any of it, through ``EXECUTE``), ``CREATE [GLOBAL|LOCAL] TEMP[ORARY]``; and
anywhere in the text (outside comments and quotes): ``INTO TEMP[ORARY]``
(``SELECT ... INTO TEMP t``), ``set_config(``, ``pg_advisory_lock(``/``_shared(``,
``pg_try_advisory_lock(``/``_shared(`` (session-level locks; the ``_xact_`` ones end with their
transaction), ``dblink_connect``. A false alarm costs one reset; what cannot be seen from the text (a
function of yours that runs ``SET`` inside) is not recognised: run such a call through ``db.run(fn)``, or
keep the full reset on every release (``Database(session_reset="always")``).

The full reset is asyncpg's own (advisory locks, cursors, listeners, settings), and what asyncpg's leaves
behind: the session's role and authorization, its temporary tables and sequences' state, and the
statements it PREPAREd by name. asyncpg's own cached statements are kept, unless the session may have
dropped some of them: a statement that began with ``DEALLOCATE``, ``DISCARD ALL`` or ``DO`` ran on it, or
the caller's own code did. Then the same round trip counts the statements asyncpg prepared that the
session still has, and if that is fewer than asyncpg knows of, a second one deallocates them all and
asyncpg forgets them (the next call of each prepares it anew), where asyncpg's own pool would hand the
next caller a cache naming statements that no longer exist ("prepared statement ... does not exist").
Only then: the count costs about as much server time as the rest of the reset. (A ``PreparedStatement``
the caller's own code keeps past its ``run`` is one asyncpg does not count: with one alive, one of
asyncpg's dropped by its name goes unseen.)
"""

from __future__ import annotations

import functools
import re
import weakref
from typing import Any

from . import _asyncpg

__all__ = [
    "SESSION_RESETS",
    "may_change_session_state",
    "may_drop_statements",
    "note_change",
    "reset_always",
    "reset_when_changed",
    "unchanged",
]

#: ``Database(session_reset=...)``: reset a connection given back to the pool only when its session state
#: may have changed (the default), or always.
SESSION_RESETS = ("when_changed", "always")

# What asyncpg's reset (run first) leaves behind; the statements one SQL PREPARE made, never asyncpg's own
# (from_sql is false for those).
_REST_OF_THE_RESET = """
SET SESSION AUTHORIZATION DEFAULT;
RESET ALL;
DISCARD TEMP;
DISCARD SEQUENCES;
DO $loopbridge$ DECLARE name text; BEGIN
    FOR name IN SELECT s.name FROM pg_prepared_statements AS s WHERE s.from_sql LOOP
        EXECUTE format('DEALLOCATE %I', name);
    END LOOP;
END $loopbridge$;
"""

# The statements asyncpg prepared (through the protocol: from_sql is false), the SQL PREPAREd ones being
# gone by now.
_COUNT_ASYNCPGS = "SELECT FROM pg_prepared_statements WHERE NOT from_sql;"

# The connections whose session state may have changed since they were last reset, each with whether its
# prepared statements may have been dropped too (weakly: a connection that is closed meanwhile goes with
# its state).
_changed: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def note_change(connection: object, *, drops_statements: bool = False) -> None:
    """*connection* (a pool proxy, or a connection) may carry session state: reset it when it goes back
    to the pool; *drops_statements*: it may also have lost prepared statements asyncpg has cached (see
    :func:`may_drop_statements`). On the bridge loop, before the statement that may change it is sent."""
    connection = _asyncpg.unproxied(connection)
    _changed[connection] = drops_statements or _changed.get(connection, False)


def unchanged(connection: Any) -> bool:
    """Whether *connection* (not a proxy) needs no reset: nothing sent on it since its last one may have
    changed its session state."""
    return connection not in _changed


async def reset_when_changed(connection: Any) -> None:
    """The pool's ``reset=``: after asyncpg's own step (a ROLLBACK if the connection is inside a
    transaction, its listeners dropped), the full reset for a connection whose state may have changed,
    nothing for the others."""
    if connection in _changed:
        await reset_always(connection)


async def reset_always(connection: Any) -> None:
    """The pool's ``reset=`` with ``session_reset="always"``: the full reset, every time."""
    expected = _asyncpg.prepared_statements(connection) if _changed.pop(connection, False) else 0
    statements = [connection.get_reset_query(), _REST_OF_THE_RESET, _COUNT_ASYNCPGS if expected else ""]
    status = await connection.execute("\n".join(filter(None, statements)))
    # With the count, the last statement's status ("SELECT <n>") says how many of asyncpg's are left.
    if expected and int(status.rpartition(" ")[2]) < expected:
        # The session dropped a statement asyncpg has cached: the next caller's call of it would fail.
        # Which others are still there does not matter; none will be, and asyncpg will prepare anew.
        await connection.execute("DEALLOCATE ALL")
        _asyncpg.forget_statements(connection)


# Comments (gone), and quoted text (emptied: a keyword inside a string, a quoted identifier or a dollar-
# quoted body is no command). E'...' strings take backslash escapes; $tag$...$tag$ needs a matching tag.
_LEXEMES = re.compile(
    r"""(?P<comment>--[^\n]*|/\*.*?\*/)
      | (?P<string>[Ee]'(?:[^'\\]|\\.|'')*'
                 | '(?:[^']|'')*'
                 | "(?:[^"]|"")*"
                 | \$(?P<tag>[A-Za-z_]\w*|)\$.*?\$(?P=tag)\$)""",
    re.DOTALL | re.VERBOSE,
)
# A statement's first word(s), at the start of the text or after a semicolon.
_STARTS = re.compile(
    r"(?:^|;)\s*(?:SET|RESET|LISTEN|UNLISTEN|DECLARE|CLOSE|PREPARE|DEALLOCATE|DISCARD|LOAD|DO"
    r"|CREATE\s+(?:(?:GLOBAL|LOCAL)\s+)?TEMP(?:ORARY)?)\b",
    re.IGNORECASE,
)
# A statement that may drop prepared statements other than its own session's SQL PREPAREd ones: a
# DEALLOCATE (of all, or of one by a name it found), DISCARD ALL, or a DO block's EXECUTE of either.
_DROPS = re.compile(r"(?:^|;)\s*(?:DEALLOCATE|DISCARD\s+ALL|DO)\b", re.IGNORECASE)
_ANYWHERE = re.compile(
    r"\bINTO\s+TEMP(?:ORARY)?\b|\bset_config\s*\(|\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\("
    r"|\bdblink_connect",
    re.IGNORECASE,
)


def _masked(match: re.Match[str]) -> str:
    return " " if match.group("comment") is not None else "''"


@functools.lru_cache(maxsize=2048)
def may_change_session_state(sql: str) -> bool:
    """Whether running *sql* may leave state in the session (see the module docstring). Unbalanced
    quotes leave the text as it is: a false alarm at worst."""
    text = _LEXEMES.sub(_masked, sql)
    return _STARTS.search(text) is not None or _ANYWHERE.search(text) is not None


@functools.lru_cache(maxsize=256)
def may_drop_statements(sql: str) -> bool:
    """Whether running *sql* may drop prepared statements asyncpg has cached (``DEALLOCATE``, ``DISCARD
    ALL``, ``DO``); asked only of statements :func:`may_change_session_state` flags."""
    return _DROPS.search(_LEXEMES.sub(_masked, sql)) is not None
