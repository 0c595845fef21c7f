"""Starting an app's server on a free loopback port, waiting until it answers, reading its CPU time,
and always stopping it (its whole process group, gunicorn's worker included).

Each server runs in a session of its own (``start_new_session=True``): a Ctrl-C at the terminal reaches
the runner only, whose ``finally`` stops every server it started, and a signal to the group reaches a
pre-fork server's worker too.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["App", "AppError", "Server", "free_port", "start", "stop_all"]

ROOT = Path(__file__).resolve().parent.parent.parent

#: How long a stopped server may take to exit after SIGTERM before the group is killed.
STOP_TIMEOUT = 10.0
#: How much of a server's output an error shows.
OUTPUT_TAIL = 4000

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


class AppError(RuntimeError):
    """An app did not start, or stopped serving: the run cannot go on."""


@dataclass(frozen=True)
class App:
    """One server process running one app."""

    key: str
    label: str
    server: Literal["uvicorn", "gunicorn"]
    target: str  # "module:attribute", imported by the server
    prefix: str  # the path before the item's id, e.g. "/items/"
    loopbridge: bool  # loopbridge's side of its pair (the bridge's loop is chosen for these only)

    def argv(self, port: int) -> list[str]:
        if self.server == "uvicorn":
            # uvloop and httptools named explicitly: a missing one fails the start instead of uvicorn
            # quietly falling back to asyncio's loop or the pure-Python h11 parser.
            return [
                sys.executable, "-m", "uvicorn", self.target,
                "--host", "127.0.0.1", "--port", str(port),
                "--loop", "uvloop", "--http", "httptools", "--lifespan", "on",
                "--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "5",
            ]  # fmt: skip
        return [
            sys.executable, "-m", "gunicorn", self.target,
            "--bind", f"127.0.0.1:{port}",
            "-k", "gthread", "--threads", "16", "-w", "1",
            "--log-level", "warning", "--graceful-timeout", "5",
        ]  # fmt: skip


@dataclass
class Server:
    """A running server: the group leader's process, its output, and the process(es) serving the app."""

    app: App
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    # The processes whose CPU time counts: uvicorn's one process, or gunicorn's worker (its master only
    # supervises). Known once the server answers; a different set later means the worker was replaced.
    app_pids: list[int] = field(default_factory=list)
    output_shown: bool = False

    @property
    def name(self) -> str:
        """The app as errors name it: its key (which pair's side) and what it is."""
        return f"{self.app.key} ({self.app.label})"

    def output(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text if len(text) <= OUTPUT_TAIL else "...\n" + text[-OUTPUT_TAIL:]

    def _error(self, message: str) -> AppError:
        """*message* with the server's output, which :func:`stop_all` then does not show again."""
        # A server logs a failed request's traceback after sending the 500: give it a moment to land.
        time.sleep(0.5)
        self.output_shown = True
        return AppError(f"{message}\n{self.output()}")

    def wait_ready(self, deadline: float) -> None:
        """Until the app answers a real request (a row of the table) correctly, or *deadline*
        (``time.monotonic()``) passes, or the server exits: then :class:`AppError` with its output."""
        while True:  # probed at least once: another server's wait may have used up the deadline
            if self.proc.poll() is not None:
                raise self._error(f"{self.name} exited with {self.proc.returncode} before answering")
            problem = self._probe()
            if not problem:
                self.app_pids = self._find_app_pids(deadline)
                return
            if time.monotonic() >= deadline:
                raise self._error(f"{self.name} did not answer in time ({problem})")
            time.sleep(0.1)

    def _probe(self) -> str:
        """'' if ``GET <prefix>1`` returns row 1, else what went wrong."""
        host, port = self.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=2)
        try:
            conn.request("GET", f"{self.app.prefix}1")
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        if response.status != 200:
            return f"HTTP {response.status}: {body[:300]!r}"
        try:
            answer = json.loads(body)
        except ValueError:
            return f"not JSON: {body[:300]!r}"
        if answer != {"id": 1, "name": "item 1"}:
            return f"unexpected answer {answer!r}"
        return ""

    def _find_app_pids(self, deadline: float) -> list[int]:
        if self.app.server == "uvicorn":
            return [self.proc.pid]
        while True:
            workers = _children(self.proc.pid)
            if len(workers) == 1:
                return workers
            if time.monotonic() >= deadline:
                raise AppError(f"{self.name}: {len(workers)} gunicorn workers, expected 1")
            time.sleep(0.1)

    def check(self) -> None:
        """:class:`AppError` if the server exited or gunicorn replaced its worker (it crashed)."""
        if self.proc.poll() is not None:
            raise self._error(f"{self.name} exited with {self.proc.returncode}")
        if self.app.server == "gunicorn" and _children(self.proc.pid) != self.app_pids:
            raise self._error(f"{self.name}: gunicorn's worker was replaced (it died)")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the app's processes so far, every thread included (also threads
        that have already ended: the kernel adds those to the process's own counters)."""
        return sum(_cpu_seconds(pid) for pid in self.app_pids)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(app: App, port: int, env: dict[str, str]) -> Server:
    """Start *app*'s server on 127.0.0.1:*port* (not waiting for it: see :meth:`Server.wait_ready`).
    The caller must :func:`stop_all` it, whatever happens next."""
    fd, name = tempfile.mkstemp(prefix=f"bench-{app.key}-", suffix=".log")
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(
            app.argv(port),
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
                **env,
            },
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own: stopped whole, workers included
        )
    return Server(app, f"http://127.0.0.1:{port}", proc, Path(name))


def stop_all(servers: list[Server]) -> None:
    """SIGTERM to every server's group, then wait for each (bounded); SIGKILL to each group in the end,
    also when the wait is interrupted (Ctrl-C), so that no worker outlives the run."""
    try:
        for server in servers:
            if server.proc.poll() is None:
                _signal_group(server.proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for server in servers:
            try:
                server.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"apps: {server.name} did not stop within {STOP_TIMEOUT:g} s; killed", flush=True)
    finally:
        for server in servers:
            _signal_group(server.proc, signal.SIGKILL)
            try:
                server.proc.wait(5)
            except subprocess.TimeoutExpired:
                print(f"apps: {server.name} (pid {server.proc.pid}) survived SIGKILL", flush=True)
            # The servers log at warning level: whatever they said (a traceback, loopbridge's watchdog)
            # is worth seeing next to the numbers.
            said = server.output().strip()
            if said and not server.output_shown:
                print(
                    f"apps: {server.name} wrote:\n" + "\n".join(f"  | {line}" for line in said.splitlines())
                )
            server.log.unlink(missing_ok=True)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may contain spaces and ')')."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone
        return None
    return text[text.rindex(")") + 2 :].split()


def _cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    if fields is None:
        raise AppError(f"process {pid} is gone: its CPU time cannot be read")
    # Fields 14 and 15 of proc(5), utime and stime, in clock ticks (the list starts at field 3).
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_SECOND


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry))
    return sorted(found)
