"""A TCP proxy in front of PostgreSQL that can break the network on demand, for tests of connection loss.

A :class:`FaultProxy` listens on a free loopback port and forwards each connection it accepts to the
target server. A test points its client at the proxy (:meth:`FaultProxy.dsn_for`) and then, at any
moment and from any thread, makes the network misbehave:

* :meth:`~FaultProxy.silence`: half-open. Every connection, open or new, stays open, and every byte in
  both directions is dropped: no RST, no FIN, no error, ever. This is what a client sees when a NAT or a
  stateful firewall between it and the server forgets the connection: its writes "succeed" and nothing
  comes back. A new connection (asyncpg's CancelRequest opens one) is accepted and then hears nothing.
  A silenced connection stays silenced after :meth:`~FaultProxy.heal`, as a forgotten NAT mapping does
  not come back: bytes were lost, so its stream is unusable anyway.
* :meth:`~FaultProxy.reset`: every open connection is closed with an RST on both sides (``SO_LINGER``
  0), as a middlebox that resets flows does. A one-off action: the mode stays what it was.
* :meth:`~FaultProxy.stall`: nothing is forwarded, nothing is lost. Data waits (one chunk in the proxy,
  the rest in the kernel's socket buffers, so memory stays bounded) and flows again at ``heal()``; an
  EOF or a close that arrived in between is passed on after the data. New connections stall too.
* :meth:`~FaultProxy.refuse`: new connections are *accepted and reset at once* (RST), so the client's
  connect succeeds and its first read fails with ``ECONNRESET``. The listening socket stays open
  rather than being closed for an ``ECONNREFUSED``: closing it would give the port back, and another
  process could take it before ``heal()`` binds it again. Open connections keep working.
* :meth:`~FaultProxy.heal`: new connections are forwarded again, and stalled ones resume.
* :meth:`~FaultProxy.forget_silenced`: the server's side of every silenced connection is reset, as the
  server's own TCP keepalive would end it on a real partition (which the proxy, acknowledging
  everything, keeps from happening); the client's side goes on hearing nothing.

What it cannot imitate: the proxy is a userspace program, so the kernel under it acknowledges every
segment the client sends. TCP keepalive probes and ``TCP_USER_TIMEOUT`` therefore never fail through a
silenced proxy; only application-level timeouts notice the silence. (A true black hole needs packet
filtering, which needs privileges the tests do not assume.)

Why asyncio in a thread of its own rather than a thread per socket: every mode change has to apply to
all connections at once, between two chunks of data, and a reset has to close sockets that another
thread may be blocked reading. On one event loop all of that is ordinary code run between callbacks, with
no locks, and a stalled connection is ``pause_reading()`` rather than a blocked thread. The loop is a
plain ``SelectorEventLoop`` whatever the event loop policy (a test may install uvloop's), because the
resets need the real socket for ``SO_LINGER``. Control calls (``silence()``, ``stop()``, ...) hop onto
that loop and return once the change is in effect, each bounded by :data:`CONTROL_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

T = TypeVar("T")

#: Seconds a control call (start, stop, a mode change) may take before it raises TimeoutError.
CONTROL_TIMEOUT = 10.0

_DSN_SCHEMES = ("postgres", "postgresql", "postgresql+asyncpg")


class Mode(str, enum.Enum):
    """What the proxy does with connections it accepts from now on."""

    PASS = "pass"
    SILENCE = "silence"
    STALL = "stall"
    REFUSE = "refuse"


class _Flow(enum.Enum):
    """What one connection does with the bytes it reads."""

    FORWARD = "forward"
    HELD = "held"  # stalled: kept, passed on at heal()
    DROPPED = "dropped"  # silenced: discarded, for good


def _rst(side: _Side) -> None:
    """Close *side*'s socket with an RST rather than a FIN (even one already closing with a FIN)."""
    transport = side.transport
    if transport is None or side.lost:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            # Linger on, timeout 0: close() discards unsent data and sends RST.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already closed by the kernel's side of things: nothing left to reset
    transport.abort()


