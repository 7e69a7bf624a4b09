"""Connections to the migration database (`journal/db.py`), on SQLite: the URL checks and
their messages, the pragmas every connection gets, `BEGIN IMMEDIATE` for a write and `BEGIN`
for a read, the UTC timestamp type, and the first line of a driver message. The secrets'
masking is `test_secrets.py`; the PostgreSQL connection arguments are checked against a
server by `test_fast_paths.py` and the system tests."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import Column, MetaData, Table, event, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError

from migration_fsm.exceptions import ConfigError, DatabaseUnavailable
from migration_fsm.journal import db as journal_db
from migration_fsm.journal.db import UTCDateTime, make_engine, scrub, sqlite_path, utcnow

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy import Engine


SQLITE = sqlite.dialect()
POSTGRESQL = postgresql.dialect()  # type: ignore[no-untyped-call]


@pytest.fixture
def file_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mfsm.db'}"


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    """Engines made by a test, disposed of at its end."""
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.dispose()


def _pragmas(engine: Engine) -> tuple[int, int, str]:
    with engine.connect() as conn:
        return (
            conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one(),
            conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one(),
            conn.exec_driver_sql("PRAGMA journal_mode").scalar_one(),
        )


# -- URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///relative.db", Path("relative.db")),
        ("sqlite:////abs/olute.db", Path("/abs/olute.db")),
        ("sqlite+pysqlite:///x.db", Path("x.db")),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("sqlite:///file:x.db?mode=ro&uri=true", None),
        ("mysql://u@h/x.db", None),
    ],
)
def test_sqlite_path_is_the_file_of_a_sqlite_url_only(url: str, path: Path | None) -> None:
    assert path == sqlite_path(url)


def test_a_url_that_does_not_parse_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        make_engine("not a url")
    assert "database URL 'not a url' is not a valid SQLAlchemy URL" == str(info.value)
    with pytest.raises(ConfigError) as port:
        make_engine("postgresql://u:S3cret@h:port/db")
    assert "database URL 'postgresql://u:***@h:port/db' is not a valid SQLAlchemy URL" == str(port.value)


def test_a_missing_sqlite_file_is_unavailable_unless_created(tmp_path: Path, engines: list[Engine]) -> None:
    url = f"sqlite:///{tmp_path / 'missing.db'}"
    for readonly in (False, True):
        with pytest.raises(DatabaseUnavailable) as info:
            make_engine(url, readonly=readonly)
        assert (
            f"database file {tmp_path / 'missing.db'} does not exist: run `migration-fsm db upgrade` to"
            " create it (a relative path in a config file is relative to that file's folder)"
        ) == str(info.value)
    assert not (tmp_path / "missing.db").exists()
    engines.append(make_engine(url, create=True))
    with engines[0].connect():
        assert (tmp_path / "missing.db").exists()


def test_a_driver_that_is_not_installed_or_unknown_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as missing:
        make_engine("mysql+pymysql://u:S3cret@h/db")
    assert (
        "database URL 'mysql+pymysql://u:***@h/db' needs the Python module 'pymysql', which is not"
        " installed: install it, or name a driver that is (sqlite://, postgresql+psycopg://)"
    ) == str(missing.value)
    with pytest.raises(ConfigError, match=r"^database URL 'nosuch://h/db' is not usable: "):
        make_engine("nosuch://h/db")


# (no "postgresql" in the names: mutmut's selection leaves such tests out, `-k "not postgresql"`)
@pytest.mark.parametrize(
    "url", ["postgresql://u@h/db", "postgresql+psycopg2://u@h/db"], ids=["bare", "psycopg2"]
)
def test_a_pg_url_gets_the_psycopg_3_driver(url: str, engines: list[Engine]) -> None:
    engines.append(make_engine(url))
    assert ("postgresql", "psycopg") == (engines[0].dialect.name, engines[0].dialect.driver)


class _Connecting(Exception):
    """Raised instead of connecting: the arguments were what the test wanted."""


def _pg_connect_args(url: str, engines: list[Engine], **options: float) -> dict[str, object]:
    """The keyword arguments `make_engine` gives psycopg for `url`, with no server: caught at
    SQLAlchemy's `do_connect`, before anything is dialled."""
    engine = make_engine(url, **options)  # type: ignore[arg-type]
    engines.append(engine)
    seen: dict[str, object] = {}

    def capture(dialect: object, record: object, cargs: object, cparams: dict[str, object]) -> None:
        seen.update(cparams)
        seen.pop("context", None)  # SQLAlchemy's own type adapters
        raise _Connecting

    event.listen(engine, "do_connect", capture)
    with pytest.raises(_Connecting):
        engine.connect()
    return seen


