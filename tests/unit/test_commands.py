"""`migration_fsm.commands`, the Python API of each CLI verb, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from migration_fsm import commands
from migration_fsm.config import Settings
from migration_fsm.exceptions import TriggerNotAllowed, UnknownMigration
from migration_fsm.fsm import EntryStatus, Phase


def test_a_whole_walk_and_back_through_the_python_api(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    assert Phase.PREPARATION == commands.init(settings, "orders").phase
    assert "committed" == commands.advance(settings, "orders", reason="go").status
    assert "committed" == commands.advance(settings, "orders").status
    assert 30 == commands.ramp(settings, "orders", 30, reason="a third").percent
    back = commands.rollback(settings, "orders", reason="too slow", to=Phase.PREPARATION)
    assert [("cutover", "dual_write"), ("dual_write", "preparation")] == [
        (str(result.edge.source), str(result.edge.dest)) for result in back
    ]

    report = commands.status(settings, "orders").as_json()
    assert ("preparation", 0, None) == (report["phase"], report["percent"], report["interrupted"])
    assert ["advance"] == report["allowed"]
    history = commands.history(settings, "orders")
    assert ["init", "advance", "advance", "ramp", "rollback", "rollback"] == [str(e.trigger) for e in history]
    assert {EntryStatus.COMMITTED} == {e.status for e in history}
    verified = commands.verify(settings, "orders")
    assert (len(history), Phase.PREPARATION) == (verified.rows, verified.phase)


def test_a_dry_run_changes_nothing(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    commands.init(settings, "orders")
    planned = commands.advance(settings, "orders", dry_run=True)
    assert ("planned", None) == (planned.status, planned.seq)
    assert 1 == len(commands.history(settings, "orders"))
    assert Phase.PREPARATION == commands.status(settings, "orders").state.phase


def test_errors_are_the_cli_errors(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    with pytest.raises(UnknownMigration):
        commands.advance(settings, "nobody")
    commands.init(settings, "orders")
    with pytest.raises(TriggerNotAllowed) as caught:
        commands.ramp(settings, "orders", 10)
    assert (Phase.PREPARATION, ["advance"]) == (caught.value.phase, list(caught.value.allowed))
    assert 1 == len(commands.history(settings, "orders"))


def test_the_diagram_is_the_machine() -> None:
    text = commands.diagram()
    assert text.startswith("stateDiagram-v2")
    assert "cutover --> cutover: ramp" in text
