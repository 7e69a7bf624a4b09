"""Text from the database or an operator (names, reasons, step errors, task keys) reaches the
terminal as written: rich markup in it is not interpreted (and cannot crash a table), and
control characters are shown visibly (`\\x1b`), never sent raw."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from migration_fsm.log import visible
from migration_fsm.tasks.records import TaskRecord, TaskStatus
from migration_fsm.tasks.sql import SqlTaskStore
from tests.support.cli import CliResult
from tests.support.datatools import create_task_table, sql_stores, write_stores_config
from tests.support.steps import FAIL_ENV

CLEAR: str = "\x1b[2J"  # clears the operator's screen
HOSTILE: tuple[str, ...] = (f"evil{CLEAR}", "[/x]", "[red]alarm[/red]", "rtl\u202eevil", "bell\x07")


def no_raw_controls(result: CliResult) -> None:
    for stream in (result.stdout, result.stderr):
        assert "\x1b" not in stream
        assert "\x07" not in stream
        assert "\u202e" not in stream


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_migration_name_is_shown_as_written(
    upgraded_url: str, cli: Callable[..., CliResult], name: str
) -> None:
    for command in (("init",), ("status",), ("history",), ("verify",), ("advance",), ("history",)):
        result = cli(*command, "-m", name, "--db", upgraded_url)
        assert 0 == result.code, (command, result.stderr)
        no_raw_controls(result)
        assert visible(name) in " ".join(result.stdout.split()) or command == ("advance",)
    unknown = cli("status", "-m", f"{name}-nope", "--db", upgraded_url)
    assert 2 == unknown.code
    no_raw_controls(unknown)
    assert visible(f"{name}-nope") in unknown.error_line


def test_reasons_errors_and_keys_are_shown_as_written(
    upgraded_url: str, cli: Callable[..., CliResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_task_table(upgraded_url, "old_tasks")
    create_task_table(upgraded_url, "new_tasks")
    at = TaskRecord(
        key="k", type="t", payload={}, status=TaskStatus.PENDING, created_at=_now(), updated_at=_now()
    )
    with SqlTaskStore(upgraded_url, "old_tasks", name="old") as old:
        old.put_many([at.model_copy(update={"key": f"key{CLEAR}[/b]"}), at])
    config = write_stores_config(
        tmp_path / "c.toml",
        sql_stores(upgraded_url),
        ["[steps]", '"preparation->dual_write" = ["tests.support.steps:flaky"]'],
    )
    common = ("--db", upgraded_url, "--config", config)
    assert 0 == cli("init", *common).code
    monkeypatch.setenv(FAIL_ENV, "1")
    failed = cli("advance", *common, "--reason", f"go {CLEAR}[bold]now[/bold]")
    assert 1 == failed.code
    no_raw_controls(failed)
    monkeypatch.delenv(FAIL_ENV)
    status = cli("status", *common)
    assert 0 == status.code, status.stderr
    no_raw_controls(status)
    assert 0 == cli("resume", *common).code
    history = cli("history", *common)
    assert 0 == history.code, history.stderr
    no_raw_controls(history)
    assert "\\x1b" in history.stdout  # shown, escaped (the cell may wrap the rest)
    validate = cli("validate", *common)
    assert 1 == validate.code  # tasks missing on new
    no_raw_controls(validate)
    assert "\\x1b" in validate.stdout


def _now() -> datetime:
    return datetime.now(UTC)
