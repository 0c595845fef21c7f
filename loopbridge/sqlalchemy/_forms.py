"""Using an object in the wrong form (``with`` for ``async with``, ``await`` for either) raises a
``TypeError`` that names the right form, instead of Python's bare "does not support the asynchronous
context manager protocol" or "can't be used in 'await' expression"."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, NoReturn

__all__ = ["NotAContext"]


class NotAContext:
    """For what ``as`` binds (a session, a connection): it is not entered, and not awaited, itself.

    The class says, in :meth:`_right_form`, how to get and use it.
    """

    __slots__ = ()

    def _right_form(self) -> str:
        raise NotImplementedError

    def _wrong_form(self, used: str) -> NoReturn:
        raise TypeError(
            f"{used} on a {type(self).__name__}, which is not {_ROLE[used]}: {self._right_form()}"
        )

    def __enter__(self) -> NoReturn:
        self._wrong_form("'with'")

    def __exit__(self, *exc_info: object) -> None:  # pragma: no cover - __enter__ raised
        pass

    async def __aenter__(self) -> NoReturn:
        self._wrong_form("'async with'")

    async def __aexit__(self, *exc_info: object) -> None:  # pragma: no cover - __aenter__ raised
        pass

    def __await__(self) -> Generator[Any, None, NoReturn]:
        self._wrong_form("'await'")


_ROLE = {
    "'with'": "a context manager",
    "'async with'": "an asynchronous context manager",
    "'await'": "awaitable",
}
