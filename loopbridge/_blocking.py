"""Blocking calls made from code running in an event loop: refused when awaited, visible when slow.

A sync method called from an ``async def`` blocks the caller's event loop for the whole call: every other
task on that loop (the server's other requests) stands still. That is sometimes right (a FastAPI
lifespan creating tables, a notebook cell) and usually a mistake (``db.fetchval`` where ``await
db.afetchval`` was meant). Two mistakes are caught here, only for calls made while the calling thread's
loop runs (a plain sync thread never pays for it):

* ``await db.fetchval(...)``: the caller's bytecode awaits what the call returns. That can be seen before
  the call runs, so it raises a ``TypeError`` naming the async twin, instead of running the query while
  blocking the loop and then failing with "object int can't be used in 'await' expression".
* a blocking call that took longer than the bridge's ``warn_blocking`` threshold: a warning on the
  ``loopbridge`` logger, once per call site, naming the call site and the twin to await. Off in IPython
  kernels, whose cells run on the kernel's loop, where blocking calls are the norm.
"""

from __future__ import annotations

import dis
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

from ._loop import ForkSafeLock

__all__ = ["call_on_running_loop"]

logger = logging.getLogger("loopbridge")

R = TypeVar("R")

_GET_AWAITABLE = dis.opmap["GET_AWAITABLE"]
_CACHE = dis.opmap.get("CACHE", -1)  # inline cache entries follow a call (3.11+)
_PACKAGE = os.path.dirname(os.path.abspath(__file__))

_warned: set[tuple[str, int]] = set()
_warned_lock = ForkSafeLock()


def call_on_running_loop(
    threshold: float | None, caller: FrameType, label: str, async_hint: str, run: Callable[[], R]
) -> R:
    """``run()`` (a blocking call), made from *caller*'s frame while its thread's event loop runs;
    *threshold*: the bridge's ``warn_blocking``.

    :raises TypeError: if *caller* awaits the result: the call is not made.
    """
    if _awaits_the_result(caller):
        raise TypeError(
            f"{label} is the blocking call, and its result was awaited: in async code await its async "
            f"twin instead (incorrect: await {_plain(label)}; correct: {async_hint}). Nothing was run"
        )
    if threshold is None:
        return run()
    started = time.monotonic()
    try:
        return run()
    finally:
        elapsed = time.monotonic() - started
        if elapsed > threshold:
            _warn(caller, label, async_hint, elapsed)


def _awaits_the_result(frame: FrameType) -> bool:
    """Is the instruction after *frame*'s current call an ``await`` of its result?"""
    code = frame.f_code.co_code
    index = frame.f_lasti + 2
    while index < len(code) and code[index] == _CACHE:
        index += 2
    return index < len(code) and code[index] == _GET_AWAITABLE


def _warn(frame: FrameType, label: str, async_hint: str, elapsed: float) -> None:
    site = _outside_the_package(frame)
    key = (site.f_code.co_filename, site.f_lineno)
    with _warned_lock:
        if key in _warned or _in_ipython_kernel():
            return
        _warned.add(key)
    logger.warning(
        "%s blocked the event loop of thread %r for %.2f s (called at %s:%d, in %s()): no other task of "
        "that loop ran meanwhile. In async code, await its async twin instead: %s",
        label,
        threading.current_thread().name,
        elapsed,
        key[0],
        key[1],
        site.f_code.co_name,
        async_hint,
    )


def _outside_the_package(frame: FrameType) -> FrameType:
    # A blocking call made by loopbridge itself on the caller's behalf: name the caller's line.
    site = frame
    while site.f_back is not None and os.path.dirname(os.path.abspath(site.f_code.co_filename)) == _PACKAGE:
        site = site.f_back
    return site


def _in_ipython_kernel() -> bool:
    if "ipykernel" not in sys.modules:
        return False
    ipython: Any = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _plain(label: str) -> str:
    """``Database.fetchval()`` -> ``db.fetchval(...)``."""
    owner, _, method = label.partition(".")
    short = {"Database": "db", "Transaction": "tx", "Bridge": "bridge", "Engine": "engine"}.get(
        owner, owner.lower()
    )
    return f"{short}.{method.removesuffix('()')}(...)"
