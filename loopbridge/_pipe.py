"""A pipe: a bounded janus queue between one task on the bridge loop and one caller, either way round.

Rows of a stream, chunks of a COPY and notifications travel through one. The bounded queue is the
backpressure: a producer on the bridge loop waits when the caller is slow, and a caller feeding a COPY
waits when the server is slow.

The two sides of a janus queue belong to different worlds. ``sync_q`` may be used from any thread, so a
sync caller reads and writes it directly, without a crossing per item. ``async_q`` belongs to the loop
that first used it, the bridge loop: an async caller on another loop must never touch it. It crosses to
the bridge loop instead (:meth:`Pipe.areceive`, :meth:`Pipe.asend`, through ``Bridge._arun`` like every
call), where the bridge side of the queue is used.

The pipe ends in one of two ways. The writer *finishes* it (:meth:`finish`, optionally with an error):
the reader still gets what is queued, then :data:`END` or the error. The reader *closes* it
(:meth:`close`): whatever is queued is dropped and the writer's next put raises :class:`PipeClosed`.
"""

from __future__ import annotations

import queue
from typing import TYPE_CHECKING, Final, Generic, TypeVar

import janus

from .errors import CallTimeoutError

if TYPE_CHECKING:
    from .bridge import Bridge

__all__ = ["END", "End", "Pipe", "PipeClosed"]

T = TypeVar("T")


class End:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


#: What the reader gets once the writer has finished and everything queued has been read.
END: Final = End()


class PipeClosed(Exception):
    """The other end closed the pipe: stop writing."""


class Pipe(Generic[T]):
    """A bounded queue of *maxsize* items (0: unbounded) from a writer to a reader, across the bridge.

    Create it on the bridge loop.
    """

    __slots__ = ("_ended", "_queue", "error", "label")

    def __init__(self, maxsize: int, label: str) -> None:
        self._queue: janus.Queue[T] = janus.Queue(maxsize)
        self._ended = False
        self.error: BaseException | None = None
        self.label = label

    @classmethod
    def finished(cls, label: str) -> Pipe[T]:
        """A pipe that is already over: a placeholder until the real one is made on the bridge loop."""
        pipe: Pipe[T] = cls(1, label)
        pipe.finish()
        return pipe

    @property
    def ended(self) -> bool:
        """True once finished or closed (items may still be queued for the reader)."""
        return self._ended

    def qsize(self) -> int:
        return self._queue.sync_q.qsize()

    # -- the writer's side --------------------------------------------------------------------------

    async def put(self, item: T) -> None:
        """On the bridge loop: queue *item*, waiting while the pipe is full.

        :raises PipeClosed: if the reader closed the pipe.
        """
        try:
            await self._queue.async_q.put(item)
        except janus.AsyncQueueShutDown:
            raise PipeClosed from None

    def put_nowait(self, item: T) -> None:
        """On the bridge loop: queue *item* now (the caller checked there is room, or the pipe is
        unbounded). A pipe already ended drops it."""
        try:
            self._queue.async_q.put_nowait(item)
        except janus.AsyncQueueShutDown:
            pass

    def send(self, bridge: Bridge, item: T, timeout: float | None, instead: str | None = None) -> None:
        """In a sync caller's thread: queue *item*, waiting while the pipe is full.

        :raises PipeClosed: if the reader (a task on the bridge loop) closed the pipe.
        :raises CallTimeoutError: if there was no room within *timeout* seconds.
        :raises DeadlockError: on *bridge*'s own thread, whose loop the reader needs; *instead* says
            what to do there.
        """
        bridge._refuse_blocking_call(f"{self.label}: sending", instead)
        try:
            self._queue.sync_q.put(item, timeout=timeout)
        except janus.SyncQueueShutDown:
            raise PipeClosed from None
        except queue.Full:
            raise CallTimeoutError(f"{self.label}: no room in the pipe within {timeout:g} s") from None

    async def asend(self, bridge: Bridge, item: T, timeout: float | None) -> None:
        """From async code on any loop: :meth:`send`, crossing to the bridge loop to put the item."""
        await bridge._arun(self.put, (item,), None, timeout, self.label)

    def finish(self, error: BaseException | None = None) -> None:
        """From any thread: no more items; the reader gets the queued ones, then END (or *error*)."""
        if not self._ended:
            self._ended = True
            self.error = error
            self._queue.shutdown()

    # -- the reader's side --------------------------------------------------------------------------

    async def get(self) -> T | End:
        """On the bridge loop: the next item, or END once finished and drained.

        :raises: the error the writer finished with.
        """
        try:
            return await self._queue.async_q.get()
        except janus.AsyncQueueShutDown:
            return self._end()

    def receive(self, bridge: Bridge, timeout: float | None, instead: str | None = None) -> T | End:
        """In a sync caller's thread: the next item, or END. Ctrl-C interrupts the wait.

        :raises CallTimeoutError: if nothing arrived within *timeout* seconds.
        :raises DeadlockError: on *bridge*'s own thread, whose loop the writer needs (even a wait with
            a timeout would stall every caller meanwhile); *instead* says what to do there.
        :raises: the error the writer finished with.
        """
        bridge._refuse_blocking_call(f"{self.label}: waiting for the next item", instead)
        try:
            return self._queue.sync_q.get(timeout=timeout)
        except janus.SyncQueueShutDown:
            return self._end()
        except queue.Empty:
            raise CallTimeoutError(f"{self.label}: nothing arrived within {timeout:g} s") from None

    async def areceive(self, bridge: Bridge, timeout: float | None) -> T | End:
        """From async code on any loop: :meth:`receive`, crossing to the bridge loop to get the item."""
        result: T | End = await bridge._arun(self.get, (), None, timeout, self.label)
        return result

    def close(self, error: BaseException | None = None) -> None:
        """From any thread: end the pipe now. Queued items are dropped, the writer's next put raises
        :class:`PipeClosed`, and a reader still reading gets *error* (or END)."""
        if not self._ended:
            self._ended = True
            self.error = error
            self._queue.shutdown(immediate=True)

    def _end(self) -> End:
        error = self.error
        if error is not None:
            raise error
        return END
