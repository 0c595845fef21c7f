"""DSN handling: find it, check it, describe it, and keep its password out of every message.

asyncpg does the real parsing when it connects. What this module adds is what a person needs when
something goes wrong: an early, clear error for a malformed DSN, and a description ("database 'app' on
db.internal:5432 as user 'web'") for reprs, logs and error messages that never contains the password.
"""

from __future__ import annotations

import getpass
import os
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import ConfigurationError

__all__ = ["DsnInfo", "parse_dsn", "redact", "resolve_dsn"]

#: Environment variables consulted, in order, when no DSN is passed.
DSN_ENV_VARS = ("LOOPBRIDGE_DSN", "DATABASE_URL")

_SCHEMES = {"postgres": "postgresql", "postgresql": "postgresql", "postgresql+asyncpg": "postgresql"}
_REDACTED = "***"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")  # RFC 3986


def resolve_dsn(dsn: str | None) -> str:
    """Return *dsn*, or the first of ``LOOPBRIDGE_DSN`` / ``DATABASE_URL`` that is set.

    :raises ConfigurationError: if none is given or set.
    """
    if dsn is not None:
        if not isinstance(dsn, str):
            raise ConfigurationError(
                f"dsn must be a string such as 'postgresql://user@host:5432/dbname', not {type(dsn).__name__}"
            )
        return dsn
    for name in DSN_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    raise ConfigurationError(
        "no DSN given: pass Database('postgresql://user:password@host:5432/dbname') "
        "or set LOOPBRIDGE_DSN (or DATABASE_URL) in the environment"
    )


@dataclass(frozen=True)
class DsnInfo:
    """What a DSN says, for people: never print :attr:`dsn` itself, use :attr:`redacted`."""

    dsn: str
    """The DSN to hand to asyncpg (scheme normalized to ``postgresql``). Contains the password."""
    redacted: str
    """The DSN with its password replaced by ``***``: safe for reprs and logs."""
    hosts: tuple[str, ...]
    ports: tuple[str, ...]
    database: str
    user: str
    password: str | None
    secrets: tuple[str, ...] = ()
    """Every password-like value of the DSN (the user info's password, ``password=`` and
    ``sslpassword=``): scrubbed from every message that may quote the server or asyncpg."""

    def describe(self) -> str:
        """``database 'app' on db:5432 as user 'web'``, for messages."""
        places = ", ".join(
            f"{host}:{port}" if not host.startswith("/") else f"{host} (unix socket, port {port})"
            for host, port in zip(self.hosts, self.ports, strict=True)
        )
        return f"database {self.database!r} on {places} as user {self.user!r}"


def parse_dsn(dsn: str) -> DsnInfo:
    """Check *dsn* and describe it; asyncpg still does the authoritative parsing when connecting.

    :raises ConfigurationError: for a DSN asyncpg could not use (wrong scheme, libpq keyword form,
        bad port, malformed host), whatever is wrong with it. The message never contains the password.
    """
    try:
        return _parse(dsn)
    except ConfigurationError:
        raise
    except ValueError as exc:  # urlsplit's own complaints, such as "Invalid IPv6 URL"
        # Its message may quote a piece of the DSN, password included: leave the quotes out.
        detail = re.sub(r"'.*'", "(a part of it)", str(exc), flags=re.DOTALL)
        raise ConfigurationError(
            f"invalid DSN {_redact_any(dsn)!r} ({detail}): expected "
            "'postgresql://user:password@host:5432/dbname', with an IPv6 host in brackets "
            "('[::1]:5432') and special characters in the user name or password percent-encoded ('/' as "
            "%2F, '?' as %3F, '#' as %23, '@' as %40)"
        ) from None


