"""What loopbridge accepts: sizes, timeouts, asyncpg's pool options and parameter sizes, in one place.

Everything here runs in the caller's thread, before anything is queued: a value that could only fail
later (on the bridge loop, where it would stall every caller, or at the first call, far from the
mistake) is refused at once, saying what is allowed.

* **Sizes** are plain integers (``True`` is not a size) up to :data:`MAX_POOL_SIZE`.
* **Timeouts** are numbers of seconds, finite or not: ``float('inf')``, and anything from
  :data:`NO_TIMEOUT` on, means no timeout, as None does.
* **Parameters** of a statement whose values certainly exceed what PostgreSQL accepts in one message
  (:data:`MAX_MESSAGE_BYTES`) are refused before they are encoded: asyncpg encodes them on the bridge
  loop, which a value of gigabytes stalls for seconds, only to fail.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from .errors import ConfigurationError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_POOL_SIZE",
    "NO_TIMEOUT",
    "call_timeout",
    "check_parameters",
    "check_pool_options",
    "check_rows",
    "pool_size",
    "seconds",
]

#: The largest ``max_size`` (and ``min_size``) of a pool. No single client process can use more: each
#: connection is a server process (PostgreSQL's ``max_connections`` defaults to 100), and asyncpg sets up
#: every slot of a pool on the bridge loop when it opens and again when it closes (10,000 slots take
#: about 0.4 s to close; 10**7 blocked every caller for seconds).
MAX_POOL_SIZE = 10_000

#: A timeout this long or longer (``threading.TIMEOUT_MAX``, about 292 years) is no timeout at all:
#: the waits underneath cannot take it (``OverflowError``).
NO_TIMEOUT = threading.TIMEOUT_MAX

#: PostgreSQL refuses a protocol message longer than 1 GB - 1 (``PQ_LARGE_MESSAGE_LIMIT``), so the
#: values of one statement's parameters must fit in it.
MAX_MESSAGE_BYTES = 0x3FFF_FFFF


def pool_size(name: str, value: object, *, low: int, high: int = MAX_POOL_SIZE) -> int:
    """:raises ConfigurationError: unless *value* is an ``int`` (not a bool) from *low* to *high*."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(f"{name} must be an integer from {low} to {high:,}, not {value!r}")
    return value


def seconds(name: str, value: object, *, allow_none: bool = True, allow_zero: bool = False) -> float | None:
    """A timeout option: a number of seconds (``inf`` or more than :data:`NO_TIMEOUT`: None, where None
    is allowed).

    :raises ConfigurationError: for anything else: not a number, NaN, negative (or zero, unless
        *allow_zero*), or infinite where a bound is required.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return _bad_seconds(name, value, allow_none, allow_zero)
    if value < 0 or (value == 0 and not allow_zero):
        return _bad_seconds(name, value, allow_none, allow_zero)
    if value >= NO_TIMEOUT:
        if not allow_none:
            return _bad_seconds(name, value, allow_none, allow_zero)
        return None
    return float(value)


def _bad_seconds(name: str, value: object, allow_none: bool, allow_zero: bool) -> float | None:
    kind = "a number of seconds >= 0" if allow_zero else "a positive number of seconds"
    also = " or None (float('inf') means None too)" if allow_none else " (finite)"
    raise ConfigurationError(f"{name} must be {kind}{also}, not {value!r}")


def call_timeout(timeout: object, label: str) -> float | None:
    """A call's ``timeout=``: seconds, or None for no timeout (as are ``inf`` and anything from
    :data:`NO_TIMEOUT` on).

    :raises TypeError: if *timeout* is not a number.
    :raises ValueError: if it is negative or NaN.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{label}: timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if not timeout >= 0:  # also NaN
        raise ValueError(f"{label}: timeout must be a number of seconds >= 0 or None, not {timeout!r}")
    return None if timeout >= NO_TIMEOUT else timeout


# -- asyncpg's pool and connection options ---------------------------------------------------------------


