"""DSN checks and descriptions: clear errors for bad DSNs, and the password never shown."""

from __future__ import annotations

import pytest

from loopbridge import ConfigurationError
from loopbridge._dsn import parse_dsn, redact, resolve_dsn


@pytest.mark.parametrize(
    ("dsn", "described"),
    [
        ("postgresql://app:pw@db.internal:6432/shop", "database 'shop' on db.internal:6432 as user 'app'"),
        ("postgres://app@db/shop", "database 'shop' on db:5432 as user 'app'"),
        ("postgresql+asyncpg://app@db/shop", "database 'shop' on db:5432 as user 'app'"),
        (
            "postgresql://app@h1:5432,h2:5433/shop?target_session_attrs=read-write",
            "database 'shop' on h1:5432, h2:5433 as user 'app'",
        ),
        ("postgresql://app@[::1]:5444/shop", "database 'shop' on ::1:5444 as user 'app'"),
        (
            "postgresql://postgres:@/postgres?host=/tmp/sock",
            "database 'postgres' on /tmp/sock (unix socket, port 5432) as user 'postgres'",
        ),
        ("postgresql:///shop?user=app&port=7000&host=db", "database 'shop' on db:7000 as user 'app'"),
        ("postgresql://app@/shop?host=h1,h2&port=1,2", "database 'shop' on h1:1, h2:2 as user 'app'"),
    ],
)
def test_describe_names_host_port_database_and_user(dsn: str, described: str) -> None:
    assert parse_dsn(dsn).describe() == described


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:hunter2@db/shop",
        "postgresql://app@db/shop?password=hunter2&sslmode=require",
        "postgresql://app:hunter2@h1,h2:5433/shop",
    ],
)
def test_redacted_dsn_hides_the_password(dsn: str) -> None:
    info = parse_dsn(dsn)
    assert info.password == "hunter2"
    assert "hunter2" not in info.redacted
    assert "***" in info.redacted
    assert "hunter2" not in info.describe()


def test_the_scheme_is_normalized_for_asyncpg() -> None:
    assert parse_dsn("postgresql+asyncpg://a@b/c").dsn == "postgresql://a@b/c"


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("mysql://root:hunter2@localhost/db", "unsupported DSN scheme 'mysql'"),
        ("host=db dbname=shop password=hunter2", "libpq 'key=value' strings are not supported"),
        ("postgresql://app:hunter2@db:99999/shop", "invalid port '99999'"),
        ("postgresql://app:hunter2@db:http/shop", "invalid port 'http'"),
        ("postgresql://app:hunter2@/db?host=h1,h2&port=3,4,5", "lists 2 hosts but 3 ports"),
        ("just-a-name", "expected 'postgresql://user:password@host:5432/dbname'"),
    ],
)
def test_bad_dsns_get_a_clear_error_without_the_password(dsn: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        parse_dsn(dsn)
    assert "hunter2" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_resolve_prefers_the_argument_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPBRIDGE_DSN", "postgresql://a@lb/x")
    monkeypatch.setenv("DATABASE_URL", "postgresql://a@du/x")
    assert resolve_dsn("postgresql://a@arg/x") == "postgresql://a@arg/x"
    assert resolve_dsn(None) == "postgresql://a@lb/x"
    monkeypatch.delenv("LOOPBRIDGE_DSN")
    assert resolve_dsn(None) == "postgresql://a@du/x"


def test_resolve_refuses_a_non_string() -> None:
    with pytest.raises(ConfigurationError, match="dsn must be a string"):
        resolve_dsn(b"postgresql://a@b/c")  # type: ignore[arg-type]


def test_redact_replaces_every_secret() -> None:
    assert redact("a hunter2 b hunter2", "hunter2", None, "") == "a *** b ***"
