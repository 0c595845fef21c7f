"""Real servers for the framework tests: started in a subprocess on a free loopback port, always stopped.

:func:`serve` starts a server (uvicorn, gunicorn) in a session of its own, waits (bounded) until it
answers, and stops the whole process group on the way out, even when the test failed: SIGTERM, then
SIGKILL if it has not exited in time. Its output goes to a file that failing assertions show.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent

#: How long a server may take to answer its first request, and to stop.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
#: How often a server that has not stopped yet is sent SIGTERM again.
TERM_AGAIN = 2.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Served:
    """A running server: its base URL, its process (the group leader) and its output."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Stop it gracefully (SIGTERM to the group, repeated), or kill it after *timeout*; its exit code.

        SIGTERM is sent again every :data:`TERM_AGAIN` seconds: a pre-fork server (gunicorn) may be
        forking a worker just then, and a worker takes a signal that arrives before it installs its own
        handlers with the arbiter's, which only queue it; the arbiter's own SIGTERM to that worker can
        come that early too, and it then waits its graceful timeout (30 s) for a worker that never heard.
        A server that stops at all hears a repeated SIGTERM once its handlers are in place.
        """
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                where = _stacks(self.proc.pid)
                _signal_group(self.proc, signal.SIGKILL)
                self.proc.wait(5)
                pytest.fail(
                    f"the server did not stop within {timeout} s of SIGTERM\n{self.output()}\n{where}"
                )
            _signal_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(min(TERM_AGAIN, left))
            except subprocess.TimeoutExpired:
                pass
        # Workers of a pre-fork server are in the same group: none may outlive the test.
        _signal_group(self.proc, signal.SIGKILL)
        return self.proc.returncode


@contextmanager
def serve(
    argv: list[str], *, port: int, env: dict[str, str], ready: str = "/health", timeout: float = START_TIMEOUT
) -> Iterator[Served]:
    """Run *argv* (a server listening on 127.0.0.1:*port*) until the block ends."""
    log = Path(tempfile.mkstemp(prefix="loopbridge-server-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped whole, workers included
        )
    served = Served(f"http://127.0.0.1:{port}", proc, log)
    try:
        _wait_ready(served, ready, timeout)
        yield served
    finally:
        served.stop()
        log.unlink(missing_ok=True)


def python(*args: str) -> list[str]:
    """A command running this interpreter (the venv's), so that the servers see the same packages."""
    return [sys.executable, *args]


def _wait_ready(served: Served, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            pytest.fail(
                f"the server exited with {served.proc.returncode} before answering\n{served.output()}"
            )
        try:
            if httpx.get(served.url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"the server did not answer {path} within {timeout} s\n{served.output()}")


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _stacks(pgid: int) -> str:
    """What each process of group *pgid* is doing, for a failure message: py-spy's dump of its Python
    stacks when py-spy is installed (the bench extra), its state and kernel wait channel always."""
    lines = []
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # the process group, after the state and the parent
                continue
            pid = int(stat.parent.name)
            wchan = (stat.parent / "wchan").read_text()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        lines.append(f"pid {pid} state {fields[0]} waiting in {wchan or '-'}: {cmdline}")
        if spy is not None:
            try:
                dump = subprocess.run(
                    [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=10
                )
                lines.append(dump.stdout + dump.stderr)
            except subprocess.TimeoutExpired:
                lines.append("(py-spy dump did not answer within 10 s)")
    return "\n".join(lines) or "(no process of its group is left)"
