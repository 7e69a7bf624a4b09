"""Connections to the migration database: engines, the UTC timestamp type, URL scrubbing.

SQLite gets a busy timeout, `BEGIN IMMEDIATE` write transactions and (for our own database)
the WAL journal; PostgreSQL URLs get the psycopg 3 driver, a connect timeout, TCP keepalives
and `tcp_user_timeout` (a partition that drops packets fails a statement instead of hanging
it for good).
"""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Connection, DateTime, Dialect, Engine, TypeDecorator, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from ..exceptions import ConfigError, DatabaseUnavailable

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry

SQLITE_BUSY_TIMEOUT_MS: Final = 15_000

#: What bounds every PostgreSQL connection of `make_engine` (libpq parameters; any the URL
#: sets wins). TCP keepalives probe a connection silent for 10 s every 5 s, 3 times: a peer
#: gone behind a packet-dropping partition is noticed within about 25 s, and data left
#: unacknowledged for 30 s drops the connection (`tcp_user_timeout`). A healthy server's
#: kernel answers the probes however long a statement runs (a backfill batch, a validate
#: scan), so neither limits a legitimate statement; no `statement_timeout` is set unless
#: `timeout_seconds` asks for one.
PG_CONNECTION_BOUNDS: Final = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC, microsecond precision."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that always reads back as timezone-aware UTC (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self,
        value: datetime | None,
        dialect: Dialect,  # noqa: ARG002  TypeDecorator's signature; UTC on every dialect
    ) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: Query parameters whose value is a secret (libpq and psycopg accept `password`,
#: `sslpassword`, ... in the URL's query as well as in its user-info): matched on the key's
#: name, case-insensitively, so `passfile`, `sslkey`, `token`, `api_key`, `secret` are too.
_SENSITIVE_PARAM = (
    r"[A-Za-z_]*(?:password|passwd|pwd|passfile|passphrase|secret|token|apikey|api_key|sslkey|credential)"
    r"[A-Za-z_]*"
)
_URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)([^\s'\"<>]*)")
_PAIR_VALUE = r"""('(?:[^'\\]|\\.)*'|"[^"]*"|[^\s&;,)'"\\]*)"""
_SECRET_PAIR = re.compile(rf"(?i)\b({_SENSITIVE_PARAM})(\s*=\s*){_PAIR_VALUE}")
_MASK = "***"
#: The secrets of every URL this process was given (`remember_secrets`): a driver message may
#: quote one without its key (e.g. a user-info that does not parse).
_SECRETS: set[str] = set()
#: A secret shorter than this is not searched for in free text (it would mask ordinary words).
_MIN_SECRET = 4


def _split_url(url: str) -> tuple[str, str, str, str] | None:
    """(scheme://, user-info or '', host and path, query or '') of `url`, without parsing
    anything else: the user-info ends at the LAST `@` before the path, so a password with an
    unescaped `@` or `:` is never taken for the host."""
    found = re.match(r"([A-Za-z][A-Za-z0-9+.-]*://)(.*)\Z", url, re.S)
    if found is None:
        return None
    scheme, rest = found.groups()
    rest, _, query = rest.partition("?")
    slash = rest.find("/")
    netloc, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    userinfo, at, host = netloc.rpartition("@")
    return scheme, userinfo if at else "", host + path, query


def _url_secrets(url: str) -> list[str]:
    """The secret values `url` carries: its user-info password and its secret query values,
    as written and percent-decoded."""
    from urllib.parse import unquote

    parts = _split_url(url)
    if parts is None:
        return []
    _, userinfo, _, query = parts
    values = []
    if ":" in userinfo:
        password = userinfo.split(":", 1)[1]
        # A malformed user-info (`us:er:secret@`, `u:p@secret@`): a driver may quote any piece.
        values += [password, *re.split(r"[:@]", password)]
    for pair in query.split("&"):
        key, eq, value = pair.partition("=")
        if eq and re.fullmatch(_SENSITIVE_PARAM, key, re.I):
            values.append(value)
    return [v for value in values for v in {value, unquote(value)} if v]


def remember_secrets(*urls: str | None) -> None:
    """Remember the secrets of `urls`, so `redact` hides them wherever they are quoted."""
    for url in urls:
        if url:
            _SECRETS.update(s for s in _url_secrets(url) if len(s) >= _MIN_SECRET)


def safe_url(url: str) -> str:
    """The URL for any message a person may see: the user-info's password and the value of
    every secret query parameter (`password`, `sslpassword`, `passfile`, tokens, ...) masked.
    The one function every URL is rendered through; it never fails, whatever the URL."""
    remember_secrets(url)
    parts = _split_url(url)
    if parts is None:
        return redact_text(url)
    scheme, userinfo, rest, query = parts
    if ":" in userinfo:
        userinfo = f"{userinfo.split(':', 1)[0]}:{_MASK}"
    pairs = []
    for pair in query.split("&") if query else []:
        key, eq, _ = pair.partition("=")
        pairs.append(f"{key}={_MASK}" if eq and re.fullmatch(_SENSITIVE_PARAM, key, re.I) else pair)
    return f"{scheme}{userinfo + '@' if userinfo else ''}{rest}{'?' + '&'.join(pairs) if pairs else ''}"


def redact_text(text: str) -> str:
    """`text` with every URL in it rendered by `safe_url`, every `password=...`-like pair
    (a libpq conninfo, a query string) masked, and every remembered secret replaced."""
    if not text:
        return text
    text = _URL.sub(lambda m: _safe_url_only(m.group(0)), text)
    text = _SECRET_PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}{_MASK}", text)
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return text


def _safe_url_only(url: str) -> str:
    parts = _split_url(url)
    if parts is None:
        return url
    return safe_url(url)


def redact(text: str | None) -> str | None:
    """`redact_text`, passing None through (for optional columns)."""
    return None if text is None else redact_text(text)


def scrub(message: str, url: str) -> str:
    """A driver message about `url` for people: its first line, with every secret hidden."""
    remember_secrets(url)
    first = message.strip().splitlines()[0] if message.strip() else message
    return redact_text(first)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for another database, memory or a `file:` URI)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(
    url: str,
    *,
    create: bool = False,
    wal: bool = True,
    timeout_seconds: float | None = None,
    readonly: bool = False,
) -> Engine:
    """An engine for `url`. SQLite gets a busy timeout, `BEGIN IMMEDIATE` transactions (so two
    writers queue instead of deadlocking) and, when `wal`, the WAL journal; a missing SQLite
    file is an error unless `create`. `timeout_seconds` bounds how long a statement may wait:
    SQLite's busy timeout, PostgreSQL's connect, statement and lock timeouts (default: a 15 s
    busy timeout on SQLite, a 5 s connect timeout and no statement limit on PostgreSQL, whose
    connections always get TCP keepalives and `tcp_user_timeout`: `PG_CONNECTION_BOUNDS`).
    `readonly` (SQLite): open the file read-only and write nothing on connect (no WAL pragma),
    so an archived journal or a read-only user can be read (`readonly_sqlite_engine`).
    PostgreSQL connections never use prepared statements (`prepare_threshold=None`): a pooler
    in transaction pooling (PgBouncer) runs each transaction on any server connection, where
    psycopg's automatic prepared statements do not exist; the control plane's statements are
    few, so parsing each is no cost worth a setting."""
    remember_secrets(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a non-numeric port
        raise ConfigError(f"database URL '{safe_url(url)}' is not a valid SQLAlchemy URL") from exc
    sqlite_file = sqlite_path(url)
    if sqlite_file is not None and not create and not sqlite_file.exists():
        raise DatabaseUnavailable(
            f"database file {sqlite_file.absolute()} does not exist: run `migration-fsm db upgrade` to"
            " create it (a relative path in a config file is relative to that file's folder)"
        )
    if readonly and sqlite_file is not None:
        return readonly_sqlite_engine(sqlite_file, timeout_seconds)
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in (
        "",
        "psycopg2",
    ):
        parsed = parsed.set(drivername="postgresql+psycopg")
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        bounds = {name: value for name, value in PG_CONNECTION_BOUNDS.items() if name not in parsed.query}
        kwargs["connect_args"] = {"connect_timeout": 5, "prepare_threshold": None, **bounds}
        if timeout_seconds is not None:
            ms = max(1, int(timeout_seconds * 1000))
            given = parsed.query.get("options", "")  # e.g. a search_path: kept, not replaced
            options = [given] if isinstance(given, str) else list(given)
            options += [f"-c statement_timeout={ms}", f"-c lock_timeout={ms}"]
            kwargs["connect_args"] = {
                "prepare_threshold": None,
                "connect_timeout": max(1, round(timeout_seconds)),
                "options": " ".join(option for option in options if option),
                **bounds,
            }
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ConfigError(f"database URL '{safe_url(url)}' is not usable: {exc}") from exc
    except ImportError as exc:  # the URL names a driver that is not installed
        raise ConfigError(
            f"database URL '{safe_url(url)}' needs the Python module '{exc.name or exc}', which is not"
            " installed: install it, or name a driver that is (sqlite://, postgresql+psycopg://)"
        ) from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect_wal if wal else _sqlite_on_connect)
        if timeout_seconds is not None:
            busy = max(1, int(timeout_seconds * 1000))

            def _bounded(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:  # noqa: ARG001  "connect" event
                dbapi_connection.execute(f"PRAGMA busy_timeout = {busy}")

            event.listen(engine, "connect", _bounded)  # after the default one: it wins
        event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def readonly_sqlite_engine(path: Path, timeout_seconds: float | None = None) -> Engine:
    """An engine that reads the SQLite file `path` and never writes it, nor anything beside it
    that it can avoid. A database in WAL mode needs its `-shm` file to be read; when the file
    or its folder is read-only and there is none (an archived journal, a read-only on-call
    user), the file is read as it is (`immutable=1`): right for a journal nobody writes any
    more, and the only way to read one at all without write access."""
    uri = path.absolute().as_uri()
    busy = SQLITE_BUSY_TIMEOUT_MS / 1000 if timeout_seconds is None else timeout_seconds

    def connect() -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=busy, check_same_thread=False)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opens the WAL index
            return conn
        except sqlite3.OperationalError:
            return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, check_same_thread=False)

    engine = create_engine(f"sqlite:///{path}", creator=connect)
    busy_ms = max(1, int(busy * 1000))

    def _on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        _sqlite_on_connect(dbapi_connection, record)
        dbapi_connection.execute(f"PRAGMA busy_timeout = {busy_ms}")  # `timeout_seconds`, not the default

    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _sqlite_on_begin_readonly)
    return engine


def _sqlite_on_begin_readonly(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN")


def _sqlite_on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:  # noqa: ARG001  "connect" event
    # Let SQLAlchemy's "begin" event emit BEGIN itself (see _sqlite_on_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_on_connect_wal(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    # WAL lets PhaseClients read while an operator writes; only for our own database
    # (a user's task database keeps whatever journal mode it has).
    _sqlite_on_connect(dbapi_connection, record)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    readonly = conn.get_execution_options().get("mfsm_readonly", False)
    conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")