def _parse(dsn: str) -> DsnInfo:
    if "://" not in dsn:
        hint = (
            " (libpq 'key=value' strings are not supported by asyncpg; write it as a URL)"
            if "=" in dsn
            else ""
        )
        raise ConfigurationError(
            f"invalid DSN {_redact_any(dsn)!r}{hint}: expected 'postgresql://user:password@host:5432/dbname'"
        )
    scheme, _, rest = dsn.partition("://")
    if not _SCHEME.fullmatch(scheme):  # "postgresql:/user:pw@h/db://": not a URL, and not a scheme to show
        raise ConfigurationError(
            f"invalid DSN {_redact_any(dsn)!r}: expected 'postgresql://user:password@host:5432/dbname'"
        )
    normalized_scheme = _SCHEMES.get(scheme.lower())
    if normalized_scheme is None:
        raise ConfigurationError(
            f"unsupported DSN scheme {scheme!r}: loopbridge talks to PostgreSQL through asyncpg; "
            "use 'postgresql://user:password@host:5432/dbname'"
        )
    normalized = f"{normalized_scheme}://{rest}"
    redacted, hidden = _hide(normalized)
    # urlsplit cannot read a multi-host netloc's ports, so split the netloc by hand.
    parts = urlsplit(normalized)
    if parts.fragment or "@" in parts.path:
        # Nothing in a DSN is a fragment, and a database name with a raw '@': a '#', '/' or '?' in the
        # password cut the URL short, and what follows it (part of the password) would be shown as
        # the database name.
        raise ConfigurationError(
            f"invalid DSN {redacted!r}: a '#', '/' or '?' in the user name or password must be "
            "percent-encoded (%23, %2F, %3F), and so must an '@' in the database name (%40)"
        )
    if parts.netloc.count("@") > 1:
        # asyncpg splits at the first '@', urlsplit at the last: the two would read different hosts,
        # and asyncpg would try to reach one named after the end of the password.
        raise ConfigurationError(
            f"invalid DSN {redacted!r}: an '@' in the user name or password must be percent-encoded (%40)"
        )
    if "@" not in parts.netloc and _user_info_password(rest) is not None:
        # 'app:pw?x@db/shop': a '/', '?' or '#' in the password ended the host part early, and the rest
        # of the password would be read as a database name, a port or a query field.
        raise ConfigurationError(
            f"invalid DSN {redacted!r}: a '#', '/' or '?' in the user name or password must be "
            "percent-encoded (%23, %2F, %3F), and so must an '@' in a query value after a ':' (%40)"
        )
    _check_query(parts.query, redacted)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user, has_password, password = userinfo.partition(":")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))

    hosts: list[str] = []
    ports: list[str] = []
    for item in hostlist.split(",") if hostlist else []:
        host, port = _split_host_port(item)
        hosts.append(unquote(host))
        ports.append(port)
    query_ports = (query.get("port") or os.environ.get("PGPORT") or "5432").split(",")
    if hosts:
        ports = [port or query_ports[0] for port in ports]
    else:
        hosts = (query.get("host") or os.environ.get("PGHOST") or "localhost").split(",")
        ports = query_ports * len(hosts) if len(query_ports) == 1 else query_ports
    if len(ports) != len(hosts):
        raise ConfigurationError(f"DSN {redacted!r} lists {len(hosts)} hosts but {len(ports)} ports")
    for port in ports:
        # isascii: str.isdigit() accepts '²', which int() refuses.
        if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ConfigurationError(
                f"invalid port {_shown(port, hidden)} in DSN {redacted!r}: expected 1-65535"
            )

    user = unquote(user) or query.get("user") or os.environ.get("PGUSER") or _os_user()
    database = (
        unquote(parts.path.lstrip("/"))
        or query.get("dbname")
        or query.get("database")
        or os.environ.get("PGDATABASE")
        or user
    )
    secret = unquote(password) if has_password else query.get("password") or os.environ.get("PGPASSWORD")
    secrets = {secret, query.get("password"), query.get("sslpassword"), *hidden, *map(unquote, hidden)}
    return DsnInfo(
        dsn=normalized,
        redacted=redacted,
        hosts=tuple(hosts),
        ports=tuple(ports),
        database=database,
        user=user,
        password=secret or None,
        # Longest first, so that redact() replaces a whole secret before a shorter one inside it.
        secrets=tuple(sorted(filter(None, secrets), key=len, reverse=True)),
    )


