"""The fault-injecting proxy (tests/faultproxy.py) itself, in front of the real test server.

Plain asyncpg connections go through the proxy; what the server really has is checked over a direct
connection (``independent``). Every wait is bounded: ``run_loop`` bounds each test's coroutine, and every
await that a fault may leave unanswered has a ``wait_for`` of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import asyncpg
import pytest

from tests.boundary import wait_until
from tests.faultproxy import FaultProxy, Mode
from tests.support import independent, run_loop

#: How long a query that a fault leaves unanswered is given to prove that it stays unanswered.
UNANSWERED = 1.0


@pytest.fixture
def target_dsn(request: pytest.FixtureRequest, admin_dsn: str) -> str:
    """The test server's DSN, or the private cluster's where the test server is not on TCP (the embedded
    server listens on a unix socket, which the proxy cannot forward)."""
    try:
        FaultProxy.in_front_of(admin_dsn)
    except ValueError:
        cluster = request.getfixturevalue("cluster")
        dsn: str = cluster.dsn()
        return dsn
    return admin_dsn


@pytest.fixture
def proxy(target_dsn: str) -> Iterator[FaultProxy]:
    with FaultProxy.in_front_of(target_dsn) as started:
        yield started


@pytest.fixture
def through(proxy: FaultProxy, target_dsn: str) -> str:
    """The DSN that reaches the server through the proxy."""
    return proxy.dsn_for(target_dsn)


@contextlib.asynccontextmanager
async def connected(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection, terminated afterwards whatever happened: ``terminate()`` never waits, where
    a graceful close through a faulty proxy could wait for ever (and a failed test must not leak it)."""
    con = await asyncpg.connect(dsn, timeout=10)
    try:
        yield con
    finally:
        con.terminate()


