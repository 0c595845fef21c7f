"""The stress runner itself, briefly: it passes, prints its summary line last and never a password; and
its verifier catches what it must (mutants: a call that overruns its bound and then returns, a
transaction the library reports as left open).

The real runs are ``python -m stress`` (60 s) and CI's 25 s pass; the PgBouncer variant is in
``test_pgbouncer.py``.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loopbridge import Database
from stress.ledger import Attempt, Ledger
from stress.verify import Verdict
from tests.pgcluster import PASSWORD
from tests.support import WAIT

ROOT = Path(__file__).resolve().parent.parent


def stress(*args: str, code: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python -m stress ARGS``, or *code* (a mutant: patches, then ``stress.run.main``) with ARGS."""
    command = ["-m", "stress"] if code is None else ["-c", textwrap.dedent(code)]
    return subprocess.run(
        [sys.executable, *command, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def summary(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stdout + proc.stderr
    return lines[-1]


# -- the verifier, without a run ----------------------------------------------------------------------


class TestLedger:
    def late(self, ledger: Ledger, kind: str = "write") -> Attempt:
        """An attempt that started 2 s ago, with a bound of 1 s."""
        attempt = ledger.begin(f"{kind}-late", kind, bound=1.0)
        attempt.started -= 2.0
        return attempt

    def test_a_call_that_overran_its_bound_and_then_returned_is_hung(self) -> None:
        # Regression: only calls still running at the end, or seen overdue by the watcher (which
        # stops at the load's deadline), counted; one that came back late was never compared with its bound.
        ledger = Ledger()
        ledger.succeed(self.late(ledger))
        assert ledger.hung() == 1

    def test_a_call_that_failed_late_is_hung_too(self) -> None:
        ledger = Ledger()
        ledger.fail(self.late(ledger, "tx"), TimeoutError("late"))
        assert ledger.hung() == 1

    def test_calls_within_their_bound_are_not_hung(self) -> None:
        ledger = Ledger()
        for n in range(3):
            ledger.succeed(ledger.begin(f"k{n}", "write", bound=WAIT))
        assert ledger.hung() == 0

    def test_a_call_still_running_or_never_ended_is_hung_once(self) -> None:
        ledger = Ledger()
        self.late(ledger)  # in flight, overdue
        assert ledger.overdue() != []  # the watcher sees it first
        # A forked worker's call that never ended comes back without an end.
        ledger.merge([Attempt("fork-1", "write", time.monotonic(), WAIT)], {}, 0, 0)
        assert ledger.hung() == 2

    def test_the_verdict_fails_on_abandoned_and_names_it(self) -> None:
        assert Verdict(bridge_alive=True).ok
        verdict = Verdict(bridge_alive=True, abandoned=1)
        assert not verdict.ok
        assert "; abandoned 1; " in verdict.line()
        assert verdict.line().startswith("stress: FAIL: ")


#: The Verdict's counters; each must be 0 for the run to pass.
COUNTERS = (
    "lost",
    "duplicated",
    "torn",
    "phantom",
    "unseen_reads",
    "hung",
    "leaked",
    "abandoned",
    "undocumented",
)


def test_every_counter_of_the_verdict_and_a_dead_bridge_fail_a_run() -> None:
    fields = {name for name, kind in Verdict.__annotations__.items() if kind == "int"}
    assert fields == set(COUNTERS)
    assert Verdict(bridge_alive=True).ok
    for name in COUNTERS:
        verdict = Verdict(bridge_alive=True)
        setattr(verdict, name, 1)
        assert not verdict.ok, name
    assert not Verdict(bridge_alive=False).ok


def test_an_unclosed_transaction_reported_by_the_library_counts_as_abandoned(db: Database) -> None:
    ledger = Ledger()
    with ledger.watch_log():
        db.transaction().__enter__()  # begun, then dropped unclosed: the library rolls it back, and says so
        gc.collect()
        deadline = time.monotonic() + WAIT
        while ledger.abandoned == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert ledger.abandoned == 1
    assert "a transaction was garbage collected without being closed" in ledger.abandoned_examples[0]
    assert db.fetchval("SELECT 1") == 1  # its connection came back


# -- runs -----------------------------------------------------------------------------------------------

#: A short, light run against the suite's server (no restart, no fork): enough for a mutant to show.
SHORT = ("--duration", "2", "--no-fork", "--sync-threads", "2", "--loops", "1", "--tasks-per-loop", "2")

HANG_MUTANT = """
import functools, sys, threading, time

import stress.run
from loopbridge import Database

# A bound of 6 s (calls time out after 2 s); one write then takes 7 s and returns normally. The load
# lasts 2 s, so the watcher has stopped before the call becomes overdue.
stress.run.Plan = functools.partial(stress.run.Plan, hang_bound=6.0, call_timeout=2.0)
execute = Database.execute
once = threading.Event()


def late_execute(self, query, *args, **kwargs):
    if not once.is_set():
        once.set()
        time.sleep(7.0)
    return execute(self, query, *args, **kwargs)


Database.execute = late_execute
sys.exit(stress.run.main(sys.argv[1:]))
"""

ABANDON_MUTANT = """
import gc, sys, threading

import stress.run
from loopbridge import Database

execute = Database.execute
once = threading.Event()


def leaky_execute(self, query, *args, **kwargs):
    if not once.is_set():
        once.set()
        self.transaction().__enter__()  # begun and dropped: the library warns and rolls it back
        gc.collect()
    return execute(self, query, *args, **kwargs)


Database.execute = leaky_execute
sys.exit(stress.run.main(sys.argv[1:]))
"""


@pytest.mark.slow
class TestRuns:
    def test_a_short_stress_run_passes_and_prints_one_summary_line(self) -> None:
        proc = stress("--duration", "8")
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output
        line = summary(proc)
        assert line.startswith("stress: PASS: acknowledged "), output
        for figure in (
            "lost 0",
            "duplicated 0",
            "hung 0",
            "leaked 0",
            "abandoned 0",
            "torn 0",
            "phantom 0",
            "unseen reads 0",
            "undocumented 0",
            "bridge alive",
        ):
            assert figure in line
        assert "1 restart" in proc.stdout
        assert "fork: child exit 0" in proc.stdout
        assert "postgres:***@" in proc.stdout  # the DSN is shown, redacted
        assert PASSWORD not in output

    def test_a_short_half_open_run_passes_and_every_pool_slot_comes_back(self) -> None:
        """Half-open connections (the load through a proxy that goes silent now and then) never hang a
        caller, leak a connection or lose a write, and the pool serves its full size afterwards."""
        proc = stress("--faults", "halfopen", "--duration", "12")
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output
        line = summary(proc)
        assert line.startswith("stress: PASS: "), output
        for figure in ("lost 0", "duplicated 0", "hung 0", "leaked 0", "abandoned 0", "undocumented 0"):
            assert figure in line
        assert "through a fault-injecting proxy" in proc.stdout
        assert " half-open episodes (" in proc.stdout
        assert "stress: pool: served all 16 connections at once" in proc.stdout
        assert "0 backends terminated in 0 rounds, 0 restart" in proc.stdout  # halfopen alone
        assert "Traceback" not in output
        assert PASSWORD not in output

    def test_a_call_that_returns_after_the_hang_bound_fails_the_run(self, admin_dsn: str) -> None:
        proc = stress("--dsn", admin_dsn, *SHORT, code=HANG_MUTANT)
        line = summary(proc)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert line.startswith("stress: FAIL: "), line
        assert "; hung 1; " in line
        assert "lost 0; duplicated 0" in line

    def test_a_transaction_the_library_abandoned_fails_the_run(self, admin_dsn: str) -> None:
        proc = stress("--dsn", admin_dsn, *SHORT, code=ABANDON_MUTANT)
        line = summary(proc)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert line.startswith("stress: FAIL: "), line
        assert "; abandoned 1; " in line
        assert "; hung 0; leaked 0; " in line
        assert "stress: ABANDONED: " in proc.stdout


def test_bad_arguments_are_refused_with_usage() -> None:
    proc = stress("--duration", "0", timeout=60)
    assert proc.returncode == 2
    assert "--duration must be positive" in proc.stderr
    proc = stress("--faults", "halfopen,flood", timeout=60)
    assert proc.returncode == 2
    assert "--faults takes terminate, restart, fork, halfopen (comma-separated) or all" in proc.stderr
