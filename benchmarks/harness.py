"""Driving N concurrent callers for a fixed window and recording what they did.

Every case is measured the same way: N callers (threads, or tasks on one event loop) call in a loop as
fast as they can; after a warm-up, the calls that *complete* inside a window of fixed length are counted
and their latencies kept. Throughput is the count divided by the window, so callers that straddle the
window's edges bias no case more than another.
"""

from __future__ import annotations

import asyncio
import threading
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = ["Sample", "Window", "drive_tasks", "drive_threads"]

#: A caller that has not finished within this long after the window closed is a hang, not a slow run.
STRAGGLER_LIMIT = 60.0


@dataclass(frozen=True)
class Window:
    """How long callers warm up, then how long the measurement lasts (seconds)."""

    warmup: float
    duration: float


@dataclass
class Sample:
    """What N callers completed within one window."""

    calls: int
    seconds: float
    # Seconds, one per completed call. An array of doubles, not a list of floats: a run keeps millions of
    # them, and as objects they would make every later garbage collection slower, the bridge's (which
    # allocates more per call) more than the baseline's, and the last cases of a run more than the first.
    latencies: array[float]

    @property
    def throughput(self) -> float:
        """Calls per second."""
        return self.calls / self.seconds

    def percentile(self, p: float) -> float:
        """The *p*-th percentile latency in seconds (nearest rank)."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]

    @staticmethod
    def merge(samples: list[Sample]) -> Sample:
        """One sample of everything *samples* measured."""
        latencies: array[float] = array("d")
        for s in samples:
            latencies.extend(s.latencies)
        return Sample(sum(s.calls for s in samples), sum(s.seconds for s in samples), latencies)


def drive_threads(n: int, call: Callable[[], object], window: Window) -> Sample:
    """Run *call* in a loop from *n* threads; return the calls completed inside the window."""
    barrier = threading.Barrier(n + 1)
    bounds: list[float] = []
    per_thread: list[array[float]] = [array("d") for _ in range(n)]
    errors: list[BaseException] = []

    def worker(latencies: array[float]) -> None:
        try:
            barrier.wait()
            start, end = bounds
            clock = time.perf_counter
            while True:
                t0 = clock()
                call()
                t1 = clock()
                if t1 > end:
                    return
                if t1 >= start:
                    latencies.append(t1 - t0)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [
        threading.Thread(target=worker, args=(per_thread[i],), name=f"bench-caller-{i}", daemon=True)
        for i in range(n)
    ]
    for thread in threads:
        thread.start()
    now = time.perf_counter()
    bounds.extend((now + window.warmup, now + window.warmup + window.duration))
    barrier.wait()
    deadline = time.monotonic() + window.warmup + window.duration + STRAGGLER_LIMIT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError(f"a caller thread was still running {STRAGGLER_LIMIT:g} s after the window")
    latencies = Sample.merge([Sample(0, 0.0, lat) for lat in per_thread]).latencies
    return Sample(len(latencies), window.duration, latencies)


async def drive_tasks(n: int, call: Callable[[], Awaitable[object]], window: Window) -> Sample:
    """Await *call* in a loop from *n* tasks on the running loop; return the calls completed inside the
    window."""
    now = time.perf_counter()
    start, end = now + window.warmup, now + window.warmup + window.duration
    per_task: list[array[float]] = [array("d") for _ in range(n)]

    async def worker(latencies: array[float]) -> None:
        clock = time.perf_counter
        while True:
            t0 = clock()
            await call()
            t1 = clock()
            if t1 > end:
                return
            if t1 >= start:
                latencies.append(t1 - t0)

    await asyncio.wait_for(
        asyncio.gather(*(worker(latencies) for latencies in per_task)),
        window.warmup + window.duration + STRAGGLER_LIMIT,
    )
    latencies = Sample.merge([Sample(0, 0.0, lat) for lat in per_task]).latencies
    return Sample(len(latencies), window.duration, latencies)