# A partition must fail a statement instead of hanging it (keepalives, tcp_user_timeout), a
# pooler must not meet prepared statements, and `timeout_seconds` bounds the connect, each
# statement and each lock wait (docs/REFERENCE.md, `make_engine`). No server needed: the
# names avoid the word mutmut's selection leaves out (see above).
def test_a_pg_connection_is_bounded_and_prepares_nothing(engines: list[Engine]) -> None:
    assert {
        "host": "h",
        "dbname": "db",
        "user": "u",
        "connect_timeout": 5,
        "prepare_threshold": None,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": 30_000,
    } == _pg_connect_args("postgresql://u@h/db", engines)


def test_a_pg_url_s_own_connection_bounds_win(engines: list[Engine]) -> None:
    args = _pg_connect_args("postgresql://u@h/db?keepalives_idle=60&tcp_user_timeout=0", engines)
    assert ("60", "0") == (args["keepalives_idle"], args["tcp_user_timeout"])
    assert (1, 5, 3, 5) == (
        args["keepalives"],
        args["keepalives_interval"],
        args["keepalives_count"],
        args["connect_timeout"],
    )
    bounded = _pg_connect_args("postgresql://u@h/db?keepalives=0", engines, timeout_seconds=2)
    assert ("0", 10) == (bounded["keepalives"], bounded["keepalives_idle"])


@pytest.mark.parametrize(
    ("seconds", "ms", "connect"), [(2.5, 2500, 2), (3.7, 3700, 4), (0.0001, 1, 1)], ids=["2.5", "3.7", "tiny"]
)
def test_timeout_seconds_bounds_a_pg_connect_statement_and_lock_wait(
    engines: list[Engine], seconds: float, ms: int, connect: int
) -> None:
    assert {
        "host": "h",
        "dbname": "db",
        "user": "u",
        "connect_timeout": connect,
        "prepare_threshold": None,
        "options": f"-c statement_timeout={ms} -c lock_timeout={ms}",
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": 30_000,
    } == _pg_connect_args("postgresql+psycopg://u@h/db", engines, timeout_seconds=seconds)


def test_timeout_seconds_keeps_the_options_a_pg_url_gives(engines: list[Engine]) -> None:
    one = _pg_connect_args("postgresql://u@h/db?options=-c%20search_path%3Dx", engines, timeout_seconds=1)
    assert "-c search_path=x -c statement_timeout=1000 -c lock_timeout=1000" == one["options"]
    both = "options=-c%20search_path%3Dx&options=-c%20work_mem%3D8MB"
    two = _pg_connect_args(f"postgresql://u@h/db?{both}", engines, timeout_seconds=1)
    assert "-c search_path=x -c work_mem=8MB -c statement_timeout=1000 -c lock_timeout=1000" == two["options"]


# -- SQLite connections -------------------------------------------------------------------------


def test_a_sqlite_connection_waits_enforces_foreign_keys_and_uses_wal(
    file_url: str, engines: list[Engine]
) -> None:
    engines.append(make_engine(file_url, create=True))
    assert (15_000, 1, "wal") == _pragmas(engines[0])


def test_a_task_database_keeps_its_journal_mode(tmp_path: Path, engines: list[Engine]) -> None:
    engines.append(make_engine(f"sqlite:///{tmp_path / 'tasks.db'}", create=True, wal=False))
    assert (15_000, 1, "delete") == _pragmas(engines[0])


@pytest.mark.parametrize(("seconds", "ms"), [(2.5, 2500), (0.0001, 1)])
def test_timeout_seconds_is_the_busy_timeout(
    file_url: str, engines: list[Engine], seconds: float, ms: int
) -> None:
    engines.append(make_engine(file_url, create=True, timeout_seconds=seconds))
    assert (ms, 1, "wal") == _pragmas(engines[0])


def test_a_write_transaction_takes_the_write_lock_up_front_and_a_read_does_not(
    file_url: str, engines: list[Engine]
) -> None:
    writer = make_engine(file_url, create=True)
    engines.append(writer)
    with writer.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.commit()
    other = make_engine(file_url, timeout_seconds=0.05)
    engines.append(other)
    with writer.begin():  # writes nothing yet, but holds the write lock
        with pytest.raises(OperationalError, match="database is locked"), other.begin():
            pass
        with other.connect() as reader:
            reader.execution_options(mfsm_readonly=True)
            with reader.begin():
                assert 0 == reader.execute(text("SELECT count(*) FROM t")).scalar_one()


