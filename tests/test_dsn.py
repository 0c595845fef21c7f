"""DSN checks and descriptions: clear errors for bad DSNs, and the password never shown."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from loopbridge import ConfigurationError
from loopbridge._dsn import _redact_any, parse_dsn, redact, resolve_dsn


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
        # Regression: urlsplit's own ValueError escaped instead of a ConfigurationError.
        (
            "postgresql://alice:hunter2@[::1/inventory",
            r"invalid DSN 'postgresql://alice:\*\*\*@\[::1/inventory'",
        ),
        ("postgresql://alice:hunter2@db]:5432/inventory", "IPv6 host in brackets"),
        ("postgresql://app:hunter2@db:²/shop", "invalid port '²'"),
        # An unencoded '#', '/' or '?' in the password cuts the URL short.
        ("postgresql://app:hun#ter2@db/shop", "must be percent-encoded"),
        ("postgresql://app:hu/nter2@db/shop", "must be percent-encoded"),
        # ... and the rest of it, read as a port ('hu'), was quoted in the message.
        ("postgresql://app:hu?nter2@db/shop", "must be percent-encoded"),
        # Regression: asyncpg reads the host after the first '@', loopbridge read it after the last.
        ("postgresql://app:hun@ter2@db/shop", r"an '@' in the user name or password must be percent-encoded"),
    ],
)
def test_bad_dsns_get_a_clear_error_without_the_password(dsn: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        parse_dsn(dsn)
    assert "hunter2" not in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "dsn",
    [
        # An unencoded '&' in a query password: asyncpg's "bad query field: 'SeKrEt-pw'" quoted the end.
        "postgresql://app@db/shop?password=Hunter2&SeKrEt-pw",
        "postgresql://app@db/shop?sslmode=require&sslpassword=Hunter2&SeKrEt-pw",
        "postgresql://app@db/shop?PASSWORD=Hunter2&SeKrEt-pw&sslmode=require",
        # An unencoded '#': the rest was a fragment, shown after 'password=***'.
        "postgresql://app@db/shop?password=Hunter2#SeKrEt-pw",
        "postgresql://app@db/shop?sslpassword=Hunter2#SeKrEt-pw&sslmode=require",
        # A password cut short by its '?': its start was read as the database name ("database
        # 'app:Hunter2'"), its end as a query field.
        "postgresql:///app:Hunter2?SeKrEt-pw@db/shop",
        "postgresql://app:Hunter2?SeKrEt-pw@db/shop",
    ],
)
def test_no_fragment_of_a_malformed_password_is_shown(dsn: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_dsn(dsn)
    message = str(info.value)
    assert "Hunter2" not in message
    assert "SeKrEt" not in message
    assert "percent-encoded" in message or "%26" in message


@pytest.mark.parametrize(
    ("dsn", "redacted"),
    [
        (
            "postgresql://app@db/shop?password=Hunter2&SeKrEt-pw&sslmode=require",
            "postgresql://app@db/shop?password=***&sslmode=require",
        ),
        ("postgresql://app@db/shop?sslpassword=Hu&nt#er2", "postgresql://app@db/shop?sslpassword=***"),
        ("postgresql://app:Hunter2@db/shop?password=x&y", "postgresql://app:***@db/shop?password=***"),
    ],
)
def test_a_password_field_is_hidden_up_to_the_next_well_formed_field(dsn: str, redacted: str) -> None:
    assert _redact_any(dsn) == redacted


def test_every_password_like_value_is_a_secret_to_scrub() -> None:
    info = parse_dsn("postgresql://app:Hunter2@db/shop?sslpassword=KeyPass&sslmode=require")
    assert redact("Hunter2 and KeyPass", *info.secrets) == "*** and ***"


def test_a_query_field_without_a_value_is_refused_without_quoting_it() -> None:
    with pytest.raises(ConfigurationError, match=r"field 2 of its query string \(of 3\)") as info:
        parse_dsn("postgresql://app@db/shop?sslmode=require&oops&application_name=web")
    assert "oops" not in str(info.value)


def test_an_at_sign_in_a_query_value_is_fine() -> None:
    info = parse_dsn("postgresql:///shop?host=db&application_name=me@example")
    assert info.database == "shop"
    assert info.hosts == ("db",)


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


# -- fuzzing: whatever the string, a ConfigurationError or a description, and never the password ------

#: Passwords are distinctive (they cannot appear in a message by chance) and may hold every character
#: that means something in a URL.
PASSWORD = st.builds(lambda middle: f"Pw{middle}Xz", st.text(alphabet=":/@[]?#&=%,. \\²é\x00", max_size=6))
URL_PIECES = st.text(alphabet="abc019:/@[]?#&=%,.- \\²é\x00", max_size=12)
#: A query password may hold an unencoded '&' or '#' but no '&name=': that is where the next field begins.
QUERY_PASSWORD = st.builds(
    lambda middle: f"Pw{middle}Xz", st.text(alphabet=":/@[]?#&%,. \\²é\x00", max_size=6)
)


def check_never_shows(password: str, dsn: str) -> None:
    """Neither the password nor a fragment of it: its distinctive ends ("Pw", "Xz") appear nowhere, so
    no piece cut off at a character that means something in a URL is shown either."""
    try:
        info = parse_dsn(dsn)
    except ConfigurationError as exc:
        shown = str(exc)
    else:
        parts = (info.redacted, info.describe(), repr(info.hosts), repr(info.ports), info.database, info.user)
        shown = "".join(parts)
    for fragment in (password, password[:2], password[-2:]):
        assert fragment not in shown


@settings(max_examples=400, deadline=None)
@given(
    scheme=st.sampled_from(["postgresql", "postgres", "PostgreSQL", "postgresql+asyncpg", "mysql", "", "pg"]),
    separator=st.sampled_from(["://", ":/", "//", ""]),
    user=URL_PIECES,
    password=PASSWORD,
    hosts=URL_PIECES,
    tail=URL_PIECES,
)
@example(
    scheme="postgresql", separator="://", user="alice", password="Pw[Xz", hosts="[::1", tail="/inventory"
)
@example(scheme="postgresql", separator="://", user="app", password="Pw#Xz", hosts="db", tail="/shop")
@example(scheme="postgresql", separator="://", user="app", password="Pw/Xz", hosts="db", tail="/shop")
@example(scheme="postgresql", separator="://", user="app", password="Pw?Xz", hosts="db", tail="/shop")
def test_no_malformed_dsn_raises_anything_but_configuration_error_or_shows_the_password(
    scheme: str, separator: str, user: str, password: str, hosts: str, tail: str
) -> None:
    check_never_shows(password, f"{scheme}{separator}{user}:{password}@{hosts}{tail}")


@settings(max_examples=300, deadline=None)
@given(
    head=URL_PIECES,
    password=QUERY_PASSWORD,
    tail=URL_PIECES,
    key=st.sampled_from(["password", "PASSWORD", "sslpassword", "SslPassword"]),
)
@example(head="db", password="Pw&Xz", tail="", key="password")
@example(head="db", password="Pw#Xz", tail="&sslmode=require", key="sslpassword")
def test_a_password_in_the_query_is_never_shown_either(head: str, password: str, tail: str, key: str) -> None:
    # What follows the password begins a field of its own: '&' (a tail of '=...' right after it would
    # make the password's end a field name, which the DSN then really says).
    check_never_shows(password, f"postgresql://app@{head}/db?sslmode=prefer&{key}={password}&{tail}")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_string_is_a_dsn_or_a_configuration_error(dsn: str) -> None:
    try:
        parse_dsn(dsn)
    except ConfigurationError:
        pass
