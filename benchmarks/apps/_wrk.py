"""Loading a server with ``wrk`` and reading what it reports (``--latency``: the latency distribution).

wrk takes whole seconds only (``-d1s``; ``-d0.5s`` is refused). A fractional length is run as the next
whole second and stopped early with SIGINT, which wrk handles by ending the test and printing its report
as usual (it ignores SIGINT for its first few milliseconds, and then simply runs to its ``-d``).
"""

from __future__ import annotations

import math
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["INSTALL_HINT", "SCRIPT", "WrkError", "WrkResult", "find_wrk", "parse", "run_wrk", "version"]

INSTALL_HINT = "wrk is not installed: apt-get install wrk (the Debian/Ubuntu package wrk)"

#: A request for a random row: the path is the app's prefix and an id in 1..rows (wrk's script args).
SCRIPT = """\
local prefix, rows

function init(args)
  prefix = args[1]
  rows = tonumber(args[2])
  math.randomseed(os.time())
end

function request()
  return wrk.format("GET", prefix .. math.random(1, rows))
end
"""

#: A request slower than this counts as a timeout error: a hang, not a slow machine.
REQUEST_TIMEOUT = 10
#: How long wrk may run beyond its window before it is killed and the window fails.
OVERRUN = 30.0

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TIME = r"([\d.]+)(us|ms|s|m|h)"


class WrkError(RuntimeError):
    """wrk failed, or its output could not be read."""


@dataclass(frozen=True)
class WrkResult:
    """What wrk reported for one run."""

    requests: int  # completed, whatever their status
    seconds: float  # wrk's own measure of the run
    throughput: float  # requests per second, as wrk prints it
    p50: float  # seconds
    p99: float
    non_2xx: int  # "Non-2xx or 3xx responses" (wrk counts statuses above 399)
    socket_errors: dict[str, int]  # connect, read, write, timeout
    output: str

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def describe_errors(self) -> str:
        parts = [f"{self.non_2xx} non-2xx/3xx responses"] if self.non_2xx else []
        parts += [f"{count} socket {kind} errors" for kind, count in self.socket_errors.items() if count]
        return ", ".join(parts) or "no errors"


def find_wrk() -> str | None:
    return shutil.which("wrk")


def version(wrk: str) -> str:
    """wrk's version line (``wrk -v`` prints it before the usage, and exits 1)."""
    try:
        done = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def run_wrk(
    wrk: str, url: str, prefix: str, rows: int, seconds: float, connections: int, script: Path
) -> WrkResult:
    """``wrk -t1 -c<connections> -d<seconds> --latency`` against *url*, random rows under *prefix*."""
    whole = max(1, math.ceil(seconds))
    argv = [
        wrk, "-t1", f"-c{connections}", f"-d{whole}s", "--latency", f"--timeout={REQUEST_TIMEOUT}s",
        "-s", str(script), url, "--", prefix, str(rows),
    ]  # fmt: skip
    # A session of its own: a Ctrl-C reaches the runner, whose finally ends this wrk.
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        if seconds < whole:
            try:
                out, _ = proc.communicate(timeout=seconds)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                out, _ = proc.communicate(timeout=OVERRUN)
        else:
            out, _ = proc.communicate(timeout=whole + OVERRUN)
    except subprocess.TimeoutExpired:
        raise WrkError(f"wrk did not finish within {OVERRUN:g} s of its window: {' '.join(argv)}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    if proc.returncode != 0:
        raise WrkError(f"wrk exited with {proc.returncode}: {' '.join(argv)}\n{out}")
    return parse(out)


def parse(out: str) -> WrkResult:
    """Read wrk's report (with ``--latency``); :class:`WrkError` if a line it always prints is missing."""

    def need(pattern: str) -> re.Match[str]:
        found = re.search(pattern, out, re.MULTILINE)
        if found is None:
            raise WrkError(f"wrk's output has no line matching {pattern!r}:\n{out}")
        return found

    done = need(rf"^\s*(\d+) requests in {_TIME},")
    socket = re.search(
        r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out, re.MULTILINE
    )
    non_2xx = re.search(r"^\s*Non-2xx or 3xx responses: (\d+)", out, re.MULTILINE)
    return WrkResult(
        requests=int(done[1]),
        seconds=_seconds(done[2], done[3]),
        throughput=float(need(r"^Requests/sec:\s+([\d.]+)")[1]),
        p50=_seconds(*need(rf"^\s*50%\s+{_TIME}").groups()),
        p99=_seconds(*need(rf"^\s*99%\s+{_TIME}").groups()),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=dict(
            zip(
                ("connect", "read", "write", "timeout"),
                (int(n) for n in socket.groups()) if socket else (0, 0, 0, 0),
                strict=True,
            )
        ),
        output=out,
    )


def _seconds(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit]
