"""Errors through the CLI keep their tracebacks: a failing step's goes to the log, `--traceback`
prints it, and an error that is not a `MigrationFSMError` (a bug) exits 70, not 1.

Also checks that the in-process runner of `tests.conftest` behaves as a subprocess would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from migration_fsm import commands
from migration_fsm.exceptions import UNEXPECTED_ERROR_EXIT_CODE
from tests.support.cli import CliResult
from tests.support.steps import FAIL_ENV

FLAKY = "tests.support.steps:flaky"
LEAKY = "tests.unit.test_cli_errors:leaky"
BUG = "the status report fell over"
SECRET = "s3cret-in-a-local"  # noqa: S105 - a fake password the test looks for in the log


def leaky(ctx: Any) -> None:
    """A step that fails with a password in a local variable (and its settings in `ctx`)."""
    password = SECRET
    raise RuntimeError(f"cannot log in ({len(password)} characters)")


def failing_step_config(tmp_path: Path) -> str:
    path = tmp_path / "steps.toml"
    path.write_text(f'[steps]\n"preparation->dual_write" = ["{FLAKY}"]\n', encoding="utf-8")
    return str(path)


@pytest.fixture
def buggy_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """`status` raises an error migration-fsm does not expect (in this process only)."""

    def status(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError(BUG)

    monkeypatch.setattr(commands, "status", status)


def test_unexpected_error_exits_70_with_one_line_saying_it_is_a_bug(
    upgraded_url: str, cli: Callable[..., CliResult], buggy_status: None
) -> None:
    """No traceback by default: one `error: ` line naming the error, the bug and `--traceback`."""
    result = cli("status", "--db", upgraded_url)
    assert (70, "") == (result.code, result.stdout), result.stderr
    assert UNEXPECTED_ERROR_EXIT_CODE == result.code
    assert "Traceback" not in result.stderr
    line = result.error_line
    for words in ("ZeroDivisionError", BUG, "bug", "--traceback"):
        assert words in line, line


def test_traceback_option_prints_the_traceback_of_an_unexpected_error(
    upgraded_url: str, cli: Callable[..., CliResult], buggy_status: None
) -> None:
    """`--traceback` (before the command) prints where the error was raised, then the one line."""
    result = cli("--traceback", "status", "--db", upgraded_url)
    assert 70 == result.code, result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert f"ZeroDivisionError: {BUG}" in result.stderr
    assert "in status" in result.stderr  # the frame that raised
    assert "ZeroDivisionError" in result.error_line
    assert result.stderr.rstrip().splitlines()[-1] == result.error_line


def test_failing_step_exits_1_and_traceback_shows_the_step(
    upgraded_url: str, cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    """A failing step is not a bug (exit 1); `--traceback` shows the step's own frame as the cause."""
    config = failing_step_config(tmp_path)
    env = {FAIL_ENV: "1"}
    assert 0 == cli("init", "--db", upgraded_url).code
    plain = cli("advance", "--db", upgraded_url, "--config", config, env=env)
    assert 1 == plain.code, plain.stderr
    assert "Traceback" not in plain.stderr
    assert "injected failure" in plain.error_line

    assert 0 == cli("abort", "--reason", "again", "--db", upgraded_url, "--config", config).code
    shown = cli("--traceback", "advance", "--db", upgraded_url, "--config", config, env=env)
    assert 1 == shown.code, shown.stderr
    assert "Traceback (most recent call last)" in shown.stderr
    assert "RuntimeError: injected failure" in shown.stderr  # the cause, chained
    assert "in flaky" in shown.stderr
    assert "StepFailed" in shown.stderr
    assert "injected failure" in shown.error_line


def test_failing_step_logs_its_traceback_as_json(
    upgraded_url: str, cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    """The `step` event of a failed step carries the exception and its frames (dict_tracebacks)."""
    config = failing_step_config(tmp_path)
    assert 0 == cli("init", "--db", upgraded_url).code
    result = cli("advance", "--db", upgraded_url, "--config", config, env={FAIL_ENV: "1"})
    assert 1 == result.code, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    failed = [e for e in events if e["event"] == "step" and e.get("status") == "failed"]
    assert 1 == len(failed), events
    (exception,) = failed[0]["exception"]
    assert ("RuntimeError", "injected failure") == (exception["exc_type"], exception["exc_value"])
    assert "flaky" in [frame["name"] for frame in exception["frames"]]
    assert "exc_info" not in failed[0]


def test_logged_traceback_leaves_out_local_variables(
    upgraded_url: str, cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    """Frames' locals (settings, URLs, passwords) are not logged with a step's traceback."""
    config = tmp_path / "leaky.toml"
    config.write_text(f'[steps]\n"preparation->dual_write" = ["{LEAKY}"]\n', encoding="utf-8")
    assert 0 == cli("init", "--db", upgraded_url).code
    result = cli("advance", "--db", upgraded_url, "--config", str(config))
    assert 1 == result.code, result.stderr
    assert '"exception"' in result.stderr
    assert "leaky" in result.stderr
    assert SECRET not in result.stderr
    assert '"locals"' not in result.stderr


def test_console_log_renders_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    """On a terminal (plain rendering) the event is followed by the traceback itself."""
    from migration_fsm import log

    before = structlog.get_config()
    try:
        log.configure(json=False)
        try:
            raise RuntimeError("kaput")
        except RuntimeError as exc:
            log.get_logger(migration="m").error("step", status="failed", exc_info=exc)
    finally:
        structlog.reset_defaults()
        structlog.configure(**before)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "RuntimeError: kaput" in err
    assert "locals" not in err


# -- the in-process runner is faithful ----------------------------------------------------


def test_in_process_runs_hide_our_settings_and_restore_logging(
    upgraded_url: str, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our `MIGRATION_FSM_*` variables are not seen, `env` is, and logging is put back after."""
    monkeypatch.setenv("MIGRATION_FSM_LEASE_SECONDS", "not a number")  # would exit 2 if seen
    before = structlog.get_config()
    result = cli("init", "--db", upgraded_url, env={"MIGRATION_FSM_ACTOR": "from-env"})
    assert 0 == result.code, result.stderr
    assert before == structlog.get_config()
    assert "not a number" == os.environ["MIGRATION_FSM_LEASE_SECONDS"]
    assert "MIGRATION_FSM_ACTOR" not in os.environ
    events = [json.loads(line) for line in result.stderr.splitlines()]  # JSON lines, as when piped
    assert any(e["event"] == "transition" for e in events)
    rows = json.loads(cli("history", "--json", "--db", upgraded_url).stdout)
    assert ["from-env"] == [row["actor"] for row in rows]


def test_subprocess_and_in_process_runs_agree(upgraded_url: str, cli: Callable[..., CliResult]) -> None:
    """The same command prints the same stdout, exit code and error line both ways."""
    for args in (("diagram",), ("status", "-m", "nope", "--db", upgraded_url)):
        here, there = cli(*args), cli(*args, subprocess=True)
        assert (here.code, here.stdout) == (there.code, there.stdout), (here, there)
        if here.code:
            assert here.error_line == there.error_line
