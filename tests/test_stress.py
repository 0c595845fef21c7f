"""The stress runner itself, briefly: it passes, prints its summary line last and never a password.

The real runs are ``python -m stress`` (60 s) and CI's 25 s pass; the PgBouncer variant is in
``test_pgbouncer.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.pgcluster import PASSWORD

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_a_short_stress_run_passes_and_prints_one_summary_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stress", "--duration", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("stress: PASS: acknowledged "), output
    for figure in ("lost 0", "duplicated 0", "hung 0", "leaked 0", "undocumented 0", "bridge alive"):
        assert figure in summary
    assert "1 restart" in proc.stdout
    assert "fork: child exit 0" in proc.stdout
    assert "postgres:***@" in proc.stdout  # the DSN is shown, redacted
    assert PASSWORD not in output


def test_bad_arguments_are_refused_with_usage() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stress", "--duration", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "--duration must be positive" in proc.stderr
