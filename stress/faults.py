"""The faults injected while the load runs, from threads of their own.

* every ``interval`` seconds, ``pg_terminate_backend`` of every backend serving the Database (all of the
  pool's connections, in use or idle; behind PgBouncer, PgBouncer's server connections);
* once, a restart of the server (``pg_ctl stop -m fast`` then start), where the runner owns the server;
* once, a fork of a worker process that then uses the Database itself (:meth:`Load.fork_worker`);
* half-open connections (:class:`SilentEpisodes`, ``--faults halfopen``): the Database reaches the server
  through the fault-injecting proxy (``tests/faultproxy.py``), which goes silent now and then: every
  connection open then, and every one made meanwhile, drops all traffic for good (a NAT or load balancer
  that forgot them), until the network heals for new ones.

The caller timeouts and cancellations are the load's own (see ``stress/load.py``). The faults use an
admin connection of their own, straight to the server, never the Database under test.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from tests.faultproxy import FaultProxy

__all__ = ["Faults", "SilentEpisodes", "Target"]

TERMINATE = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND {column} = $1
"""


@dataclass(frozen=True)
class Target:
    """Which backends belong to the Database under test: those of a database, or an application name."""

    column: str
    """``datname`` or ``application_name`` (a fixed choice, never caller input)."""
    value: str

    def __post_init__(self) -> None:
        if self.column not in ("datname", "application_name"):
            raise ValueError(f"cannot select backends by {self.column!r}")

    @property
    def terminate(self) -> str:
        return TERMINATE.format(column=self.column)


@dataclass
class Faults:
    admin_dsn: str
    target: Target
    deadline: float
    interval: float = 0.5
    terminate: bool = True
    restart: Callable[[], None] | None = None
    restart_at: float = 0.0
    fork: Callable[[], str] | None = None
    fork_at: float = 0.0
    terminated: int = 0
    rounds: int = 0
    restarts: int = 0
    restart_seconds: float = 0.0
    fork_outcome: str = "not forked"
    errors: Counter[str] = field(default_factory=Counter)
    _thread: threading.Thread | None = None
    _fork_thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._main(),), name="stress-faults", daemon=True
        )
        self._thread.start()

    def join(self, timeout: float) -> bool:
        """Wait for the faults (and the forked worker) to finish; False if they did not in time."""
        deadline = time.monotonic() + timeout
        for thread in (self._thread, self._fork_thread):
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    return False
        return True

    async def _main(self) -> None:
        conn: asyncpg.Connection | None = None
        try:
            while time.monotonic() < self.deadline:
                now = time.monotonic()
                if self.fork is not None and self._fork_thread is None and now >= self.fork_at:
                    # Fork from a plain thread: a thread running an event loop would hand its running
                    # loop to the child on Python < 3.12.
                    self._fork_thread = threading.Thread(target=self._fork, name="stress-fork", daemon=True)
                    self._fork_thread.start()
                if self.restart is not None and not self.restarts and now >= self.restart_at:
                    if conn is not None:
                        conn.terminate()
                        conn = None
                    started = time.monotonic()
                    await asyncio.to_thread(self.restart)
                    self.restart_seconds = time.monotonic() - started
                    self.restarts += 1
                try:
                    if self.terminate:
                        if conn is None or conn.is_closed():
                            conn = await asyncpg.connect(self.admin_dsn, timeout=5)
                        self.terminated += await conn.fetchval(
                            self.target.terminate, self.target.value, timeout=5
                        )
                        self.rounds += 1
                except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    self.errors[type(exc).__name__] += 1  # the server is restarting: try next round
                    conn = None
                await asyncio.sleep(self.interval)
        finally:
            if conn is not None:
                conn.terminate()

    def _fork(self) -> None:
        assert self.fork is not None
        self.fork_outcome = self.fork()


@dataclass
class SilentEpisodes:
    """Until *deadline*: healthy for a while, then silent for a while (``proxy.silence()``), then healed,
    over and over, each length drawn from *healthy* and *silent* (seconds, min and max).

    A silenced connection stays silent after the heal, as a forgotten NAT mapping does; its server side
    is then reset (``forget_silenced``), as the server's own TCP keepalive would end it on a real
    partition, some time after the fact (which the proxy, acknowledging everything, keeps from
    happening). The network is healed when the episodes end.
    """

    proxy: FaultProxy
    deadline: float
    seed: int
    healthy: tuple[float, float] = (1.0, 3.0)
    silent: tuple[float, float] = (1.0, 3.0)
    episodes: int = 0
    silent_seconds: float = 0.0
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="stress-halfopen", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _main(self) -> None:
        rng = random.Random(f"{self.seed}-halfopen")
        try:
            while self._sleep(rng.uniform(*self.healthy)):
                self.proxy.silence()
                self.episodes += 1
                started = time.monotonic()
                self._sleep(rng.uniform(*self.silent))
                self.proxy.heal()
                self.silent_seconds += time.monotonic() - started
                self.proxy.forget_silenced()
        finally:
            self.proxy.heal()
            self.proxy.forget_silenced()

    def _sleep(self, seconds: float) -> bool:
        """Sleep *seconds*, or until the deadline; whether there is time left after it."""
        time.sleep(max(0.0, min(seconds, self.deadline - time.monotonic())))
        return time.monotonic() < self.deadline
