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

Objects used in a ``with`` block *and* an ``async with`` block (a transaction, a row stream, a
subscription) get their four methods the same way, from an enter and an exit coroutine that run on the
bridge loop::

    __enter__, __exit__, __aenter__, __aexit__ = twin_contexts(_begin, _end)
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import weakref
from asyncio import _get_running_loop
from collections.abc import Callable, Coroutine, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, NoReturn, ParamSpec, Protocol, TypeVar

from ._blocking import call_on_running_loop
from ._call import ToCompletion
from ._owner import Owner
from .errors import BridgeClosedError

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["ArgumentCheck", "Bridged", "NotAwaitable", "OpenClose", "checked", "twin_contexts", "twins"]

P = ParamSpec("P")
R = TypeVar("R")


class Bridged(Protocol):
    """An object whose work runs on a bridge."""

    @property
    def bridge(self) -> Bridge: ...


S = TypeVar("S", bound=Bridged)

#: How the documentation and the messages call an instance of each class.
_SHORT_NAMES = {"Database": "db", "Transaction": "tx", "Engine": "engine", "Reader": "db.read"}

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
    owner: str | None = None,
    owners: tuple[str, str] | None = None,
) -> tuple[Callable[Concatenate[S, P], R], Callable[Concatenate[S, P], Coroutine[Any, Any, R]]]:
    """Derive the blocking method and the ``a``-prefixed async method from *impl*.

    Both keep *impl*'s signature and docstring (``inspect.signature``, ``help()`` and documentation
    generators see the implementation's parameters), with a note on how each one waits.

    :param owner: the class that takes the methods, when *impl* is written once for several
        (``loopbridge._queries``); default: the class *impl* is defined in.
    :param owners: for a sync facade and an async facade of one thing (``loopbridge.sqlalchemy``'s two
        sessions): the names of the two classes that take the methods. Both methods then keep *impl*'s
        name, without the ``a``, as the SQLAlchemy classes those facades imitate do.
    """
    outer, _, impl_name = impl.__qualname__.rpartition(".")
    defined_in = outer.rpartition(".")[2]  # the class's own name, also for a class defined in a function
    name = impl_name.lstrip("_")
    if owners is None:
        sync_owner = async_owner = owner or defined_in
        async_name = f"a{name}"
    else:
        (sync_owner, async_owner), async_name = owners, name
    sync_label = f"{sync_owner}.{name}()"
    async_label = f"{async_owner}.{async_name}()"
    short = _SHORT_NAMES.get(async_owner, async_owner.lower())
    async_hint = f"await {short}.{async_name}(...)"
    check: ArgumentCheck | None = getattr(impl, _CHECK, None)

    def sync(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        timeout: float | None = kwargs.pop("timeout", None)  # type: ignore[assignment]
        if check is not None:
            check(sync_label, args, kwargs)
        bridge = self.bridge
        if _get_running_loop() is None:  # a plain sync caller: nothing more to check
            result: R = bridge._run(impl, (self, *args), kwargs, timeout, sync_label)
            return result
        outcome: R = call_on_running_loop(
            bridge.warn_blocking,
            sys._getframe(1),
            sync_label,
            async_hint,
            lambda: bridge._run(impl, (self, *args), kwargs, timeout, sync_label),
        )
        return outcome

    async def async_(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        timeout: float | None = kwargs.pop("timeout", None)  # type: ignore[assignment]
        if check is not None:
            check(async_label, args, kwargs)
        result: R = await self.bridge._arun(impl, (self, *args), kwargs, timeout, async_label)
        return result

    doc = (impl.__doc__ or "").rstrip()
    awaited = async_name if owners is None else f"{async_owner}.{async_name}"
    signature = inspect.signature(impl)
    for twin, twin_owner, twin_name, note in (
        (sync, sync_owner, name, _SYNC_NOTE.format(async_name=awaited)),
        (async_, async_owner, async_name, _ASYNC_NOTE),
    ):
        twin.__name__ = twin_name
        twin.__qualname__ = f"{twin_owner}.{twin_name}"
        twin.__module__ = impl.__module__
        twin.__doc__ = doc + note
        twin.__dict__.update(__wrapped__=impl, __signature__=signature)
    return sync, async_


#: ``check(label, args, kwargs)``: refuses a call's arguments in the caller's thread (see :func:`checked`).
ArgumentCheck = Callable[[str, tuple[Any, ...], dict[str, Any]], None]
_CHECK = "_loopbridge_check"

F = TypeVar("F", bound=Callable[..., Any])


def checked(check: ArgumentCheck) -> Callable[[F], F]:
    """Mark an implementation so that both of its twins run ``check(label, args, kwargs)`` in the
    caller's thread before crossing: what it refuses never reaches the bridge loop (the bridge loop
    must not spend seconds on arguments only to fail)."""

    def mark(impl: F) -> F:
        setattr(impl, _CHECK, check)
        return impl

    return mark


E = TypeVar("E")
ExcInfo = tuple[type[BaseException] | None, BaseException | None, TracebackType | None]


def twin_contexts(
    enter: Callable[[S, Owner], Coroutine[Any, Any, E]],
    exit: Callable[[S, BaseException | None], Coroutine[Any, Any, None]],
) -> tuple[
    Callable[[S], E],
    Callable[[S, type[BaseException] | None, BaseException | None, TracebackType | None], None],
    Callable[[S], Coroutine[Any, Any, E]],
    Callable[
        [S, type[BaseException] | None, BaseException | None, TracebackType | None], Coroutine[Any, Any, None]
    ],
]:
    """Derive ``__enter__``, ``__exit__``, ``__aenter__`` and ``__aexit__`` from two coroutine functions
    that run on the bridge loop.

    ``enter(self, owner)`` opens what the block uses and returns what ``as`` binds; *owner* is the
    calling thread (``with``) or the calling event loop (``async with``). ``exit(self, error)`` ends it;
    *error* is what the block raised, or None. The block's exception is never suppressed.

    Two promises, so that nothing stays held:

    * exit runs to completion on the bridge loop: Ctrl-C or a cancelled task stop the caller's wait for
      it, never the exit itself, even when the interruption comes before the exit has taken its first
      step there (its call is a :class:`~loopbridge._call.ToCompletion`; on the bridge loop itself it
      runs as a task of its own, shielded);
    * if entering fails on the caller's side after the bridge side succeeded (the caller was interrupted
      at just that moment), exit runs anyway, without the caller waiting. So *exit* must accept being
      called for something that never opened, or that already ended.

    Enter and exit of one object never overlap on the bridge loop: an exit waits for an enter still
    unwinding there (the caller was cancelled, and stopped waiting for it after a grace period), so it
    ends what that enter opened instead of finding nothing to end.
    """
    outer, _, enter_name = enter.__qualname__.rpartition(".")
    owner_name = outer.rpartition(".")[2]
    enter_label = f"{owner_name}.{enter_name.lstrip('_')}()"
    exit_label = f"{owner_name}.{exit.__qualname__.rpartition('.')[2].lstrip('_')}()"

    async def serialized_enter(self: S, owner: Owner) -> E:
        async with _turn(self):
            return await enter(self, owner)

    async def serialized_exit(self: S, error: BaseException | None) -> None:
        async with _turn(self):
            await exit(self, error)

    async def shielded_exit(self: S, error: BaseException | None) -> None:
        # A task of its own: cancelling the call (the bridge closing) or, on the bridge loop itself, the
        # awaiting task does not stop it half way.
        task = asyncio.get_running_loop().create_task(serialized_exit(self, error))
        task.add_done_callback(_retrieve)
        await asyncio.shield(task)

    exit_to_completion = ToCompletion(shielded_exit)

    def enter_failed(self: S, error: BaseException) -> None:
        try:
            self.bridge.submit(exit_to_completion, self, error)
        except BridgeClosedError:  # closing the bridge releases everything
            pass

    def __enter__(self: S) -> E:
        try:
            result: E = self.bridge._run(
                serialized_enter, (self, Owner.this_thread()), None, None, enter_label
            )
        except BaseException as exc:
            enter_failed(self, exc)
            raise
        return result

    def __exit__(
        self: S, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.bridge._run(exit_to_completion, (self, exc), None, None, exit_label)

    async def __aenter__(self: S) -> E:
        try:
            result: E = await self.bridge._arun(
                serialized_enter, (self, Owner.this_loop()), None, None, enter_label
            )
        except BaseException as exc:
            enter_failed(self, exc)
            raise
        return result

    async def __aexit__(
        self: S, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.bridge._arun(exit_to_completion, (self, exc), None, None, exit_label)

    return __enter__, __exit__, __aenter__, __aexit__


# One lock per object entered through twin_contexts, created and used on its bridge loop only.
_turns: weakref.WeakKeyDictionary[object, asyncio.Lock] = weakref.WeakKeyDictionary()


def _turn(obj: object) -> asyncio.Lock:
    lock = _turns.get(obj)
    if lock is None:
        lock = _turns[obj] = asyncio.Lock()
    return lock


def _retrieve(task: asyncio.Task[Any]) -> None:
    # The caller who stopped waiting cannot see the error; this keeps asyncio from logging it as
    # "never retrieved" (exit implementations log what matters themselves).
    if not task.cancelled():
        task.exception()


class _Openable(Protocol):
    def open(self) -> None: ...
    def aopen(self) -> Coroutine[Any, Any, None]: ...
    def close(self) -> None: ...
    def aclose(self) -> Coroutine[Any, Any, None]: ...


Op = TypeVar("Op", bound=_Openable)


class OpenClose:
    """``with obj:`` and ``async with obj:`` for what has ``open``/``aopen`` and ``close``/``aclose``:
    opened on entry, closed on exit, whatever the block raised (which is not suppressed)."""

    __slots__ = ()

    def __enter__(self: Op) -> Op:
        self.open()
        return self

    def __exit__(self: Op, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self: Op) -> Op:
        await self.aopen()
        return self

    async def __aexit__(self: Op, *exc_info: object) -> None:
        await self.aclose()


class NotAwaitable:
    """For an object used in a block or a loop: ``await`` on it raises a TypeError naming the right form
    (rather than Python's "object X can't be used in 'await' expression")."""

    __slots__ = ()

    #: How to use it instead, e.g. ``'async with db.transaction() as tx:'``.
    _right_form = ""

    def __await__(self) -> Generator[Any, None, NoReturn]:
        raise TypeError(
            f"{type(self).__name__} objects are not awaitable: use {self._right_form} (it also works with "
            "'with' / 'for' in sync code)"
        )
