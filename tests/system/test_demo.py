"""`migration-fsm demo` proves its claim: nothing lost, nothing run twice, through a crash and
a rollback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.support.cli import CliResult


def test_demo_loses_nothing_and_runs_nothing_twice(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    """A small demo run reports lost 0 and duplicated 0, having crashed, resumed and rolled back."""
    result = cli(
        "demo",
        "--json",
        "--tasks",
        "400",
        "--rate",
        "80",
        "--dir",
        str(tmp_path / "demo"),
        timeout=300,
        subprocess=True,  # the whole program, as its users first meet it
    )
    assert 0 == result.code, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert (0, 0) == (report["lost"], report["duplicated"])
    assert report["scheduled"] == report["executed"] > 0
    assert report["executions"] == report["executed"]
    assert (True, True, True, 2) == (
        report["crash_resumed"],
        report["validations_ok"],
        report["journal_verified"],
        report["rollbacks"],
    )
    assert {"old", "new"} == set(report["executions_by_side"])  # both systems did real work
    assert ["preparation", "dual_write", "cutover", "cleanup", "complete"] == list(report["phases"])
    history = cli("history", "--json", "-m", "demo", "--db", f"sqlite:///{tmp_path / 'demo' / 'control.db'}")
    rows = json.loads(history.stdout)
    assert ["committed"] == sorted({row["status"] for row in rows})
    assert report["transitions"] + 1 == len(rows)  # init, then one row per transition
    assert 2 == sum(1 for row in rows if row["trigger"] == "rollback")
