"""Point-in-time figures about a bridge, for dashboards, health checks and tests."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BridgeStats"]


@dataclass(frozen=True)
class BridgeStats:
    """A snapshot of :meth:`Bridge.stats() <loopbridge.Bridge.stats>`.

    Counters cover the bridge's current thread: they start again from zero in a forked child.
    """

    name: str
    running: bool
    calls_started: int
    """Calls that began running on the bridge loop."""
    calls_succeeded: int
    calls_failed: int
    """Calls that ended with an exception (timeouts and cancellations included)."""
    calls_in_flight: int
    loop_lag: float
    """Seconds: how late the bridge loop runs a scheduled callback right now (0 when idle and healthy)."""
    max_loop_lag: float
    """Seconds: the worst lag seen since the thread started."""
    blocked_episodes: int
    """Times the watchdog saw the loop blocked for longer than its threshold."""
