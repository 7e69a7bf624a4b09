"""Shared fixtures: every persistence test runs on SQLite and on PostgreSQL.

PostgreSQL is `MIGRATION_FSM_TEST_POSTGRES_URL` (default: the local server's `test`
database). Each test session creates a database of its own and drops it at the end; each
test gets a fresh schema in it (through `search_path`). When `CI` is set, an unreachable
PostgreSQL fails the run instead of skipping.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from migration_fsm.config import Settings, load_settings
from migration_fsm.journal import Journal, make_engine
from migration_fsm.migration import Migration
from tests.support import PG_ADMIN_URL
from tests.support.cli import CliResult, run_cli


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The URL of a PostgreSQL database created for this test session."""
    name = f"mfsm_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        message = f"PostgreSQL at {make_url(PG_ADMIN_URL).render_as_string()} is unreachable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database (no schema): a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mfsm.db'}"
        return
    base = request.getfixturevalue("pg_database")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{base}?options=-csearch_path%3D{schema}"
    with engine.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


def alembic_upgrade(url: str) -> list[tuple[str, Any, bool]]:
    """Upgrade `url` to the Alembic head as `db upgrade` does; returns every statement it
    sent (text, parameters, executemany), in order."""
    engine = make_engine(url, create=True)
    sent: list[tuple[str, Any, bool]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any, many: bool) -> None:
        sent.append((statement, parameters, many))

    store = Journal(url, engine=engine)
    store.upgrade()
    store.close()
    return sent


@pytest.fixture(scope="session")
def head_schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Alembic head, made once per test session (per xdist worker) by a real upgrade:
    a SQLite file to copy, and the statements the PostgreSQL upgrade sent, to send again into
    each test's schema (`upgraded_url`). About 0.1 s (SQLite) and 0.2 s (PostgreSQL) less per
    test than running Alembic each time; `alembic_upgraded_url` still runs it."""
    template = tmp_path_factory.mktemp("head") / "mfsm.db"
    alembic_upgrade(f"sqlite:///{template}")
    return {"sqlite": template, "postgresql": None}


def _postgresql_head(
    head_schema: dict[str, Any], request: pytest.FixtureRequest
) -> list[tuple[str, Any, bool]]:
    if head_schema["postgresql"] is None:
        base = request.getfixturevalue("pg_database")
        schema = f"head_{uuid.uuid4().hex[:12]}"
        admin = create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        admin.dispose()
        head_schema["postgresql"] = alembic_upgrade(f"{base}?options=-csearch_path%3D{schema}")
    statements: list[tuple[str, Any, bool]] = head_schema["postgresql"]
    return statements


@pytest.fixture
def alembic_upgraded_url(db_url: str) -> str:
    """A database brought to the Alembic head by Alembic itself (`db upgrade`)."""
    alembic_upgrade(db_url)
    return db_url


@pytest.fixture
def upgraded_url(db_url: str, head_schema: dict[str, Any], request: pytest.FixtureRequest) -> str:
    """A database whose schema is at the Alembic head: a copy of the session's upgraded
    SQLite file, or the session's PostgreSQL upgrade sent again into this test's schema."""
    if db_url.startswith("sqlite"):
        with (
            closing(sqlite3.connect(head_schema["sqlite"])) as source,
            closing(sqlite3.connect(db_url.removeprefix("sqlite:///"))) as copy,
        ):
            source.backup(copy)
        return db_url
    statements = _postgresql_head(head_schema, request)
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            for statement, parameters, many in statements:
                if many:
                    cursor.executemany(statement, parameters)
                else:
                    cursor.execute(statement, parameters or None)
    finally:
        engine.dispose()
    return db_url


@pytest.fixture
def store(upgraded_url: str) -> Iterator[Journal]:
    """An open store on an upgraded database."""
    with Journal.open(upgraded_url) as opened:
        yield opened


@pytest.fixture
def make_settings(upgraded_url: str) -> Callable[..., Settings]:
    """Settings for the test database; keyword arguments override any setting."""

    def make(**overrides: Any) -> Settings:
        overrides.setdefault("actor", "tester")
        overrides.setdefault("database_url", upgraded_url)
        return load_settings(None, **overrides)

    return make


@pytest.fixture
def engine(store: Journal, make_settings: Callable[..., Settings]) -> Migration:
    """An engine on migration `default`, already created in `preparation`."""
    eng = Migration(store, make_settings(), "default")
    eng.init()
    return eng


@pytest.fixture
def cli() -> Callable[..., CliResult]:
    """The CLI, run in this process unless called with `subprocess=True` (see `run_cli`)."""
    return run_cli


@pytest.fixture
def local_time_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone set to UTC+05:30 (a POSIX TZ string: no tz database
    needed), and back to what it was afterwards: what is stored or hashed in UTC must not
    depend on the machine's time zone."""
    monkeypatch.setenv("TZ", "IST-05:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()
