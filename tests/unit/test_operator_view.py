"""What an operator reads (issue 11, item 11): the current phase named in plain text, the next
command after a success, why a guard refused without `--json`, and a percent that is plainly
a number from 0 to 100."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.cli import CliResult

GATE = "tests.support.steps:gate"


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_status_names_the_current_phase_in_plain_text(
    upgraded_url: str, cli: Callable[..., CliResult]
) -> None:
    """Piped (no reverse video) the current phase is still marked."""
    assert 0 == cli("init", "--db", upgraded_url).code
    shown = cli("status", "--db", upgraded_url)
    assert "[preparation] -> dual_write" in shown.stdout
    assert 0 == cli("advance", "--db", upgraded_url).code
    assert "preparation -> [dual_write] -> cutover" in cli("status", "--db", upgraded_url).stdout


def test_init_says_what_to_run_next(upgraded_url: str, cli: Callable[..., CliResult]) -> None:
    assert "next: `migration-fsm advance`" in cli("init", "--db", upgraded_url).stdout


def test_history_says_why_a_guard_refused(
    upgraded_url: str, cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    cfg = config(tmp_path, f'[guards]\n"preparation->dual_write" = ["{GATE}"]\n')
    assert 0 == cli("init", "--db", upgraded_url, "--config", cfg).code
    assert 1 == cli("advance", "--db", upgraded_url, "--config", cfg).code
    table = cli("history", "--db", upgraded_url, "--config", cfg).stdout
    assert "refused by" in table
    assert "closed" in table  # the guard's own detail ("gate is closed"; the cell may wrap it)


@pytest.mark.parametrize("percent", [" 50", "50 ", "+50", "050", "00", "٥٠", "5 0", "", "1e1", "101"])
def test_ramp_takes_only_a_plain_number_from_0_to_100(
    upgraded_url: str, cli: Callable[..., CliResult], tmp_path: Path, percent: str
) -> None:
    cfg = config(tmp_path, '[guards]\n"dual_write->cutover" = []\n')
    for command in (("init",), ("advance",), ("advance",)):
        assert 0 == cli(*command, "--db", upgraded_url, "--config", cfg).code
    before = cli("history", "--json", "--db", upgraded_url).stdout
    result = cli("ramp", percent, "--db", upgraded_url, "--config", cfg)
    assert 2 == result.code, result.stderr
    assert "percent must be a whole number from 0 to 100" in result.error_line
    assert before == cli("history", "--json", "--db", upgraded_url).stdout
    assert 0 == cli("ramp", "50", "--db", upgraded_url, "--config", cfg).code


def test_a_ramp_to_the_current_percent_changes_and_journals_nothing(
    upgraded_url: str, cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    cfg = config(tmp_path, '[guards]\n"dual_write->cutover" = []\n')
    for command in (("init",), ("advance",), ("advance",), ("ramp", "40")):
        assert 0 == cli(*command, "--db", upgraded_url, "--config", cfg).code
    before = (
        cli("history", "--json", "--db", upgraded_url).stdout,
        cli("status", "--json", "--db", upgraded_url).stdout,
    )
    again = cli("ramp", "40", "--db", upgraded_url, "--config", cfg)
    assert 0 == again.code, again.stderr
    assert "unchanged: already at 40%" in again.stdout
    assert before == (
        cli("history", "--json", "--db", upgraded_url).stdout,
        cli("status", "--json", "--db", upgraded_url).stdout,
    )
