"""LISTEN/NOTIFY: notifications from a dedicated connection on the bridge loop, for any caller.

::

    with db.listen("jobs", "alerts") as sub:             # sync: LISTEN is in effect in the block
        for item in sub:                                 # Notification or Gap
            ...
        item = sub.get(timeout=5)                        # or None after 5 s

    async with db.listen("jobs") as sub:                 # async, on any loop
        async for item in sub:
            ...

One pooled connection per subscription stays on the bridge loop, LISTENing (from the connection source's
``hold_apart()``: never inside a transaction, where LISTEN would wait for its COMMIT); asyncpg's callbacks
put each notification in a pipe (a janus queue, see ``loopbridge._pipe``) that the caller reads.

**Nothing is missed silently.** When the connection is lost (the server restarted, the backend was
terminated), or goes silent (a NAT, firewall or load balancer that dropped it: idle LISTEN connections
are exactly what their idle timeouts drop), the subscription reconnects in the background, LISTENs
again, and then puts a :class:`Gap` in the stream: notifications sent while it was away are gone, and
the Gap says so, at the point where they would have been. A silent connection is noticed by a
heartbeat: every ``heartbeat`` seconds a round trip on it, which the server must answer within the
source's ``round_trip_timeout``, else the connection is terminated and replaced. A consumer that falls
more than ``queue_size`` notifications behind gets a Gap too, where the ones it could not hold were
dropped. After a Gap, re-read from the database whatever you derive from notifications: everything
after the Gap is delivered (the Gap arrives once LISTEN is in effect again).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import asyncpg

from ._call import ToCompletion
from ._limits import call_timeout, seconds
from ._owner import Finalizer, Owner, OwnerWatch, guard
from ._pipe import End, Pipe
from ._session_state import note_change
from ._twins import NotAwaitable, twin_contexts
from ._within import within
from .errors import (
    BridgeClosedError,
    CallTimeoutError,
    ConfigurationError,
    DatabaseClosedError,
    SubscriptionClosedError,
)

if TYPE_CHECKING:
    from ._source import Held, Source
    from .bridge import Bridge

__all__ = ["DEFAULT_HEARTBEAT", "DEFAULT_QUEUE_SIZE", "Gap", "Notification", "Subscription"]

logger = logging.getLogger("loopbridge")

#: Notifications a subscription holds for a consumer that is behind, before it drops (and says so).
DEFAULT_QUEUE_SIZE = 10_000
#: Seconds between reconnection attempts: doubling from the first to the last.
RECONNECT_DELAYS = (0.05, 2.0)
#: Seconds between two round trips checking that a subscription's connection still answers.
DEFAULT_HEARTBEAT = 5.0
#: A reconnection attempt (a connection from the pool, maybe a new one, and its LISTENs) may take this
#: many round trips' worth of ``round_trip_timeout`` before it is given up and tried again.
RECONNECT_ROUND_TRIPS = 2


@dataclass(frozen=True)
class Notification:
    """One ``NOTIFY channel, 'payload'`` (or ``pg_notify(channel, payload)``) received."""

    channel: str
    payload: str
    pid: int
    """The server process that sent it."""


@dataclass(frozen=True)
class Gap:
    """A marker in a subscription's stream: notifications may be missing at this point.

    ``reason`` is ``"reconnected"`` (the connection was lost, and is LISTENing again as of this marker:
    what was sent in between was not received) or ``"overflow"`` (the consumer fell more than
    ``queue_size`` notifications behind, and the ones that did not fit were dropped). Re-read whatever
    you derive from notifications: nothing after the Gap is missed.
    """

    reason: Literal["reconnected", "overflow"]
    detail: str


Item = Notification | Gap

_INSTEAD = "await sub.aget() (or use 'async for item in sub')"
_HandleState = Literal["new", "open", "closed"]


class Subscription(NotAwaitable):
    """LISTEN on some channels; iterate it (``for``/``async for``) or :meth:`get` items from it.

    Items are :class:`Notification` and :class:`Gap` objects, in the order the server sent them. From
    :meth:`Database.listen`, in a ``with`` block (sync code) or an ``async with`` block (async code, on
    any loop): LISTEN is in effect once the block is entered. Used without a block, LISTEN begins at the
    first :meth:`get` / :meth:`aget` or iteration step. Close it (or leave its block) to UNLISTEN and
    return the connection; a subscription that is garbage collected, or whose owner goes away, is closed
    too.

    :raises DatabaseClosedError: from :meth:`get` or iteration, once the Database was closed (after the
        notifications already received).
    :raises BridgeClosedError: likewise, once the bridge was closed.
    """

    __slots__ = ("__weakref__", "_core", "_state")

    _right_form = "'async with db.listen(...) as sub:'"

    def __init__(
        self,
        source: Source,
        channels: tuple[str, ...],
        queue_size: int,
        heartbeat: float | None = DEFAULT_HEARTBEAT,
    ) -> None:
        if not channels:
            raise ConfigurationError("listen() needs at least one channel name: db.listen('events')")
        for channel in channels:
            if not isinstance(channel, str) or not channel:
                raise ConfigurationError(f"channel names are non-empty strings, not {channel!r}")
        if not isinstance(queue_size, int) or isinstance(queue_size, bool) or queue_size < 1:
            raise ConfigurationError(f"queue_size must be a positive integer, not {queue_size!r}")
        pulse = seconds("heartbeat", heartbeat)
        self._core = _Core(source, tuple(dict.fromkeys(channels)), queue_size, pulse)
        self._state: _HandleState = "new"

    @property
    def bridge(self) -> Bridge:
        return self._core.source.bridge

    @property
    def channels(self) -> tuple[str, ...]:
        return self._core.channels

    @property
    def listening(self) -> bool:
        """True while LISTEN is in effect (False before it starts, while reconnecting, once closed)."""
        return self._core.state == "listening"

    def __repr__(self) -> str:
        return f"<Subscription {', '.join(self._core.channels)} {self._core.state}>"

    # -- sync ---------------------------------------------------------------------------------------

    def open(self) -> Subscription:
        """LISTEN now, without a ``with`` block (close it with :meth:`close`); returns the subscription.
        Does nothing if it is already open."""
        return self.__enter__()

    def get(self, timeout: float | None = None) -> Notification | Gap | None:
        """The next item, waiting up to *timeout* seconds (None: as long as it takes); None if nothing
        came in time.

        :raises SubscriptionClosedError: if the subscription was closed.
        """
        if self._state == "new":
            self.__enter__()
        if self._state == "closed":
            raise SubscriptionClosedError(_closed_message(self))
        timeout = None if timeout is None else call_timeout(timeout, "Subscription.get()")
        try:
            item = self._core.pipe.receive(self.bridge, timeout, _INSTEAD)
        except CallTimeoutError:
            return None
        return self._item(item)

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> Notification | Gap:
        if self._state == "closed":
            raise StopIteration
        try:
            item = self.get()
        except SubscriptionClosedError:
            raise StopIteration from None
        assert item is not None
        return item

    def close(self) -> None:
        """UNLISTEN and return the connection. Blocks until done; safe to call twice."""
        self._state = "closed"
        if self._core.state != "new":
            # Run to completion: Ctrl-C stops this wait, not the closing (see ToCompletion).
            self.bridge._run(ToCompletion(self._core.aclose), (), None, None, "Subscription.close()")

    # -- async --------------------------------------------------------------------------------------

    async def aopen(self) -> Subscription:
        """:meth:`open` for async code, from any loop."""
        return await self.__aenter__()

    async def aget(self, timeout: float | None = None) -> Notification | Gap | None:
        """:meth:`get` for async code, from any loop."""
        if self._state == "new":
            await self.__aenter__()
        if self._state == "closed":
            raise SubscriptionClosedError(_closed_message(self))
        timeout = None if timeout is None else call_timeout(timeout, "Subscription.aget()")
        try:
            item = await self._core.pipe.areceive(self.bridge, timeout)
        except CallTimeoutError:
            return None
        return self._item(item)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Notification | Gap:
        if self._state == "closed":
            raise StopAsyncIteration
        try:
            item = await self.aget()
        except SubscriptionClosedError:
            raise StopAsyncIteration from None
        assert item is not None
        return item

    async def aclose(self) -> None:
        """:meth:`close` for async code, from any loop."""
        self._state = "closed"
        if self._core.state != "new":
            await self.bridge._arun(ToCompletion(self._core.aclose), (), None, None, "Subscription.aclose()")

    # -- both ---------------------------------------------------------------------------------------

    async def _begin(self, owner: Owner) -> Subscription:
        """LISTEN on a connection of its own (once; later calls return at once)."""
        if self._core.state == "new":
            await self._core.start(self, owner)
        self._state = "open" if self._core.state != "closed" else "closed"
        return self

    async def _end(self, error: BaseException | None) -> None:
        """UNLISTEN and return the connection."""
        self._state = "closed"
        await self._core.aclose()

    __enter__, __exit__, __aenter__, __aexit__ = twin_contexts(_begin, _end)

    def _item(self, item: Item | End) -> Notification | Gap:
        if isinstance(item, End):
            self._state = "closed"
            raise SubscriptionClosedError(_closed_message(self))
        return item


class _Core:
    """The bridge loop's side of a subscription: its connection, listeners, reconnection and pipe."""

    __slots__ = (
        "beating",
        "channels",
        "con",
        "finalizer",
        "heartbeat",
        "held",
        "overflowing",
        "pipe",
        "pulse",
        "queue_size",
        "reconnector",
        "source",
        "state",
        "watch",
    )

    def __init__(
        self, source: Source, channels: tuple[str, ...], queue_size: int, heartbeat: float | None
    ) -> None:
        self.source = source
        self.channels = channels
        self.queue_size = queue_size
        self.heartbeat = heartbeat
        self.pulse: asyncio.Task[None] | None = None  # the heartbeat of the connection LISTENing now
        self.beating = False  # the heartbeat's round trip is under way
        self.state: Literal["new", "listening", "reconnecting", "closed"] = "new"
        self.pipe: Pipe[Item] = Pipe.finished(self.label)  # until start(), on the bridge loop
        self.held: Held | None = None
        self.con: object = None  # held's connection, while LISTENing on it
        self.overflowing = False
        self.reconnector: asyncio.Task[None] | None = None
        self.watch: OwnerWatch | None = None
        self.finalizer: Finalizer | None = None

    def __repr__(self) -> str:
        return f"<Subscription {', '.join(self.channels)} {self.state} on {self.source!r}>"

    @property
    def label(self) -> str:
        return f"Subscription({', '.join(self.channels)})"

    async def start(self, handle: Subscription, owner: Owner) -> None:
        # Unbounded: the bound (queue_size, plus one slot for a Gap) is kept by _deliver, which may
        # not wait (asyncpg calls it from a callback).
        self.pipe = Pipe(0, self.label)
        await self._connect()  # the first connection's failure is the caller's to see
        self.state = "listening"
        self.source.keep(self)
        self.watch = OwnerWatch(self, owner)
        self.finalizer = guard(handle, self.source.bridge, self, "a subscription")

    async def _connect(self) -> None:
        held = await self.source.hold_apart()
        con = held.con
        note_change(con)  # LISTEN: reset (UNLISTEN *) when it goes back, whatever happens to our UNLISTEN
        bound = self.source.round_trip_timeout
        try:
            for channel in self.channels:
                try:
                    async with within(bound) as limit:
                        await con.add_listener(channel, self._on_notification)  # asyncpg quotes the name
                except (asyncio.TimeoutError, TimeoutError):
                    if not limit.expired():
                        raise
                    held.discard("LISTEN")
                    raise ConnectionError(f"the server did not answer LISTEN within {bound:g} s") from None
            con.add_termination_listener(self._on_lost)
            if held.gone():  # lost during the LISTENs: the termination listener came too late
                raise ConnectionError("the connection was lost while LISTENing")
        except BaseException:
            await held.release()
            raise
        self.held, self.con = held, con
        if self.heartbeat is not None:
            self.pulse = asyncio.get_running_loop().create_task(self._beat(held))

    async def _beat(self, held: Held) -> None:
        """Every ``heartbeat`` seconds, a round trip on the connection LISTENing: one the server does not
        answer within ``round_trip_timeout`` is silent (a NAT or load balancer dropped it, a partition),
        and would miss every notification without a word. Terminating it makes asyncpg report it lost,
        and the subscription reconnects, with a Gap, as for a killed backend."""
        assert self.heartbeat is not None
        bound = self.source.round_trip_timeout
        while True:
            await asyncio.sleep(self.heartbeat)
            if self.held is not held or self.state != "listening":
                return
            self.beating = True
            try:
                async with within(bound) as limit:
                    await held.con.execute("SELECT 1")
            except (asyncio.TimeoutError, TimeoutError):
                if not limit.expired():
                    raise
                held.discard("a subscription's heartbeat")  # asyncpg then calls _on_lost
                return
            except (asyncpg.InterfaceError, asyncpg.PostgresError, OSError) as exc:
                # Lost (its termination listener reconnects), or let go of meanwhile.
                logger.debug("%r: heartbeat failed: %r", self, exc)
                return
            finally:
                self.beating = False

    # -- callbacks from asyncpg, on the bridge loop

    def _on_notification(self, con: object, pid: int, channel: str, payload: object) -> None:
        self._deliver(Notification(channel, str(payload), pid))

    def _on_lost(self, con: object) -> None:
        if con is not self.con or self.state != "listening":
            return
        logger.warning("%r: connection lost; reconnecting (a Gap will mark what was missed)", self)
        self.state = "reconnecting"
        self.reconnector = asyncio.get_running_loop().create_task(self._reconnect())

    def _deliver(self, item: Item) -> None:
        if self.pipe.qsize() >= self.queue_size:
            if not self.overflowing:  # once per episode, in the slot kept for it
                self.overflowing = True
                self.pipe.put_nowait(
                    Gap(
                        "overflow",
                        f"more than {self.queue_size} notifications were waiting; later ones "
                        "were dropped until the consumer caught up",
                    )
                )
                logger.warning("%r: the consumer is %d notifications behind; dropping", self, self.queue_size)
            return
        self.overflowing = False
        self.pipe.put_nowait(item)

    async def _reconnect(self) -> None:
        await self._let_go()
        delay, longest = RECONNECT_DELAYS
        failures = 0
        attempt = RECONNECT_ROUND_TRIPS * self.source.round_trip_timeout
        while self._reconnecting():
            try:
                # Bounded: an attempt into a network that still drops everything would otherwise wait
                # for the pool_timeout (or asyncpg's connect timeout) after the network is back.
                async with within(attempt):
                    await self._connect()
            except (DatabaseClosedError, BridgeClosedError) as exc:
                await self.aclose(exc)
                return
            except Exception as exc:
                failures += 1
                log = logger.warning if failures == 1 else logger.debug
                log("%r: reconnecting failed (%s); retrying", self, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)
                continue
            if not self._reconnecting():  # closed meanwhile
                await self._let_go()
                return
            self.state = "listening"
            logger.info("%r: listening again after %d failed attempt(s)", self, failures)
            self._deliver(
                Gap(
                    "reconnected",
                    "the connection was lost and LISTEN re-established; notifications sent "
                    "in between were not received",
                )
            )
            return

    def _reconnecting(self) -> bool:
        return self.state == "reconnecting"

    # -- closing

    async def aclose(self, error: BaseException | None = None) -> None:
        """UNLISTEN, return the connection and end the pipe (the reader gets *error*, or the end)."""
        if self.state == "closed":
            return
        self.state = "closed"
        self.source.forget(self)
        if self.watch is not None:
            self.watch.cancel()
        if self.finalizer is not None:
            self.finalizer.detach()
        reconnector = self.reconnector
        if reconnector is not None and reconnector is not asyncio.current_task():
            reconnector.cancel()
            await asyncio.wait((reconnector,))
        await self._stop_beating()
        held = self.held
        if held is not None:
            con = held.con
            try:
                con.remove_termination_listener(self._on_lost)
                async with within(self.source.round_trip_timeout) as limit:
                    for channel in self.channels:
                        await con.remove_listener(channel, self._on_notification)  # UNLISTEN
            except (asyncio.TimeoutError, TimeoutError):
                if not limit.expired():
                    raise
                held.discard("UNLISTEN")
            except (asyncpg.InterfaceError, asyncpg.PostgresError, OSError) as exc:
                logger.debug("%r: UNLISTEN failed (%r); the pool discards the connection", self, exc)
        await self._let_go()
        if error is None:
            self.pipe.close()
        else:  # what arrived before is still delivered, then the error
            self.pipe.finish(error)

    async def _stop_beating(self) -> None:
        """Stop the heartbeat before anything else uses the connection: a round trip under way is let
        finish (it is bounded), rather than cancelled, which would leave a cancel request on its way."""
        pulse, self.pulse = self.pulse, None
        if pulse is None or pulse is asyncio.current_task():
            return
        if not self.beating:
            pulse.cancel()
        await asyncio.wait((pulse,))

    async def _let_go(self) -> None:
        await self._stop_beating()
        held, self.held, self.con = self.held, None, None
        if held is not None:
            try:
                await held.release()
            except Exception as exc:  # the pool is closing; asyncpg has discarded the connection
                logger.debug("%r: releasing its connection failed: %r", self, exc)

    async def _abandon_on_bridge(self, why: str) -> None:
        if self.state != "closed":
            logger.debug("%r: %s; closing it", self, why)
            await self.aclose()

    def _forget_after_fork(self) -> list[object]:
        # In a forked child: the parent's connection and tasks; see loopbridge._loop.abandon.
        return [self, *(obj for obj in (self.held, self.reconnector, self.pulse) if obj is not None)]

    async def _aclose_on_bridge(self, timeout: float) -> None:
        """The Database (or its bridge) is closing: end the subscription, telling a reader why."""
        if self.source.bridge.closed:
            error: BaseException = BridgeClosedError(
                f"{self!r} ended because its bridge was closed; notifications received before are delivered"
            )
        else:
            error = DatabaseClosedError(
                f"{self!r} ended because its Database was closed; notifications received before are delivered"
            )
        await self.aclose(error)


def _closed_message(sub: Subscription) -> str:
    return f"{sub!r} is closed: it no longer receives notifications. Open a new one with db.listen(...)"