def test_a_readonly_engine_reads_and_never_writes(file_url: str, engines: list[Engine]) -> None:
    writer = make_engine(file_url, create=True)
    engines.append(writer)
    with writer.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    readonly = make_engine(file_url, readonly=True)
    engines.append(readonly)
    with readonly.connect() as conn:
        assert 1 == conn.execute(text("SELECT x FROM t")).scalar_one()
        assert 1 == conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one()
    with pytest.raises(OperationalError, match="readonly database"), readonly.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (2)")
    # a writer holding the write lock does not keep the read-only engine from reading
    with writer.begin() as held:
        held.exec_driver_sql("INSERT INTO t VALUES (3)")
        with readonly.begin() as conn:
            assert [1] == list(conn.execute(text("SELECT x FROM t")).scalars())


# -- timestamps ----------------------------------------------------------------------------------


def test_utcnow_is_aware_utc() -> None:
    assert timedelta(0) == utcnow().utcoffset()


def test_a_timestamp_is_stored_naive_utc_on_sqlite_and_aware_on_pg(local_time_zone: None) -> None:
    kolkata = datetime(2026, 3, 1, 17, 30, 0, 7, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    utc = datetime(2026, 3, 1, 12, 0, 0, 7)
    column = UTCDateTime()
    assert utc == column.process_bind_param(kolkata, SQLITE)
    on_postgresql = column.process_bind_param(kolkata, POSTGRESQL)
    assert on_postgresql is not None
    assert (utc, timedelta(0)) == (on_postgresql.replace(tzinfo=None), on_postgresql.utcoffset())
    assert column.process_bind_param(None, SQLITE) is None


def test_a_timestamp_reads_back_as_aware_utc_whatever_the_local_time_zone(local_time_zone: None) -> None:
    column = UTCDateTime()
    naive = datetime(2026, 3, 1, 12, 0)
    aware = datetime(2026, 3, 1, 17, 30, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    for stored in (naive, aware):
        read = column.process_result_value(stored, SQLITE)
        assert read is not None
        assert (datetime(2026, 3, 1, 12, 0), timedelta(0)) == (read.replace(tzinfo=None), read.utcoffset())
    assert column.process_result_value(None, SQLITE) is None


def test_a_timestamp_round_trips_through_sqlite(file_url: str, engines: list[Engine]) -> None:
    engine = make_engine(file_url, create=True)
    engines.append(engine)
    at = datetime(2026, 3, 1, 17, 30, 0, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    table = Table("t", MetaData(), Column("at", UTCDateTime()))
    with engine.begin() as conn:
        table.create(conn)
        conn.execute(table.insert().values(at=at))
    with engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT at FROM t").scalar_one()
        read = conn.execute(select(table.c.at)).scalar_one()
    assert "2026-03-01 12:00:00.123456" == stored
    assert at == read
    assert timedelta(0) == read.utcoffset()


# -- driver messages --------------------------------------------------------------------------------


def test_scrub_keeps_the_first_line_without_secrets() -> None:
    journal_db._SECRETS.clear()
    url = "postgresql://u:S3cretPw@h/db"
    message = "  connection to h failed: password S3cretPw rejected\nDETAIL: more\n"
    assert "connection to h failed: password *** rejected" == scrub(message, url)
    assert "" == scrub("", url)
    assert "   " == scrub("   ", url)
    journal_db._SECRETS.clear()


@pytest.mark.parametrize(("seconds", "ms"), [(None, 15_000), (0.25, 250), (0.0001, 1)])
def test_a_readonly_engine_waits_timeout_seconds(
    file_url: str, engines: list[Engine], seconds: float | None, ms: int
) -> None:
    """The read-only engine's busy timeout is `timeout_seconds` too (it was always 15 s)."""
    with make_engine(file_url, create=True).connect() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.commit()
    engines.append(make_engine(file_url, readonly=True, timeout_seconds=seconds))
    with engines[0].connect() as conn:
        assert ms == conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()


def test_a_readonly_engine_s_connections_serve_any_thread(file_url: str, engines: list[Engine]) -> None:
    """A pooled read-only connection opened by one thread is reused by another (a watch round, a
    PhaseClient's poller)."""
    with make_engine(file_url, create=True).begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    engines.append(make_engine(file_url, readonly=True))
    with engines[0].connect() as conn:  # opened here, then back in the pool
        assert 0 == conn.execute(text("SELECT count(*) FROM t")).scalar_one()
    counted: list[int] = []

    def count() -> None:
        with engines[0].connect() as conn:
            counted.append(conn.execute(text("SELECT count(*) FROM t")).scalar_one())

    reader = threading.Thread(target=count)
    reader.start()
    reader.join()
    assert [0] == counted
