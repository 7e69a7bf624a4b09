"""Input that used to end in a traceback (exit 70, "this is a bug") is one line with its own
exit code: bad config or input 2, an environment problem 4; the database stays as it was."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from migration_fsm.journal import make_engine
from tests.support.cli import CliResult


def one_line(result: CliResult, code: int, *says: str) -> None:
    assert code == result.code, result.stderr
    assert "Traceback" not in result.stderr
    assert "this is a bug" not in result.stderr
    for words in says:
        assert words in result.error_line, result.error_line


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ("lease_seconds = inf\n", "'lease_seconds'"),
        ("lease_seconds = 1e308\n", "'lease_seconds'"),
        ("min_soak_seconds = nan\n", "'min_soak_seconds'"),
        ("backfill_batch_size = 1e20\n", "'backfill_batch_size'"),
        ("drain_timeout_seconds = 1e300\n", "'drain_timeout_seconds'"),
    ],
)
def test_numbers_no_clock_can_hold_are_bad_config(
    upgraded_url: str, cli: Callable[..., CliResult], tmp_path: Path, toml: str, says: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml, encoding="utf-8")
    one_line(cli("status", "--db", upgraded_url, "--config", str(config)), 2, says)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://user@localhost/db", "SQLite or PostgreSQL"),
        ("postgresql+asyncpg://user@localhost/db", "'asyncpg', which is not installed"),
        ("postgresql+pg8000://user@localhost/db", "'pg8000', which is not installed"),
    ],
)
def test_a_database_url_we_cannot_use_is_bad_input(
    cli: Callable[..., CliResult], url: str, says: str
) -> None:
    one_line(cli("status", "--db", url), 2, says)


def test_environment_variables_are_checked_like_config_keys(
    upgraded_url: str, cli: Callable[..., CliResult]
) -> None:
    unknown = cli("status", "--db", upgraded_url, env={"MIGRATION_FSM_LEASE_SECOND": "10"})
    one_line(unknown, 2, "MIGRATION_FSM_LEASE_SECOND is not a known setting")
    malformed = cli("status", "--db", upgraded_url, env={"MIGRATION_FSM_STORES": "{bad"})
    one_line(malformed, 2, "MIGRATION_FSM_STORES is invalid")


def test_demo_dir_under_a_file_is_bad_input(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    (tmp_path / "FILE").write_text("x", encoding="utf-8")
    one_line(cli("demo", "--dir", str(tmp_path / "FILE" / "sub"), "--tasks", "10"), 2, "cannot use --dir")


def test_a_schema_of_a_newer_version_is_not_upgraded(
    upgraded_url: str, cli: Callable[..., CliResult]
) -> None:
    """`db upgrade` (and every command) on a database a newer migration-fsm wrote: exit 4, the
    revision named, the database untouched."""
    engine = make_engine(upgraded_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    for command in (("db", "upgrade"), ("status",)):
        one_line(cli(*command, "--db", upgraded_url), 4, "revision 9999", "does not know")
    with engine.connect() as conn:
        assert "9999" == conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()


def test_tables_without_a_schema_revision_are_not_upgraded(
    upgraded_url: str, cli: Callable[..., CliResult]
) -> None:
    engine = make_engine(upgraded_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
    for command in (("db", "upgrade"), ("status",)):
        one_line(cli(*command, "--db", upgraded_url), 4, "no schema revision", "restore")
    engine.dispose()