async def eventually(predicate: Callable[[], object], what: str, timeout: float = 10) -> None:
    """``wait_until`` for a coroutine: polls without blocking its loop (asyncpg must run to notice)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout} s")
        await asyncio.sleep(0.02)


def backend_exists(target_dsn: str, pid: int) -> bool:
    return bool(independent(target_dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = $1", pid))


# A CancelRequest (what asyncpg sends over a connection of its own to cancel a query), for a backend
# that does not exist: harmless if it ever reached the server.
CANCEL_REQUEST = struct.pack("!llll", 16, 80877102, 0, 0)


class TestDsnFor:
    def test_host_and_port_are_replaced_and_everything_else_is_kept(self) -> None:
        with FaultProxy("db.internal", 6432) as proxy:
            rewritten = proxy.dsn_for(
                "postgresql://app:p%40ss%2Fw@db.internal:6432/shop?application_name=a%20b&sslmode=disable"
            )
            assert rewritten == (
                f"postgresql://app:p%40ss%2Fw@127.0.0.1:{proxy.port}/shop?application_name=a%20b&sslmode=disable"
            )

    def test_host_and_port_parameters_are_dropped(self) -> None:
        with FaultProxy("127.0.0.1", 5432) as proxy:
            rewritten = proxy.dsn_for("postgres://u@/db?host=/var/run/postgresql&port=5433&search_path=s")
            assert rewritten == f"postgres://u@127.0.0.1:{proxy.port}/db?search_path=s"

    def test_a_target_is_one_tcp_host(self) -> None:
        assert FaultProxy.in_front_of("postgresql://u:pw@[::1]:5433/db").target_host == "::1"
        assert FaultProxy.in_front_of("postgresql://u@example.org/db").target_port == 5432
        for unusable in ("postgresql://u@/db?host=/tmp", "postgresql://u@h1:1,h2:2/db", "host=h port=5"):
            with pytest.raises(ValueError, match="FaultProxy"):
                FaultProxy.in_front_of(unusable)


class TestPass:
    def test_queries_pass_and_connections_are_counted(
        self, proxy: FaultProxy, through: str, target_dsn: str
    ) -> None:
        async def go() -> int:
            async with connected(through) as con:
                assert await con.fetchval("SELECT 40 + 2") == 42
                rows = await con.fetch("SELECT g FROM generate_series(1, 50000) g")  # many chunks
                assert len(rows) == 50000
                assert (proxy.opened, proxy.active) == (1, 1)
                pid = con.get_server_pid()
                await asyncio.wait_for(con.close(), 10)
                return pid

        assert proxy.mode is Mode.PASS
        pid = run_loop(go)
        # A client's close is passed on: the backend ends and both of the proxy's sockets close.
        wait_until(lambda: proxy.active == 0, what="the proxied connection closed")
        wait_until(lambda: not backend_exists(target_dsn, pid), what="the backend gone")

    def test_control_calls_work_from_any_thread(self, proxy: FaultProxy, through: str) -> None:
        for step in (proxy.stall, proxy.refuse, proxy.heal):
            caller = threading.Thread(target=step)
            caller.start()
            caller.join(15)
            assert not caller.is_alive()
        assert proxy.mode is Mode.PASS

        async def go() -> int:
            async with connected(through) as con:
                value: int = await con.fetchval("SELECT 1")
                return value

        assert run_loop(go) == 1


class TestSilence:
    def test_a_query_goes_unanswered_and_the_connection_stays_open(
        self, proxy: FaultProxy, through: str, target_dsn: str
    ) -> None:
        async def go() -> int:
            async with connected(through) as con:
                pid = con.get_server_pid()
                proxy.silence()
                started = time.monotonic()
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(con.fetchval("SELECT 1"), UNANSWERED)
                assert time.monotonic() - started >= UNANSWERED * 0.9
                # No FIN, no RST: the client still believes in its connection.
                assert not con.is_closed()
                # asyncpg's cancellation dials a connection of its own, which the proxy accepts and keeps
                # silent too: both stay open.
                await eventually(lambda: proxy.opened == 2, what="the cancellation's connection accepted")
                await asyncio.sleep(0.2)
                assert proxy.active == 2
                assert not con.is_closed()
                return pid

        pid = run_loop(go)
        # Nothing reached the server either, not even the client's going: its backend is still there.
        assert backend_exists(target_dsn, pid)

    @pytest.mark.slow  # waits out timeouts: 2 s or more
    def test_a_new_connection_is_accepted_and_hears_nothing(self, proxy: FaultProxy, through: str) -> None:
        proxy.silence()

        async def go() -> None:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), 10)
            try:
                writer.write(CANCEL_REQUEST)
                await writer.drain()
                # Neither an answer nor an EOF nor a reset: the read simply waits.
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(reader.read(1), UNANSWERED)
            finally:
                writer.close()
            # asyncpg's own connect gets no further than its first message.
            with pytest.raises(asyncio.TimeoutError):
                await asyncpg.connect(through, timeout=UNANSWERED)

        run_loop(go)
        assert proxy.opened == 2

    def test_silenced_connections_stay_silent_after_heal_while_new_ones_pass(
        self, proxy: FaultProxy, through: str
    ) -> None:
        async def go() -> None:
            async with connected(through) as con:
                proxy.silence()
                proxy.heal()
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(con.fetchval("SELECT 1"), UNANSWERED)
            async with connected(through) as fresh:
                assert await fresh.fetchval("SELECT 2") == 2

        run_loop(go)

    def test_forgetting_silenced_connections_ends_their_sessions_and_leaves_their_clients_silent(
        self, proxy: FaultProxy, through: str, target_dsn: str
    ) -> None:
        async def go() -> int:
            async with connected(through) as con:
                pid = con.get_server_pid()
                proxy.silence()
                proxy.forget_silenced()
                await eventually(lambda: not backend_exists(target_dsn, pid), what="the backend gone")
                proxy.heal()
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(con.fetchval("SELECT 1"), UNANSWERED)
                assert not con.is_closed()  # the client heard nothing of it
                async with connected(through) as fresh:
                    assert await fresh.fetchval("SELECT 2") == 2
                return pid

        run_loop(go)


class TestReset:
    def test_a_query_in_flight_fails_with_a_connection_error(
        self, proxy: FaultProxy, through: str, target_dsn: str
    ) -> None:
        async def go() -> int:
            async with connected(through) as con:
                pid = con.get_server_pid()
                query = asyncio.ensure_future(con.fetchval("SELECT pg_sleep(30)"))
                await asyncio.sleep(0.2)  # the query is on its way, or running
                proxy.reset()
                with pytest.raises(asyncpg.ConnectionDoesNotExistError):
                    await asyncio.wait_for(query, 10)
                assert con.is_closed()
                return pid

        pid = run_loop(go)
        assert proxy.active == 0
        assert proxy.mode is Mode.PASS  # a one-off: the mode is unchanged
        # The backend notices its lost client only when pg_sleep ends and it writes: do not wait for that.
        independent(target_dsn, "SELECT pg_terminate_backend($1)", pid)

    def test_the_client_gets_an_rst_not_a_fin(self, proxy: FaultProxy) -> None:
        async def go() -> None:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), 10)
            try:
                await eventually(lambda: proxy.active == 1, what="the proxy accepted")
                proxy.reset()
                # A FIN would read as b"" (EOF); an RST is an error.
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(reader.read(1), 10)
            finally:
                writer.close()

        run_loop(go)

    def test_an_idle_backend_ends_when_its_connection_is_reset(
        self, proxy: FaultProxy, through: str, target_dsn: str
    ) -> None:
        async def go() -> int:
            async with connected(through) as con:
                pid = con.get_server_pid()
                proxy.reset()
                await eventually(con.is_closed, what="asyncpg noticed the reset")
                return pid

        pid = run_loop(go)
        wait_until(lambda: not backend_exists(target_dsn, pid), what="the backend gone")


class TestStall:
    def test_a_query_completes_at_heal(self, proxy: FaultProxy, through: str) -> None:
        async def go() -> None:
            async with connected(through) as con:
                proxy.stall()
                query = asyncio.ensure_future(con.fetchval("SELECT 'held'"))
                done, _ = await asyncio.wait({query}, timeout=UNANSWERED)
                assert not done, "a query completed through a stalled proxy"
                proxy.heal()
                assert await asyncio.wait_for(query, 10) == "held"

        run_loop(go)

    def test_a_connection_opened_during_a_stall_completes_at_heal(
        self, proxy: FaultProxy, through: str
    ) -> None:
        proxy.stall()

        async def go() -> None:
            opening = asyncio.ensure_future(asyncpg.connect(through, timeout=20))
            done, _ = await asyncio.wait({opening}, timeout=UNANSWERED)
            assert not done, "a connect completed through a stalled proxy"
            proxy.heal()
            con = await asyncio.wait_for(opening, 10)
            try:
                assert await con.fetchval("SELECT 3") == 3
            finally:
                con.terminate()

        run_loop(go)

    def test_a_close_during_a_stall_reaches_the_server_after_heal(
        self, proxy: FaultProxy, through: str, target_dsn: str
    ) -> None:
        async def go() -> int:
            async with connected(through) as con:
                proxy.stall()
                return con.get_server_pid()  # and the client closes its socket at once, without waiting

        pid = run_loop(go)
        time.sleep(0.2)
        assert backend_exists(target_dsn, pid), "the close went through a stalled proxy"
        proxy.heal()
        wait_until(lambda: not backend_exists(target_dsn, pid), what="the backend gone after heal")


class TestRefuse:
    def test_new_connections_fail_and_open_ones_keep_working(self, proxy: FaultProxy, through: str) -> None:
        async def go() -> None:
            async with connected(through) as open_one:
                proxy.refuse()
                with pytest.raises(ConnectionResetError):
                    await asyncpg.connect(through, timeout=10)
                assert await open_one.fetchval("SELECT 'still here'") == "still here"
                assert (proxy.opened, proxy.refused) == (1, 1)
                proxy.heal()
                async with connected(through) as again:
                    assert await again.fetchval("SELECT 1") == 1

        run_loop(go)


class TestStop:
    def test_stop_closes_every_connection_and_the_port(self, target_dsn: str) -> None:
        proxy = FaultProxy.in_front_of(target_dsn).start()
        through = proxy.dsn_for(target_dsn)

        async def go() -> None:
            async with connected(through) as con, connected(through) as silenced:
                proxy.silence()
                proxy.stop()
                for each in (con, silenced):
                    await eventually(each.is_closed, what="the client saw the proxy go")
            with pytest.raises(ConnectionRefusedError):
                await asyncpg.connect(through, timeout=10)

        try:
            run_loop(go)
        finally:
            proxy.stop()  # idempotent
        assert proxy.active == 0

    def test_an_unreachable_target_resets_the_client(self) -> None:
        with FaultProxy("127.0.0.1", 1) as proxy:  # nothing listens on port 1

            async def go() -> None:
                with pytest.raises(ConnectionResetError):
                    await asyncpg.connect(f"postgresql://u@127.0.0.1:{proxy.port}/db", timeout=10)

            run_loop(go)
            wait_until(lambda: proxy.active == 0, what="the link dropped")
