"""``close()`` and ``aclose()`` of a resource that lives on a bridge loop, written once.

A :class:`~loopbridge.Database` (its pool) and a :class:`loopbridge.sqlalchemy.Engine` (its
``AsyncEngine``) are both created on the bridge loop at first use and closed there. Closing is the same
for both: refuse a blocking close on the bridge thread *before* anything changes, mark the resource
closed once, and cross to the bridge loop only if something may exist there to close. What is closed
is each resource's own business: its ``_aclose_on_bridge(timeout)``, which also serves the bridge's own
close and the close of a resource nobody refers to any more (see ``loopbridge._loop.Resources``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import BridgeClosedError, DeadlockError

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["CLOSE_MARGIN", "Closing"]

#: How much longer than its own timeout a close may take to cross to the bridge and back.
CLOSE_MARGIN = 5.0


class Closing:
    """``close(timeout)`` and ``aclose(timeout)`` for a resource on a bridge loop.

    The class provides ``bridge`` (its :class:`~loopbridge.Bridge`) and implements
    :meth:`_aclose_on_bridge`, and either :meth:`_mark_closed` or, for the default one, ``_closed`` (a
    bool, False until closed) and :meth:`_opened`.
    """

    _closed: bool

    @property
    def bridge(self) -> Bridge:
        raise NotImplementedError

    def _opened(self) -> bool:
        """True if the resource may hold something on the bridge loop (a pool, an engine, one being
        made) that a close must cross to the bridge to release."""
        raise NotImplementedError

    async def _aclose_on_bridge(self, timeout: float) -> None:
        """Close on the bridge loop: gracefully within *timeout* seconds, then forcibly."""
        raise NotImplementedError

    def close(self, timeout: float = 10.0) -> None:
        """Close on the bridge loop: work in flight may finish within *timeout* seconds, then it is
        ended. Later use raises a ``DatabaseClosedError`` (for an Engine, ``EngineClosedError``). Safe
        to call twice. The bridge keeps running (other resources may share it).

        :raises DeadlockError: if called on the bridge thread (await :meth:`aclose` there); the
            resource is then left as it was, open, so that a later close still closes it.
        """
        # Before marking it closed: a close that cannot run must not leave open what nobody closes.
        self._refuse_close_on_bridge_thread()
        if self._mark_closed():
            label = f"{type(self).__name__}.close()"
            try:
                self.bridge._run(self._aclose_on_bridge, (timeout,), None, timeout + CLOSE_MARGIN, label)
            except BridgeClosedError:  # the bridge closed meanwhile, and closed the resource with it
                pass

    async def aclose(self, timeout: float = 10.0) -> None:
        """:meth:`close` for async code, from any loop (the bridge loop included)."""
        if self._mark_closed():
            label = f"{type(self).__name__}.aclose()"
            try:
                await self.bridge._arun(
                    self._aclose_on_bridge, (timeout,), None, timeout + CLOSE_MARGIN, label
                )
            except BridgeClosedError:  # the bridge closed meanwhile, and closed the resource with it
                pass

    def _mark_closed(self) -> bool:
        """Mark closed; True if something may exist on a running bridge and must be closed there."""
        was_closed, self._closed = self._closed, True
        return not was_closed and self._opened() and self.bridge.running

    def _refuse_close_on_bridge_thread(self) -> None:
        kind = type(self).__name__
        try:
            self.bridge._refuse_blocking_call(f"{kind}.close()")
        except DeadlockError as exc:
            raise DeadlockError(
                f"{exc}. The {kind} is still open: on the bridge loop, await {kind.lower()}.aclose() instead"
            ) from None
