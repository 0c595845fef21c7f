"""The real-server benchmark (``python -m benchmarks.apps``) refuses to run without its load generator.

Its measurements are not tests (speed never fails a test); CI runs its short pass. What a test pins is
how it fails where wrk is not installed: it says how to install it and exits non-zero, before it
starts a server or touches the database.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.apps.__main__ import main


def test_without_wrk_the_apps_benchmark_says_how_to_install_it_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no wrk on the PATH
    assert main(["--quick", "--out", str(tmp_path / "results")]) == 2
    assert "apt-get install wrk" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()  # nothing measured, nothing written