class _Side(asyncio.Protocol):
    """One socket of a proxied connection: the one the client opened, or the one the proxy dialled."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.gone: asyncio.Future[None]  # done at connection_lost; made at connection_made
        self.lost = False
        self.eof = False  # the peer sent FIN
        self._reading_blocked_by: set[str] = set()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.gone = asyncio.get_running_loop().create_future()
        self.link.proxy._open_sides.add(self)
        if self._reading_blocked_by:
            transport.pause_reading()
        self.link.made(self)

    def data_received(self, data: bytes) -> None:
        self.link.received(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        return self.link.eof_from(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.gone.set_result(None)
        self.link.proxy._open_sides.discard(self)
        self.link.lost_from(self, exc)

    # The far side's write buffer is full: stop reading here until it drains.
    def pause_writing(self) -> None:
        self.link.other(self).block_reading("backpressure")

    def resume_writing(self) -> None:
        self.link.other(self).unblock_reading("backpressure")

    # -- used by the link

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.lost and not self.transport.is_closing()

    def block_reading(self, reason: str) -> None:
        # Reading can be held for two reasons at once (a stall, a full write buffer on the far side);
        # it resumes only when neither holds. Without a transport yet, connection_made applies it.
        self._reading_blocked_by.add(reason)
        if self.open:
            assert self.transport is not None
            self.transport.pause_reading()

    def unblock_reading(self, reason: str) -> None:
        self._reading_blocked_by.discard(reason)
        if self.open and not self._reading_blocked_by:
            assert self.transport is not None
            self.transport.resume_reading()

    def close(self) -> None:
        """FIN, once what is buffered for this side has been written."""
        if self.open:
            assert self.transport is not None
            self.transport.close()


class _Link:
    """One proxied connection: the client's socket, the server's socket, and what flows between them."""

    def __init__(self, proxy: FaultProxy, flow: _Flow) -> None:
        self.proxy = proxy
        self.flow = flow
        self.client = _Side(self)
        self.server = _Side(self)
        # What each side sent while the far side could not take it (not yet dialled, or stalled).
        self.held: dict[_Side, list[bytes]] = {self.client: [], self.server: []}
        # Sides whose socket closed (cleanly, or with an error) while the link was stalled.
        self.closed_while_held: dict[_Side, Exception | None] = {}
        self.dialling = False
        # Being torn down (reset, refused, stopped, or its client gone before the server answered):
        # a socket that connects from now on is reset at once.
        self.finished = False
        if flow is _Flow.HELD:
            for side in (self.client, self.server):
                side.block_reading("stall")

    def other(self, side: _Side) -> _Side:
        return self.server if side is self.client else self.client

    def made(self, side: _Side) -> None:
        if self.finished:
            _rst(side)
            return
        if side is self.server:
            self.dialling = False
            if self.flow is _Flow.FORWARD:
                self._flush()

    def received(self, src: _Side, data: bytes) -> None:
        if self.flow is _Flow.DROPPED:
            return
        dst = self.other(src)
        if self.flow is _Flow.HELD or not dst.open:
            self.held[src].append(data)
            if self.flow is _Flow.HELD:
                src.block_reading("stall")  # the rest waits in the kernel's buffers
            return
        assert dst.transport is not None
        dst.transport.write(data)

    def eof_from(self, src: _Side) -> bool:
        """The peer of *src* sent FIN. Returns whether asyncio should keep *src* open (for writing)."""
        if self.flow is _Flow.DROPPED:
            return True  # swallowed: the far end must not hear of it, and this end stays open
        if self.flow is _Flow.HELD:
            return True  # passed on at heal(), after the data held before it
        # PostgreSQL does not half-close: an EOF means the peer is done, so both ends are closed.
        self._close_far_side(src, None)
        return False

    def lost_from(self, src: _Side, exc: Exception | None) -> None:
        dst = self.other(src)
        if not self.finished:
            if self.flow is _Flow.FORWARD:
                self._close_far_side(src, exc)
            elif self.flow is _Flow.HELD:
                self.closed_while_held[src] = exc
            # DROPPED: the far end never hears of it.
        if dst.lost or (dst.transport is None and not self.dialling):
            self._finish()

    def _close_far_side(self, src: _Side, exc: Exception | None) -> None:
        dst = self.other(src)
        if dst.transport is None:
            # The client went away while the server was being dialled: reset that as it connects.
            self.finished = True
        elif isinstance(exc, ConnectionResetError):
            _rst(dst)  # a reset is passed on as a reset
        else:
            dst.close()

    def _flush(self) -> None:
        """Pass on what was held, then any EOF or close that came in after it."""
        for src in (self.client, self.server):
            dst = self.other(src)
            if dst.open and self.held[src]:
                assert dst.transport is not None
                dst.transport.write(b"".join(self.held[src]))
                self.held[src].clear()
        closed, self.closed_while_held = self.closed_while_held, {}
        for src, exc in closed.items():
            self._close_far_side(src, exc)
        for side in (self.client, self.server):
            if side.eof and side.open:
                self._close_far_side(side, None)
                side.close()

    def set_flow(self, flow: _Flow) -> None:
        if self.flow is _Flow.DROPPED or self.finished:
            return  # silence is for good
        self.flow = flow
        if flow is _Flow.DROPPED:
            self.closed_while_held.clear()
            for side in (self.client, self.server):
                self.held[side].clear()
                side.unblock_reading("stall")  # read on, and discard
        elif flow is _Flow.HELD:
            for side in (self.client, self.server):
                side.block_reading("stall")
        else:
            self._flush()
            for side in (self.client, self.server):
                side.unblock_reading("stall")

    def reset(self) -> None:
        self.finished = True
        _rst(self.client)
        _rst(self.server)
        self._finish()

    def _finish(self) -> None:
        self.finished = True
        self.proxy._links.discard(self)


class FaultProxy:
    """A TCP proxy on a free loopback port, in front of *target_host*:*target_port*.

    Usable from synchronous code on any thread: it runs its own event loop in a thread of its own. Use it
    as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = listen_host
        self._port: int | None = None
        self._mode = Mode.PASS
        self._links: set[_Link] = set()
        self._open_sides: set[_Side] = set()  # every socket with a transport not yet lost, refused ones too
        self._dials: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._opened = 0
        self._refused = 0

    @classmethod
    def in_front_of(cls, dsn: str) -> FaultProxy:
        """A proxy (not yet started) for the server a URL *dsn* names; TCP only, one host."""
        host, port = _target(dsn)
        return cls(host, port)

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._port is not None else "not started"
        return f"<FaultProxy {where} -> {self.target_host}:{self.target_port} {self._mode.value}>"

    # -- life cycle

    def start(self) -> FaultProxy:
        """Listen on a free port (see :attr:`port`) and start forwarding. Returns the proxy."""
        if self._thread is not None:
            raise RuntimeError(f"{self!r} was already started")
        # The proxy's own loop, never the policy's: see the module docstring.
        loop = asyncio.SelectorEventLoop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=f"faultproxy-{id(self):x}", daemon=True)
        self._thread.start()
        try:
            self._server = self._run(self._listen)
        except BaseException:
            self.stop()
            raise
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def _listen(self) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(self._accept, self.host, 0, reuse_address=True)

    def stop(self) -> None:
        """Close the listening socket and every connection (with an RST), and end the proxy's thread.
        Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if thread.is_alive() and not loop.is_closed():
                self._run(self._shutdown)
        finally:
            if not loop.is_closed():
                loop.call_soon_threadsafe(loop.stop)
            thread.join(CONTROL_TIMEOUT)
            if thread.is_alive():
                raise TimeoutError(f"{self!r}: its thread did not end within {CONTROL_TIMEOUT} s")
            loop.close()
            self._loop = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        dials = list(self._dials)
        for task in dials:
            task.cancel()
        await asyncio.gather(*dials, return_exceptions=True)
        for link in list(self._links):
            link.reset()
        for side in list(self._open_sides):
            _rst(side)
        await self._sockets_closed()
        if self._server is not None:
            await self._server.wait_closed()

    async def _sockets_closed(self) -> None:
        # An aborted transport closes its socket (which sends the RST) in a callback of its own: wait
        # for those callbacks, so that a reset is on the wire when reset() returns, and no transport is
        # left for the garbage collector to complain about when stop() closes the loop.
        closing = [side.gone for side in self._open_sides if side.transport and side.transport.is_closing()]
        if closing:
            await asyncio.wait(closing, timeout=CONTROL_TIMEOUT / 2)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- where it is

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the proxy has no port until start()")
        return self._port

    def dsn_for(self, dsn: str) -> str:
        """*dsn* (a ``postgresql://`` URL) with its host and port replaced by the proxy's.

        A ``host`` or ``port`` query parameter is removed (it would override the URL's). Everything else,
        user, password, database and the other parameters, is kept as written.
        """
        parts = urlsplit(dsn)
        if parts.scheme.lower() not in _DSN_SCHEMES:
            raise ValueError("dsn_for() rewrites postgresql:// URLs only")
        userinfo, at, _ = parts.netloc.rpartition("@")
        host = f"[{self.host}]" if ":" in self.host else self.host
        netloc = f"{userinfo}{at}{host}:{self.port}"
        kept = [item for item in parts.query.split("&") if item and _query_key(item) not in ("host", "port")]
        return urlunsplit((parts.scheme, netloc, parts.path, "&".join(kept), parts.fragment))

    # -- what it does

    @property
    def mode(self) -> Mode:
        return self._mode

    def silence(self) -> None:
        """Half-open from now on: every open connection and every new one drops all bytes, both ways,
        and nothing is ever closed (the server's side of a silenced connection stays open too, its backend
        waiting, until :meth:`reset` or :meth:`stop`). Silenced connections stay silent after
        :meth:`heal`."""
        self._set_mode(Mode.SILENCE, _Flow.DROPPED)

    def stall(self) -> None:
        """Forward nothing, lose nothing, until :meth:`heal`: open and new connections alike."""
        self._set_mode(Mode.STALL, _Flow.HELD)

    def refuse(self) -> None:
        """New connections are accepted and reset at once; open ones are left as they are."""
        self._set_mode(Mode.REFUSE, None)

    def heal(self) -> None:
        """Forward new connections again and let stalled ones resume (silenced ones stay silent)."""
        self._set_mode(Mode.PASS, _Flow.FORWARD)

    def forget_silenced(self) -> None:
        """Reset the server's side of every silenced connection, and only that: the server ends those
        sessions (rolling back what they were in), while their clients still hear nothing. What the
        server's keepalive does on a real partition, which the proxy's kernel, answering its probes,
        keeps from happening here."""

        async def forget() -> None:
            for link in list(self._links):
                if link.flow is _Flow.DROPPED:
                    _rst(link.server)
            await self._sockets_closed()

        self._run(forget)

    def reset(self) -> None:
        """Close every open connection with an RST, client side and server side. The mode is unchanged."""

        async def reset_all() -> None:
            for link in list(self._links):
                link.reset()
            await self._sockets_closed()

        self._run(reset_all)

    def _set_mode(self, mode: Mode, flow: _Flow | None) -> None:
        async def apply() -> None:
            self._mode = mode
            if flow is not None:
                for link in list(self._links):
                    link.set_flow(flow)

        self._run(apply)

    # -- counts

    @property
    def opened(self) -> int:
        """Connections accepted and not refused, since start."""
        return self._opened

    @property
    def refused(self) -> int:
        """Connections accepted and reset at once in ``refuse`` mode, since start."""
        return self._refused

    @property
    def active(self) -> int:
        """Connections with either of their two sockets still open."""
        return len(self._links)

    # -- the loop's side

    def _accept(self) -> _Side:
        flow = {Mode.SILENCE: _Flow.DROPPED, Mode.STALL: _Flow.HELD}.get(self._mode, _Flow.FORWARD)
        link = _Link(self, flow)
        if self._mode is Mode.REFUSE:
            self._refused += 1
            link.finished = True  # made() resets it
            return link.client
        self._opened += 1
        self._links.add(link)
        if flow is not _Flow.DROPPED:
            # A silenced connection is never dialled: nothing would ever reach the server anyway.
            link.dialling = True
            assert self._loop is not None
            task = self._loop.create_task(self._dial(link))
            self._dials.add(task)
            task.add_done_callback(self._dials.discard)
        return link.client

    async def _dial(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: link.server, self.target_host, self.target_port)
        except OSError:
            # The server cannot be reached: the client, already connected to the proxy, gets a reset.
            link.dialling = False
            link.reset()

    def _run(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``fn()`` on the proxy's loop and wait (bounded) for its result."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            raise RuntimeError(f"{self!r} is not running")
        if threading.get_ident() == thread.ident:
            raise RuntimeError("FaultProxy's control methods are for other threads, not its own loop")
        future = asyncio.run_coroutine_threadsafe(fn(), loop)
        try:
            return future.result(CONTROL_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"{self!r} did not respond within {CONTROL_TIMEOUT} s") from None


def _query_key(item: str) -> str:
    return unquote(item.partition("=")[0]).lower()


def _target(dsn: str) -> tuple[str, int]:
    parts = urlsplit(dsn)
    if parts.scheme.lower() not in _DSN_SCHEMES:
        raise ValueError("a FaultProxy target is read from postgresql:// URLs only")
    hostlist = parts.netloc.rpartition("@")[2]
    if "," in hostlist or any(_query_key(item) in ("host", "port") for item in parts.query.split("&")):
        raise ValueError("a FaultProxy forwards to one TCP host: the DSN must name it in its netloc")
    if not parts.hostname:
        raise ValueError("a FaultProxy forwards TCP: the DSN names no host (a unix socket?)")
    return parts.hostname, parts.port or 5432