def _count(low: int) -> Callable[[str, object], None]:
    def check(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigurationError(f"{name} must be an integer >= {low}, not {value!r}")

    return check


def _optional_seconds(name: str, value: object) -> None:
    seconds(name, value, allow_none=True, allow_zero=False)


def _lifetime(name: str, value: object) -> None:
    seconds(name, value, allow_none=False, allow_zero=True)


def _connect_timeout(name: str, value: object) -> None:
    seconds(name, value, allow_none=False, allow_zero=False)


def _callable(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise ConfigurationError(f"{name} must be a function (or None), not {type(value).__name__}")


def _subclass_of(base: type) -> Callable[[str, object], None]:
    def check(name: str, value: object) -> None:
        if not (isinstance(value, type) and issubclass(value, base)):
            raise ConfigurationError(f"{name} must be a subclass of {base.__module__}.{base.__qualname__}")

    return check


def _server_settings(name: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(
        isinstance(key, str) and isinstance(item, str) for key, item in value.items()
    ):
        raise ConfigurationError(
            f"{name} must be a dict of str to str, such as {{'application_name': 'web'}}; numbers as strings"
        )


# asyncpg checks these only when the pool opens, or at the first connection: at the first call, on the
# bridge loop, with a bare ValueError or TypeError (max_queries=0: "max_queries is expected to be greater
# than zero").
_OPTION_CHECKS: dict[str, Callable[[str, object], None]] = {
    "max_queries": _count(1),
    "max_inactive_connection_lifetime": _lifetime,
    "command_timeout": _optional_seconds,
    "timeout": _connect_timeout,
    "statement_cache_size": _count(0),
    "max_cached_statement_lifetime": _lifetime,
    "max_cacheable_statement_size": _count(0),
    "server_settings": _server_settings,
    "init": _callable,
    "setup": _callable,
    "reset": _callable,
    "connect": _callable,
    "connection_class": _subclass_of(asyncpg.Connection),
    "record_class": _subclass_of(asyncpg.Record),
}


def check_pool_options(options: dict[str, Any], min_size: int, max_size: int) -> dict[str, Any]:
    """*options* for ``asyncpg.create_pool``, checked now (see ``_OPTION_CHECKS``); ``command_timeout``
    given as ``inf`` becomes None (no limit).

    :raises ConfigurationError: naming the option and what it takes.
    """
    for name, value in options.items():
        check = _OPTION_CHECKS.get(name)
        if check is not None:
            check(name, value)
    init_size = options.get("init_size")
    if init_size is not None:
        pool_size("init_size", init_size, low=min_size, high=max_size)
    if "command_timeout" in options:
        options = {**options, "command_timeout": seconds("command_timeout", options["command_timeout"])}
    return options


# -- parameters ---------------------------------------------------------------------------------------


def check_parameters(label: str, args: Sequence[Any]) -> None:
    """Refuse the values of one statement that PostgreSQL certainly cannot take in one message.

    Counted without encoding where that is enough to tell: ``len()`` of ``bytes``-like values and of
    ASCII strings (one byte a character); a string of other text takes 1 to 4 bytes a character, and only
    when those bounds cannot decide is it encoded to measure it, here in the caller's thread, never on
    the bridge loop. Other values (numbers, arrays, JSON) are left to asyncpg.

    :raises asyncpg.DataError: as asyncpg does for a value it cannot send, before anything is queued.
    """
    low = high = 0
    for index, value in enumerate(args, 1):
        least, most = _size_bounds(value)
        if least > MAX_MESSAGE_BYTES:
            raise _too_big(label, index, value, least)
        low += least
        high += most
    if high <= MAX_MESSAGE_BYTES:
        return
    total = low
    if low <= MAX_MESSAGE_BYTES:  # the bounds cannot tell: measure the text that may not fit
        total = 0
        for index, value in enumerate(args, 1):
            size = _exact_size(value)
            if size > MAX_MESSAGE_BYTES:
                raise _too_big(label, index, value, size)
            total += size
    if total > MAX_MESSAGE_BYTES:
        raise asyncpg.DataError(
            f"the query arguments of {label} take {total:,} bytes or more together: PostgreSQL takes at "
            f"most {MAX_MESSAGE_BYTES:,} bytes in one message. Nothing was sent; store large values in "
            "pieces, or stream them with COPY"
        )


def check_rows(label: str, rows: object) -> None:
    """:func:`check_parameters` for each row of an ``executemany`` given as a list or tuple (an iterator
    is left alone: reading it here would consume it)."""
    if isinstance(rows, (list, tuple)):
        for row in rows:
            if isinstance(row, (list, tuple)):
                check_parameters(label, row)


def _size_bounds(value: object) -> tuple[int, int]:
    if isinstance(value, str):
        return (len(value), len(value)) if value.isascii() else (len(value), 4 * len(value))
    if isinstance(value, (bytes, bytearray)):
        return len(value), len(value)
    if isinstance(value, memoryview):
        return value.nbytes, value.nbytes
    return 0, 0


def _exact_size(value: object) -> int:
    if isinstance(value, str) and not value.isascii():
        return len(value.encode("utf-8", "surrogatepass"))
    return _size_bounds(value)[0]


def _too_big(label: str, index: int, value: object, size: int) -> asyncpg.DataError:
    if isinstance(value, str):
        what = f"a str of {len(value):,} characters ({size:,} bytes or more in UTF-8)"
    else:
        what = f"{type(value).__name__} of {size:,} bytes"
    return asyncpg.DataError(
        f"invalid input for query argument ${index}: {what}: PostgreSQL takes at most "
        f"{MAX_MESSAGE_BYTES:,} bytes in one message. {label} was not sent; store large values in pieces, "
        "or stream them with COPY"
    )
