"""The ledger: every call the load makes, the unique key it writes, and how it ended.

Verification compares the ledger with the table: a call that returned success ("acknowledged") must have
its rows in the table exactly once; a call that failed may or may not have committed (a connection can die
after the commit and before the reply), but never twice and never half of a transaction.

Every failure must be of a type the documentation (docs/reliability.md) lists for a server that goes
away, restarts, or a call that times out or is cancelled (:data:`EXPECTED`). Anything else is counted as
*undocumented* and fails the run.

A call that took longer than its bound is *hung*, whether it is still running at the end or returned
late. And the load closes everything it opens, so a transaction (or stream, or subscription) that the
library reports as left open, garbage collected or its owner gone, is *abandoned*: the library lost
track of it (:meth:`Ledger.watch_log`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import loopbridge

__all__ = ["ABANDONED", "EXPECTED", "EXPECTED_IN_BLOCKS", "Attempt", "Ledger", "describe_failure"]

#: The failures a call may legitimately end with under the stress suite's faults, and why.
#: docs/reliability.md, "What a call can raise", lists the same types. A type not covered here is a bug.
EXPECTED: dict[type[BaseException], str] = {
    loopbridge.CallTimeoutError: "the caller's timeout expired (PoolTimeoutError: no connection in time)",
    loopbridge.ConnectError: "a new connection could not be made: the server is restarting",
    loopbridge.ConnectionLostError: "the connection died during the call: backend terminated, restart",
}

#: Also documented for a ``with db.transaction()`` block (docs/data/transactions.md): the statement running
#: when the connection broke raises ConnectionLostError (above), every later one (and the commit) raises
#: TransactionClosedError.
EXPECTED_IN_BLOCKS: dict[type[BaseException], str] = {
    loopbridge.TransactionClosedError: "the transaction's connection was lost: nothing was committed",
}

#: What the ``loopbridge`` logger says when it releases something a caller left open (``_owner.guard``:
#: garbage collected; ``_owner.OwnerWatch``: the thread or loop that opened it ended). The load closes
#: everything it opens, so each of these is a transaction (stream, subscription) the library abandoned.
ABANDONED = ("was garbage collected without being closed", "ended without closing it")

#: Outcomes that are not failures of the library: the caller itself gave up on the call.
CANCELLED = "cancelled-by-caller"
OK = "ok"


def describe_failure(exc: BaseException, kind: str, *, cancelled_by_caller: bool) -> tuple[str, bool]:
    """The outcome name for a failed call of *kind*, and whether that failure is documented.

    A ``CancelledError`` is documented only where the caller cancelled the call itself.
    """
    if isinstance(exc, (asyncio.CancelledError, concurrent.futures.CancelledError)):
        return (CANCELLED, True) if cancelled_by_caller else (f"{type(exc).__name__}(unrequested)", False)
    expected = (*EXPECTED, *EXPECTED_IN_BLOCKS) if kind == "block" else tuple(EXPECTED)
    name = type(exc).__name__
    return name, isinstance(exc, expected)


def _explain(exc: BaseException) -> str:
    """``Type: message``, followed by the chain of exceptions it was raised from or during."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(parts) < 4:
        seen.add(id(current))
        parts.append(f"{type(current).__module__}.{type(current).__name__}: {str(current)[:160]}")
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)


@dataclass
class Attempt:
    """One call: a write (one row), a transaction (two rows) or a read, identified by its key."""

    key: str
    kind: str
    """``"write"``, ``"tx"`` or ``"read"``."""
    started: float
    bound: float
    """Seconds after which a call still running counts as hung."""
    outcome: str | None = None
    documented: bool = True
    ended: float | None = None


