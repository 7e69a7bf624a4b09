"""Connections to the migration database: engines, the UTC timestamp type, URL scrubbing.

SQLite gets a busy timeout, `BEGIN IMMEDIATE` write transactions and (for our own database)
the WAL journal; PostgreSQL URLs get the psycopg 3 driver and a connect timeout.
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


def safe_url(url: str) -> str:
    """The URL with its password masked, for any message a person may see."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # ValueError: a non-numeric port
        return re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", url)


def scrub(message: str, url: str) -> str:
    """Remove the password of `url` from a driver message, and keep its first line."""
    try:
        password = make_url(url).password
    except (ArgumentError, ValueError):
        password = None
    first = message.strip().splitlines()[0] if message.strip() else message
    if password:
        first = first.replace(str(password), "***")
    return first


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
    SQLite's busy timeout, PostgreSQL's connect, statement and lock timeouts (default: a 30 s
    busy timeout on SQLite, a 5 s connect timeout and no statement limit on PostgreSQL).
    `readonly` (SQLite): open the file read-only and write nothing on connect (no WAL pragma),
    so an archived journal or a read-only user can be read (`readonly_sqlite_engine`).
    PostgreSQL connections never use prepared statements (`prepare_threshold=None`): a pooler
    in transaction pooling (PgBouncer) runs each transaction on any server connection, where
    psycopg's automatic prepared statements do not exist; the control plane's statements are
    few, so parsing each is no cost worth a setting."""
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
        kwargs["connect_args"] = {"connect_timeout": 5, "prepare_threshold": None}
        if timeout_seconds is not None:
            ms = max(1, int(timeout_seconds * 1000))
            given = parsed.query.get("options", "")  # e.g. a search_path: kept, not replaced
            options = [given] if isinstance(given, str) else list(given)
            options += [f"-c statement_timeout={ms}", f"-c lock_timeout={ms}"]
            kwargs["connect_args"] = {
                "prepare_threshold": None,
                "connect_timeout": max(1, round(timeout_seconds)),
                "options": " ".join(option for option in options if option),
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
    event.listen(engine, "connect", _sqlite_on_connect)
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
