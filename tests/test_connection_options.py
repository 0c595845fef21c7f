"""Connection options: multi-host DSNs, target_session_attrs and ssl pass straight through to asyncpg;
TCP keepalive is set on every pooled connection."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from loopbridge import Bridge, ConfigurationError, ConnectError, Database
from loopbridge._asyncpg import socket_of
from tests.pgcluster import PASSWORD, PrivateCluster

#: A loopback port nothing listens on: connecting to it is refused at once.
REFUSED = "127.0.0.1:1"


def with_hosts(dsn: str, *hosts: str) -> str:
    """*dsn* with *hosts* (``host:port``) listed before its own host."""
    parts = urlsplit(dsn)
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{userinfo}{at}{','.join((*hosts, hostlist))}").geturl()


def own_port(dsn: str) -> int:
    port = urlsplit(dsn).port
    assert port is not None
    return port


def own_place(dsn: str) -> str:
    return f"{urlsplit(dsn).hostname}:{own_port(dsn)}"


class TestMultiHost:
    def test_a_dsn_whose_first_host_refuses_connects_to_the_next(self, dsn: str, bridge: Bridge) -> None:
        db = Database(with_hosts(dsn, REFUSED), bridge=bridge)
        assert db.fetchval("SELECT inet_server_port()") == own_port(dsn)
        assert f"{REFUSED},{own_place(dsn)}" in repr(db)
        db.close()

    def test_when_every_host_refuses_the_error_names_them_all(self, bridge: Bridge) -> None:
        db = Database("postgresql://app:hunter2@127.0.0.1:1,127.0.0.1:2/shop", bridge=bridge)
        with pytest.raises(ConnectError, match=r"on 127\.0\.0\.1:1, 127\.0\.0\.1:2 as user 'app'") as info:
            db.fetchval("SELECT 1")
        assert "hunter2" not in str(info.value)

    def test_target_session_attrs_in_the_dsn_selects_the_host(self, dsn: str, bridge: Bridge) -> None:
        writable = Database(with_hosts(dsn, REFUSED) + "&target_session_attrs=read-write", bridge=bridge)
        assert writable.fetchval("SELECT NOT pg_is_in_recovery()") is True
        writable.close()
        # The test server is a primary: asking for a standby finds none, and says where it looked.
        standby = Database(with_hosts(dsn, REFUSED) + "&target_session_attrs=standby", bridge=bridge)
        with pytest.raises(ConnectError, match=f"on {REFUSED}, {own_place(dsn)} "):
            standby.fetchval("SELECT 1")
        only_primary = Database(dsn + "&target_session_attrs=standby", bridge=bridge)
        with pytest.raises(ConnectError) as info:
            only_primary.fetchval("SELECT 1")
        assert isinstance(info.value.__cause__, asyncpg.TargetServerAttributeNotMatched)

    def test_target_session_attrs_as_an_option_passes_through(self, dsn: str, bridge: Bridge) -> None:
        primary = Database(dsn, bridge=bridge, target_session_attrs="primary")
        assert primary.fetchval("SELECT 1") == 1
        primary.close()
        read_only = Database(dsn, bridge=bridge, target_session_attrs="read-only")
        with pytest.raises(ConnectError) as info:
            read_only.fetchval("SELECT 1")
        assert isinstance(info.value.__cause__, asyncpg.TargetServerAttributeNotMatched)


@pytest.fixture(scope="module")
def ssl_cluster() -> Iterator[PrivateCluster]:
    """A private cluster serving TLS with a self-signed certificate."""
    private = PrivateCluster(ssl=True)
    private.start()
    yield private
    private.destroy()


SSL_IN_USE = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


class TestSsl:
    @pytest.mark.parametrize(
        ("option", "encrypted"), [("require", True), ("prefer", True), ("disable", False)]
    )
    def test_the_ssl_option_passes_through(
        self, ssl_cluster: PrivateCluster, bridge: Bridge, option: str, encrypted: bool
    ) -> None:
        db = Database(ssl_cluster.dsn(), bridge=bridge, ssl=option)
        assert db.fetchval(SSL_IN_USE) is encrypted
        db.close()

    def test_an_ssl_context_passes_through(self, ssl_cluster: PrivateCluster, bridge: Bridge) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the test certificate is self-signed
        db = Database(ssl_cluster.dsn(), bridge=bridge, ssl=context)
        assert db.fetchval(SSL_IN_USE) is True
        db.close()

    def test_sslmode_in_the_dsn_passes_through(self, ssl_cluster: PrivateCluster, bridge: Bridge) -> None:
        db = Database(ssl_cluster.dsn() + "?sslmode=require", bridge=bridge)
        assert db.fetchval(SSL_IN_USE) is True
        db.close()

    def test_certificate_verification_is_asyncpgs_and_is_enforced(
        self, ssl_cluster: PrivateCluster, bridge: Bridge
    ) -> None:
        # Verified against the system's CAs, the self-signed test certificate is refused...
        untrusted = Database(ssl_cluster.dsn(), bridge=bridge, ssl=ssl.create_default_context())
        with pytest.raises(ConnectError) as info:
            untrusted.fetchval("SELECT 1")
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
        assert PASSWORD not in str(info.value)
        # ... and trusted once it is the root (verify-ca: the certificate names no IP address).
        trusting = ssl.create_default_context(cafile=str(ssl_cluster.data / "server.crt"))
        trusting.check_hostname = False
        db = Database(ssl_cluster.dsn(), bridge=bridge, ssl=trusting)
        assert db.fetchval(SSL_IN_USE) is True
        db.close()

    def test_requiring_ssl_from_a_server_without_it_fails_clearly(
        self, cluster: PrivateCluster, bridge: Bridge
    ) -> None:
        db = Database(cluster.dsn() + "?sslmode=require", bridge=bridge)
        with pytest.raises(ConnectError, match="rejected SSL upgrade") as info:
            db.fetchval("SELECT 1")
        assert PASSWORD not in str(info.value)
        assert PASSWORD not in repr(db)


async def _socket_options(con: Any) -> dict[str, int] | None:
    """The keepalive options of the socket under *con*, or None when it is not TCP (a unix socket)."""
    sock = socket_of(con)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    tcp = socket.IPPROTO_TCP
    return {
        "SO_KEEPALIVE": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "TCP_KEEPIDLE": sock.getsockopt(tcp, socket.TCP_KEEPIDLE),
        "TCP_KEEPINTVL": sock.getsockopt(tcp, socket.TCP_KEEPINTVL),
        "TCP_KEEPCNT": sock.getsockopt(tcp, socket.TCP_KEEPCNT),
        "TCP_USER_TIMEOUT": sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT),
    }


def _server_probing(db: Database) -> tuple[str, str, str]:
    row = db.fetchrow(
        "SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_interval'), "
        "current_setting('tcp_keepalives_count')"
    )
    assert row is not None
    return row[0], row[1], row[2]


def _system_keepalive() -> tuple[str, str, str]:
    """The kernel's keepalive settings, which the server uses when not told otherwise (same machine)."""
    names = ("tcp_keepalive_time", "tcp_keepalive_intvl", "tcp_keepalive_probes")
    return tuple(Path(f"/proc/sys/net/ipv4/{name}").read_text().strip() for name in names)  # type: ignore[return-value]


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="the keepalive options are Linux's")
class TestKeepalive:
    """TCP keepalive, the second line of defence against a silent peer (loopbridge/_keepalive.py)."""

    def test_pool_connections_probe_a_silent_peer_on_both_sides_by_default(
        self, cluster: PrivateCluster, bridge: Bridge
    ) -> None:
        db = Database(cluster.dsn(), bridge=bridge)
        assert db.run(_socket_options) == {
            "SO_KEEPALIVE": 1,
            "TCP_KEEPIDLE": 10,
            "TCP_KEEPINTVL": 5,
            "TCP_KEEPCNT": 3,
            "TCP_USER_TIMEOUT": 30_000,
        }
        assert _server_probing(db) == ("10", "5", "3")

    def test_the_idle_time_sets_the_rest_and_the_callers_server_settings_win(
        self, cluster: PrivateCluster, bridge: Bridge
    ) -> None:
        db = Database(
            cluster.dsn(), bridge=bridge, keepalive=20, server_settings={"tcp_keepalives_count": "7"}
        )
        options = db.run(_socket_options)
        assert options is not None
        assert (options["TCP_KEEPIDLE"], options["TCP_KEEPINTVL"], options["TCP_USER_TIMEOUT"]) == (
            20,
            10,
            60_000,
        )
        assert _server_probing(db) == ("20", "10", "7")

    def test_keepalive_none_leaves_the_sockets_and_the_server_as_they_are(
        self, cluster: PrivateCluster, bridge: Bridge
    ) -> None:
        db = Database(cluster.dsn(), bridge=bridge, keepalive=None)
        options = db.run(_socket_options)
        assert options is not None
        assert options["SO_KEEPALIVE"] == 0
        assert _server_probing(db) == _system_keepalive()  # the server's defaults: the system's

    @pytest.mark.parametrize("keepalive", [0, 0.5, 40_000, "10", True])
    def test_a_keepalive_beyond_the_kernels_bounds_is_refused(self, dsn: str, keepalive: Any) -> None:
        with pytest.raises(ConfigurationError, match="keepalive must be a number of seconds from 1 to 32767"):
            Database(dsn, keepalive=keepalive)