@dataclass
class Ledger:
    """Thread-safe record of every attempt. The fork child keeps its own and reports it back."""

    attempts: list[Attempt] = field(default_factory=list)
    inflight: dict[int, Attempt] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    """The first message seen for each failure type, for the report."""
    undocumented: set[str] = field(default_factory=set)
    """Failure types seen where they are not documented."""
    bad_reads: int = 0
    """Reads of an acknowledged key that did not see exactly one row."""
    hung_seen: set[int] = field(default_factory=set)
    lost_processes: int = 0
    """Forked workers that hung or died before reporting: each counts as hung."""
    abandoned: int = 0
    """Warnings of the ``loopbridge`` logger about something left open (:data:`ABANDONED`)."""
    abandoned_examples: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, key: str, kind: str, bound: float) -> Attempt:
        attempt = Attempt(key, kind, time.monotonic(), bound)
        with self._lock:
            self.attempts.append(attempt)
            self.inflight[id(attempt)] = attempt
        return attempt

    def succeed(self, attempt: Attempt) -> None:
        self._end(attempt, OK, True)

    def fail(self, attempt: Attempt, exc: BaseException, *, cancelled_by_caller: bool = False) -> None:
        name, documented = describe_failure(exc, attempt.kind, cancelled_by_caller=cancelled_by_caller)
        with self._lock:
            if not documented:
                self.undocumented.add(f"{name} ({attempt.kind})")
            if name not in self.examples:
                self.examples[name] = _explain(exc)
                if os.environ.get("STRESS_TRACEBACKS"):
                    traceback.print_exception(exc)
        self._end(attempt, name, documented)

    def bad_read(self) -> None:
        with self._lock:
            self.bad_reads += 1

    def _end(self, attempt: Attempt, outcome: str, documented: bool) -> None:
        attempt.outcome = outcome
        attempt.documented = documented
        attempt.ended = time.monotonic()
        with self._lock:
            self.inflight.pop(id(attempt), None)

    def merge(
        self, attempts: list[Attempt], examples: dict[str, str], bad_reads: int, abandoned: int
    ) -> None:
        """Add what a forked worker process recorded."""
        with self._lock:
            self.attempts.extend(attempts)
            self.undocumented.update(f"{a.outcome} ({a.kind})" for a in attempts if not a.documented)
            for name, text in examples.items():
                self.examples.setdefault(name, text)
            self.bad_reads += bad_reads
            self.abandoned += abandoned

    @contextmanager
    def watch_log(self) -> Iterator[None]:
        """Count the ``loopbridge`` logger's warnings about something left open, while the block runs."""
        handler = _AbandonedCounter(self)
        library = logging.getLogger("loopbridge")
        library.addHandler(handler)
        try:
            yield
        finally:
            library.removeHandler(handler)

    def _abandon(self, message: str) -> None:
        with self._lock:
            self.abandoned += 1
            if len(self.abandoned_examples) < 3:
                self.abandoned_examples.append(message[:300])

    def overdue(self) -> list[Attempt]:
        """Calls still running past their bound: hung. Each is reported once."""
        now = time.monotonic()
        with self._lock:
            late = [
                a for a in self.inflight.values() if now - a.started > a.bound and id(a) not in self.hung_seen
            ]
            self.hung_seen.update(id(a) for a in late)
        return late

    def hung(self) -> int:
        """Calls that ran longer than their bound: still running, seen overdue, or returned late."""
        self.overdue()
        with self._lock:
            # Never ended covers a forked worker's calls too (its in-flight set stays in the child).
            late = {id(a) for a in self.attempts if a.ended is None or a.ended - a.started > a.bound}
            return len(self.hung_seen | late) + self.lost_processes

    def counts(self) -> tuple[Counter[str], Counter[str], int]:
        """(acknowledged by kind, failures by outcome, undocumented failures)."""
        acknowledged: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        undocumented = 0
        with self._lock:
            attempts = list(self.attempts)
        for attempt in attempts:
            if attempt.outcome == OK:
                acknowledged[attempt.kind] += 1
            elif attempt.outcome is not None:
                failed[attempt.outcome] += 1
                undocumented += not attempt.documented
        return acknowledged, failed, undocumented


class _AbandonedCounter(logging.Handler):
    """Counts, into a ledger, the records that say something was left open (:data:`ABANDONED`)."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__(logging.WARNING)
        self.ledger = ledger

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(text in message for text in ABANDONED):
            self.ledger._abandon(message)
