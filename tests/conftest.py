"""Shared fixtures: every persistence test runs on SQLite and on PostgreSQL.

PostgreSQL is `MIGRATION_FSM_TEST_POSTGRES_URL` (default: the local server's `test`
database). Each test session creates a database of its own and drops it at the end; each
test gets a fresh schema in it (through `search_path`). When `CI` is set, an unreachable
PostgreSQL fails the run instead of skipping.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from migration_fsm.config import Settings, load_settings
from migration_fsm.journal import Journal, make_engine
from migration_fsm.migration import Migration

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_ADMIN_URL = os.environ.get("MIGRATION_FSM_TEST_POSTGRES_URL", DEFAULT_PG)
ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture
def upgraded_url(db_url: str) -> str:
    """A database whose schema is at the Alembic head."""
    store = Journal(db_url, engine=make_engine(db_url, create=True))
    store.upgrade()
    store.close()
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


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def error_line(self) -> str:
        """The one `error: ...` line the CLI prints on failure."""
        lines = [line for line in self.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, self.stderr
        return lines[0]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, subprocess: bool = False
) -> CliResult:
    """Run the CLI with ARGS: in this process through `migration_fsm.cli.main` (the default),
    or, with `subprocess=True`, as `python -m migration_fsm ARGS` as a user runs it. Either way
    the `MIGRATION_FSM_*` variables of our environment are left out and `env` is added."""
    if subprocess:
        return run_cli_process(*args, env=env, timeout=timeout)
    return run_cli_in_process(*args, env=env)


def run_cli_process(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
    """Run `python -m migration_fsm ARGS` in a subprocess, as a user runs it."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATION_FSM_")}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "migration_fsm", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


#: One in-process run at a time: a run swaps sys.stdout, sys.stderr and os.environ.
_IN_PROCESS = threading.Lock()


def run_cli_in_process(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """Run `migration_fsm.cli.main(ARGS)` here, with stdout, stderr and the environment of a
    subprocess, and the logging configuration it changes put back afterwards."""
    from migration_fsm.cli import main

    overrides: dict[str, str | None] = {k: None for k in os.environ if k.startswith("MIGRATION_FSM_")}
    overrides.update(env or {})
    runner = CliRunner()
    with _IN_PROCESS:
        logging_before = structlog.get_config()
        try:
            with runner.isolation(env=overrides) as (stdout, stderr, _):
                code = main(list(args))
                sys.stdout.flush()
                sys.stderr.flush()
                result = CliResult(code, stdout.getvalue().decode(), stderr.getvalue().decode())
        finally:
            structlog.reset_defaults()
            structlog.configure(**logging_before)
    return result


@pytest.fixture
def cli() -> Callable[..., CliResult]:
    """The CLI, run in this process unless called with `subprocess=True` (see `run_cli`)."""
    return run_cli
