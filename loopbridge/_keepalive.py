"""TCP keepalive on the pool's connections: the second line of defence against a silent peer.

A peer that silently discards traffic (a NAT, firewall or load balancer that dropped its state, a
partitioned network) never closes the connection: the client's writes "succeed" and nothing comes back.
loopbridge bounds every wait of its own (``round_trip_timeout``: BEGIN, COMMIT, the reset on release, a
LISTEN's heartbeat), and a call's ``timeout=`` bounds the caller's. What is left is a statement sent
without a timeout: only the kernel can notice that its connection died. Left to its defaults it takes
hours for an idle connection (keepalive probes start after 2 h) and about 15 minutes for one with data
unacknowledged (``tcp_retries2``). So every pooled TCP socket gets, from *idle* seconds (default
:data:`DEFAULT_IDLE`):

* ``SO_KEEPALIVE`` with ``TCP_KEEPIDLE`` = *idle*, ``TCP_KEEPINTVL`` = *idle* / 2, ``TCP_KEEPCNT`` = 3: a
  connection that is silent for *idle* seconds is probed, and dropped after 3 unanswered probes (25 s by
  default);
* ``TCP_USER_TIMEOUT`` = 3 times *idle* (30 s by default): data sent and not acknowledged for that long
  drops the connection. (It also drops one whose server reads nothing of what we send for that long,
  with its window shut: a COPY into a table locked for longer than that, say. Raise *idle* for such
  work, or turn keepalive off.)

And the server gets the same probing for its side (``tcp_keepalives_idle``, ``_interval``, ``_count``
in the connection's server settings), so that a server session whose client vanished does not stay
``idle in transaction`` holding locks for hours. Never over settings the caller gave, nor with a
``connect=`` function of the caller's, nor with ``pgbouncer=True``. PgBouncer (in session mode, say)
and other poolers refuse unknown startup parameters: when the server refuses these, the pool connects
without them from then on (an info line says so), and the pooler's own keepalive settings apply.

The kernel options are Linux's; where one is missing (macOS has no ``TCP_USER_TIMEOUT``) it is skipped.
"""

from __future__ import annotations

import logging
import math
import socket
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError

__all__ = ["DEFAULT_IDLE", "Keepalive", "keepalive"]

logger = logging.getLogger("loopbridge")

#: Seconds of silence before the first keepalive probe, unless ``Database(keepalive=...)`` says otherwise.
DEFAULT_IDLE = 10.0
#: Unanswered probes before the kernel drops the connection.
PROBES = 3
#: The kernel's own bounds on TCP_KEEPIDLE (Linux's MAX_TCP_KEEPIDLE).
_LOWEST, _HIGHEST = 1, 32767


@dataclass(frozen=True)
class Keepalive:
    """The keepalive settings derived from *idle* seconds (see the module docstring)."""

    idle: int
    on_server: bool = True
    """Whether to ask the server to probe its side too (its settings at login)."""

    def client_only(self) -> Keepalive:
        return Keepalive(self.idle, on_server=False)

    def refused(self, exc: BaseException) -> bool:
        """Whether *exc*, a failed connection attempt, is the server (a pooler) refusing the settings."""
        text = str(exc)
        return self.on_server and any(name in text for name in self.server_settings())

    @property
    def interval(self) -> int:
        return max(1, self.idle // 2)

    @property
    def user_timeout_ms(self) -> int:
        return 3 * self.idle * 1000

    def server_settings(self) -> dict[str, str]:
        return {
            "tcp_keepalives_idle": str(self.idle),
            "tcp_keepalives_interval": str(self.interval),
            "tcp_keepalives_count": str(PROBES),
        }

    def apply(self, sock: Any) -> None:
        """Set the kernel's keepalive options on *sock*, a TCP socket (anything else is left alone)."""
        if sock is None or getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
            return
        options = [
            (socket.SOL_SOCKET, getattr(socket, "SO_KEEPALIVE", None), 1),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), self.idle),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), self.interval),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), PROBES),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), self.user_timeout_ms),
        ]
        for level, option, value in options:
            if option is None:
                continue
            try:
                sock.setsockopt(level, option, value)
            except OSError as exc:  # a platform that refuses one: the others still help
                logger.debug("could not set socket option %s=%s: %r", option, value, exc)
            except ValueError:
                # uvloop's socket of a connection that closed as it was made has no descriptor left:
                # nothing to probe (the connection's failure is its own to report).
                return


def keepalive(value: object) -> Keepalive | None:
    """``Database(keepalive=...)``: seconds of silence before probing (None or False: off).

    :raises ConfigurationError: for anything but a number of seconds from 1 to 32767, or None.
    """
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _LOWEST <= value <= _HIGHEST:
        raise ConfigurationError(
            f"keepalive must be a number of seconds from {_LOWEST} to {_HIGHEST} (the kernel's bounds), or "
            f"None to leave the sockets as they are, not {value!r}"
        )
    return Keepalive(math.ceil(value))
