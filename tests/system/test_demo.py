"""`migration-fsm demo` proves its claim: nothing lost, nothing run twice, through a crash and
a rollback, with gated workers (`WorkerGate`), the execution ledger and the default edges."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from migration_fsm.demo.run import walk_settings
from migration_fsm.fsm import EDGES
from migration_fsm.migration import edge_steps, pause_warnings
from tests.support.cli import CliResult


def test_the_walk_uses_the_default_edges_and_no_edge_lacks_its_pause() -> None:
    """The demo's (and the load run's) configuration lists steps for one edge only, the one
    with the injected crash; `advance --dry-run` has no missing-pause warning for any edge."""
    settings = walk_settings("sqlite:///control.db", "sqlite:///old.db", "sqlite:///new.db")
    assert ["cutover->cleanup"] == list(settings.steps)
    assert settings.drain_policy == "requeue"
    for edge in EDGES:
        assert [] == pause_warnings(settings, edge, edge_steps(settings, edge)), edge.key


def test_demo_loses_nothing_and_runs_nothing_twice(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    """A small demo run reports lost 0, duplicated 0 and executed_twice 0, having crashed,
    resumed and rolled back; its gated workers claimed every task in the execution ledger,
    every move of consumption waited for the acknowledged pause, and the task of an old worker
    that died holding it was handed over to the new side."""
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
    # The execution ledger saw every execution, and no key succeeded twice.
    assert 0 == report["executed_twice"] == report["ledger"]["executed_twice"]
    assert report["executed"] == report["ledger"]["succeeded"]
    assert (0, 0) == (report["ledger"]["running"], report["ledger"]["failed"])
    assert report["refused_executions"] >= 0  # measured: a refusal is the ledger doing its job
    workers = report["workers"]
    assert report["executions_by_side"] == {side: workers[side]["executed"] for side in ("old", "new")}
    assert all(workers[side]["errors"] == [] for side in ("old", "new"))
    # Consumption moved three times (cutover, rollback to dual_write, cutover again), each after
    # every live gate of the giving side had acknowledged the pause.
    assert [
        ("dual_write->cutover", "old"),
        ("cutover->dual_write", "new"),
        ("dual_write->cutover", "old"),
    ] == [(pause["edge"], pause["side"]) for pause in report["pauses"]]
    assert all(pause["acknowledged"] == 1 for pause in report["pauses"])  # the live gate
    # The old worker that died holding a task is gone: named by the old side's pauses, not
    # waited for; the first drain handed its task over to the new side, which ran it once.
    assert [["demo-old-dead"], [], ["demo-old-dead"]] == [pause["gone"] for pause in report["pauses"]]
    assert 1 == report["ledger"]["handed_over"]
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
    steps = {f"{row['source']}->{row['dest']}": [step["name"] for step in row["steps"]] for row in rows}
    assert ["pause_consumers", "drain_old", "transfer_state"] == steps["dual_write->cutover"]
    assert ["pause_consumers", "drain_new", "reverse_sync"] == steps["cutover->dual_write"]
    assert ["retire_old", "migration_fsm.demo.hooks:crash_once"] == steps["cutover->cleanup"]


def test_the_summary_shows_the_ledger_s_figures() -> None:
    """The human summary (`demo` without `--json`) shows executed_twice, the refusals, the
    workers per side, the pauses (with their gone workers) and the hand-overs."""
    from rich.console import Console

    from migration_fsm import views

    data = {
        **dict.fromkeys(("scheduled", "executed"), 7),
        **dict.fromkeys(("lost", "duplicated", "executed_twice", "fallback_reads", "repair_entries"), 0),
        "refused_executions": 3,
        "rollbacks": 2,
        "crash_resumed": True,
        "validations_ok": True,
        "journal_verified": True,
        "phases": {"preparation": 1.0},
        "workers": {"old": {"threads": 4, "executed": 5}, "new": {"threads": 4, "executed": 2}},
        "pauses": [{"side": "old", "acknowledged": 1, "gone": ["demo-old-dead"]}],
        "ledger": {"handed_over": 1},
    }
    console = Console(width=120, record=True)
    console.print(views.demo_report(data))
    rows = {
        cells[0]: cells[1]
        for line in console.export_text().splitlines()
        if len(cells := [cell.strip() for cell in line.strip("│ ").split("│")]) == 2
    }
    assert "0" == rows["executed twice"]
    assert "3" == rows["refused executions"]
    assert "4 threads, ran 5" == rows["old workers"]
    assert "old (1, 1 gone)" == rows["pauses acknowledged"]
    assert "1" == rows["handed over"]
