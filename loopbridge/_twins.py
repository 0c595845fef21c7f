"""Sync and async twins, derived from one async implementation.

Every public pair (``fetch`` / ``afetch``, ``run`` / ``arun``, ...) is written once, as a coroutine
function that runs on the bridge loop, and derived here::

    async def _fetch(self, query: str, *args: object, timeout: float | None = None) -> list[Record]:
        ...

    fetch, afetch = twins(_fetch)

The sync twin blocks its thread in ``Bridge._run``, the async twin awaits ``Bridge._arun``: the same
crossing, the same errors. The ``timeout`` keyword belongs to the crossing, not to the implementation:
the twin takes it out and hands it to the bridge, which cancels the work on the bridge loop when it
expires (so the implementation declares it only for the signature and never sees it).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["Bridged", "twins"]

P = ParamSpec("P")
R = TypeVar("R")


class Bridged(Protocol):
    """An object whose work runs on a bridge."""

    @property
    def bridge(self) -> Bridge: ...


S = TypeVar("S", bound=Bridged)

_SYNC_NOTE = (
    "\n\n(Blocking: runs on the bridge loop while the calling thread waits. On the bridge thread itself "
    "it raises DeadlockError; async code awaits ``{async_name}`` instead.)"
)
_ASYNC_NOTE = (
    "\n\n(Async: await it from any event loop; the work runs on the bridge loop. Cancelling the "
    "awaiting task cancels the work.)"
)


def twins(
    impl: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
    *,
    owners: tuple[str, str] | None = None,
) -> tuple[Callable[Concatenate[S, P], R], Callable[Concatenate[S, P], Coroutine[Any, Any, R]]]:
    """Derive the blocking method and the ``a``-prefixed async method from *impl*.

    :param owners: for a sync facade and an async facade of one thing (``loopbridge.sqlalchemy``'s two
        sessions): the names of the two classes that take the methods. Both methods then keep *impl*'s
        name, without the ``a``, as the SQLAlchemy classes those facades imitate do.
    """
    owner, _, impl_name = impl.__qualname__.rpartition(".")
    name = impl_name.lstrip("_")
    if owners is None:
        sync_owner, async_owner, async_name = owner, owner, f"a{name}"
    else:
        (sync_owner, async_owner), async_name = owners, name
    sync_label = f"{sync_owner}.{name}()"
    async_label = f"{async_owner}.{async_name}()"

    def sync(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        timeout: float | None = kwargs.pop("timeout", None)  # type: ignore[assignment]
        result: R = self.bridge._run(impl, (self, *args), kwargs, timeout, sync_label)
        return result

    async def async_(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        timeout: float | None = kwargs.pop("timeout", None)  # type: ignore[assignment]
        result: R = await self.bridge._arun(impl, (self, *args), kwargs, timeout, async_label)
        return result

    doc = (impl.__doc__ or "").rstrip()
    awaited = async_name if owners is None else f"{async_owner}.{async_name}"
    for twin, twin_owner, twin_name, note in (
        (sync, sync_owner, name, _SYNC_NOTE.format(async_name=awaited)),
        (async_, async_owner, async_name, _ASYNC_NOTE),
    ):
        twin.__name__ = twin_name
        twin.__qualname__ = f"{twin_owner}.{twin_name}"
        twin.__module__ = impl.__module__
        twin.__doc__ = doc + note
    return sync, async_