def redact(text: str, *secrets: str | None) -> str:
    """Replace every occurrence of each non-empty secret in *text* by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, _REDACTED)
    return text


def _split_host_port(item: str) -> tuple[str, str]:
    if item.startswith("["):  # [ipv6]:port
        host, _, port = item[1:].partition("]")
        return host, port.lstrip(":")
    host, _, port = item.partition(":")
    return host, port


def _redact_any(dsn: str) -> str:
    """*dsn* with its password replaced by ``***``, whatever the string (see :func:`_hide`)."""
    return _hide(dsn)[0]


#: A password-like query field's value: everything up to the next field that is well formed
#: (``&name=``), or to the end. A password with an unencoded '&' or '#' ("password=Hunter2&SeKrEt")
#: would otherwise show its end as a field of its own, or as a fragment.
_QUERY_SECRET = re.compile(r"([?&](?:ssl)?password=)(.*?)(?=&[A-Za-z_][A-Za-z0-9_.]*=|\Z)", re.I | re.S)


def _hide(dsn: str) -> tuple[str, tuple[str, ...]]:
    """*dsn* with every password-like part replaced by ``***``, and the parts replaced.

    Whatever the string, well formed or not, it errs on the side of hiding too much: the user info's
    password as :func:`_user_info_password` finds it, and a ``password=`` or ``sslpassword=`` query
    field up to the next well-formed field.
    """
    hidden: list[str] = []
    scheme, separator, rest = dsn.partition("://")
    if not separator or not _SCHEME.fullmatch(scheme):
        # Not a URL: a libpq keyword string, or a mistyped URL ("postgresql:/app:pw@db/x") whose user
        # info, if any, precedes its last '@'.
        text = _scrub_keyword_dsn(dsn, hidden)
        if "@" in text:
            head, _, tail = text.rpartition("@")
            hidden.append(head)
            text = f"{_REDACTED}@{tail}"
        return text, tuple(hidden)
    # Both kinds of secret are found in the string as given, and their union is hidden: either may
    # contain what looks like the other ("app:x?password=y@db", "?password=a@b").
    spans: list[tuple[int, int]] = []
    password = _user_info_password(rest)
    if password is not None:
        spans.append(password)
    spans.extend(match.span(2) for match in _QUERY_SECRET.finditer(rest))
    pieces: list[str] = []
    shown = 0
    for start, stop in _merged(spans):
        hidden.append(rest[start:stop])
        pieces += [rest[shown:start], _REDACTED]
        shown = stop
    pieces.append(rest[shown:])
    return f"{scheme}{separator}{''.join(pieces)}", tuple(piece for piece in hidden if piece)


def _user_info_password(rest: str) -> tuple[int, int] | None:
    """Where the password of the user info is in *rest* (the DSN after ``scheme://``), if it has one.

    The user info ends at the last '@' of the authority (which ends at the first '/', '?' or '#'). But
    an unencoded '/', '?' or '#' in the password ends the authority early, and then an '@' after it
    gives that away: everything up to the last '@' of the whole string is taken as user info.
    """
    end = next((i for i, char in enumerate(rest) if char in "/?#"), len(rest))
    at = rest.rfind("@") if "@" in rest[end:] else rest.rfind("@", 0, end)
    if at >= 0 and ":" in rest[:at]:
        return rest.index(":") + 1, at
    return None


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """*spans* (start, stop) sorted, with those that overlap or touch joined."""
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def _scrub_keyword_dsn(dsn: str, hidden: list[str]) -> str:
    # A value is a word or a quoted string (which may hold spaces), as libpq reads it.
    def hide(match: re.Match[str]) -> str:
        hidden.append(match[2])
        return match[1] + _REDACTED

    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)", hide, dsn, flags=re.IGNORECASE)


def _shown(piece: str, hidden: tuple[str, ...]) -> str:
    """*piece* of a DSN quoted for a message, unless it may be part of a password."""
    if any(piece in secret or secret in piece for secret in hidden):
        return "(not shown: it may be part of the password)"
    return repr(piece)


def _check_query(query: str, redacted: str) -> None:
    """asyncpg parses the query strictly, and its error quotes the field it could not read: for a
    password with an unencoded '&' ("password=Hunter2&SeKrEt"), the password's end. Refuse such a
    query here, saying where without quoting it."""
    if not query:
        return
    fields = query.split("&")
    for number, field in enumerate(fields, 1):
        name, equals, _ = field.partition("=")
        if equals and name:
            continue
        where = redacted.partition("?")[0]
        raise ConfigurationError(
            f"invalid DSN {where + '?...'!r}: field {number} of its query string (of {len(fields)}) is not "
            "'name=value'. A password in the DSN must have '&' percent-encoded as %26 and '#' as %23; query "
            "fields are separated by a single '&'"
        )


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in the environment or the passwd database
        return "postgres"
