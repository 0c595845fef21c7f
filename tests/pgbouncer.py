"""A PgBouncer of the tests' own, in front of a private cluster: transaction pooling, a small server pool.

The Debian package ``pgbouncer`` provides the binary. PgBouncer refuses to run as root, so as root it runs
as the cluster's user (``postgres``). Its configuration, password file, log and pid file live in a
temporary directory of their own; it listens on a free loopback port and never on a Unix socket, so it
disturbs no other PgBouncer on the machine.

Where the binary is missing the PgBouncer tests skip with the reason, unless ``LOOPBRIDGE_REQUIRE_PGBOUNCER``
is set (CI sets it): then they fail, so that CI can never pass by silently skipping them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.pgcluster import PASSWORD, SUPERUSER, PrivateCluster, free_port

#: Set (to anything but "" or "0") to make a missing pgbouncer binary a failure instead of a skip.
REQUIRE_ENV = "LOOPBRIDGE_REQUIRE_PGBOUNCER"


class PgBouncerMissing(RuntimeError):
    """No pgbouncer binary on this machine."""


def pgbouncer_binary() -> Path:
    """The pgbouncer executable (Debian installs it in /usr/sbin, often not on a user's PATH).

    :raises PgBouncerMissing: if there is none.
    """
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise PgBouncerMissing(
            "pgbouncer is not installed (Debian/Ubuntu: apt-get install pgbouncer; macOS: brew install "
            "pgbouncer). .ci/run installs it."
        )
    return Path(found)


def required() -> bool:
    """True when a missing pgbouncer must fail the run rather than skip (``LOOPBRIDGE_REQUIRE_PGBOUNCER``)."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


class PgBouncer:
    """One pgbouncer process in front of *cluster*, in *pool_mode* with *pool_size* server connections
    per database and user. Connect as ``SUPERUSER`` with ``PASSWORD`` (checked with SCRAM)."""

    def __init__(
        self, cluster: PrivateCluster, *, pool_size: int = 3, pool_mode: str = "transaction"
    ) -> None:
        self.binary = pgbouncer_binary()
        self.cluster = cluster
        self.pool_size = pool_size
        self.pool_mode = pool_mode
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="loopbridge-pgbouncer-"))
        self.user = cluster.user
        self._process: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        ini = self.root / "pgbouncer.ini"
        userlist = self.root / "userlist.txt"
        ini.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host={self.cluster.host} port={self.cluster.port}",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = scram-sha-256",
                    f"auth_file = {userlist}",
                    f"admin_users = {SUPERUSER}",
                    f"pool_mode = {self.pool_mode}",
                    f"default_pool_size = {self.pool_size}",
                    "min_pool_size = 0",
                    "reserve_pool_size = 0",
                    "max_client_conn = 1000",
                    "server_login_retry = 1",
                    f"logfile = {self.root / 'pgbouncer.log'}",
                    f"pidfile = {self.root / 'pgbouncer.pid'}",
                    "",
                ]
            )
        )
        # A plain-text password lets pgbouncer answer SCRAM on both sides; the file is private.
        userlist.write_text(f'"{SUPERUSER}" "{PASSWORD}"\n')
        userlist.chmod(0o600)
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for path in (self.root, ini, userlist):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def dsn(self, *, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 20) -> None:
        """Start pgbouncer and return once it accepts connections.

        :raises RuntimeError: (with its log) if it exits or does not listen within *timeout* seconds.
        """
        self._process = subprocess.Popen(
            [str(self.binary), str(self.root / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=self.user,
            cwd=self.root,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self._process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"pgbouncer did not listen on 127.0.0.1:{self.port} within {timeout} s:\n{self.log()}"
        )

    def stop(self) -> None:
        """Stop pgbouncer (SIGTERM, then SIGKILL after 10 s). Safe to call twice."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self.root / "pgbouncer.log").read_text(errors="replace")
        except OSError:
            return "(no log)"

    def show(self, what: str) -> list[dict[str, str]]:
        """``SHOW <what>`` on the admin console (``POOLS``, ``CLIENTS``, ``SERVERS``), as dicts.

        The admin console speaks only the simple query protocol, which asyncpg uses for commands
        without results; psql reads the rows.
        """
        psql = shutil.which("psql") or str(self.cluster.bindir / "psql")
        connect = ["-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-d", "pgbouncer"]
        out = subprocess.run(
            [psql, *connect, "-A", "-F", "\t", "-c", f"SHOW {what}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
            env={**os.environ, "PGPASSWORD": PASSWORD, "PGCONNECT_TIMEOUT": "10"},
        )
        lines = [line for line in out.stdout.splitlines() if line and not line.startswith("(")]
        if not lines:
            return []
        header = lines[0].split("\t")
        return [dict(zip(header, line.split("\t"), strict=False)) for line in lines[1:]]
