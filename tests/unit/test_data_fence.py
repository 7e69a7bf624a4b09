"""Data tools that write (backfill, reconcile, import) never write under a phase they were not
meant for: refused while a transition is in progress or interrupted (exit 3), and stopped
before their next batch once the migration changed under them (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from migration_fsm import commands
from migration_fsm.config import Settings
from migration_fsm.exceptions import Conflict, LeaseHeld, StepFailed
from migration_fsm.tasks.records import TaskStatus
from migration_fsm.tasks.sql import SqlTaskStore
from tests.support.cli import CliResult
from tests.support.datatools import create_task_table, everything, sql_stores, tasks, write_stores_config
from tests.support.steps import FAIL_ENV

TASKS = 300


def world(url: str, **extra: object) -> Settings:
    """Both task tables in the migration database, `TASKS` pending tasks on old, migration
    'default' in dual_write; the cutover edge has no guard and no step (the test drives it)."""
    create_task_table(url, "old_tasks")
    create_task_table(url, "new_tasks")
    with SqlTaskStore(url, "old_tasks", name="old") as old:
        old.put_many(tasks(TASKS))
    settings = Settings.model_validate(
        {
            "database_url": url,
            "actor": "operator",
            "stores": sql_stores(url),
            "guards": {"preparation->dual_write": [], "dual_write->cutover": []},
            "steps": {"preparation->dual_write": [], "dual_write->cutover": []},
            **extra,
        }
    )
    commands.init(settings, "default")
    commands.advance(settings, "default")
    return settings


class Batches:
    """A backfill's progress: an event after each batch."""

    def __init__(self) -> None:
        self.first = threading.Event()
        self.count = 0

    def start(self, total: int | None, completed: int) -> None:
        pass

    def advance(self, count: int, cursor: str | None) -> None:
        self.count += 1
        self.first.set()

    def finish(self) -> None:
        pass


def test_a_backfill_stops_before_its_next_batch_once_the_cutover_committed(upgraded_url: str) -> None:
    """The repro of the defect: a new worker completes a task after the cutover; the running
    backfill must not set it back to pending (it would run twice)."""
    settings = world(upgraded_url)
    batches = Batches()
    outcome: list[BaseException | object] = []

    def backfill() -> None:
        try:
            outcome.append(
                commands.backfill(settings, "default", batch_size=10, max_rate=100, progress=batches)
            )
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=backfill)
    thread.start()
    assert batches.first.wait(30)
    deadline = time.monotonic() + 30
    while True:  # on PostgreSQL a batch may hold the operator lock at that instant: retry
        try:
            commands.advance(settings, "default")
            break
        except LeaseHeld:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    state = commands.status(settings, "default").state
    assert "cutover" == state.phase
    with SqlTaskStore(upgraded_url, "new_tasks", name="new") as new:
        copied = everything(new)
        done = copied[0].model_copy(update={"status": TaskStatus.COMPLETED, "attempts": 1})
        new.put(done)  # a new worker ran it, after the cutover
        thread.join(60)
        assert isinstance(outcome[0], Conflict), outcome
        # Its next batch met the committed cutover, the fence's lock held by the advance, or
        # (when the batch came between the advance's claim and its commit) the transition in
        # progress: each one stops the backfill before it writes.
        assert any(
            why in str(outcome[0])
            for why in ("changed while backfill ran", "right now", "in progress or interrupted")
        ), outcome
        assert 3 == outcome[0].exit_code
        after = everything(new)
    assert len(after) < TASKS  # it stopped
    assert TaskStatus.COMPLETED == next(r for r in after if r.key == done.key).status


def test_backfill_reconcile_and_import_refuse_an_interrupted_transition(
    upgraded_url: str, cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    """exit 3, one line, nothing written, through the CLI as an operator runs them."""
    settings = world(upgraded_url)
    export = tmp_path / "old.jsonl"
    commands.export(settings, "default", side="old", out=str(export))
    failing = settings.model_copy(update={"steps": {"dual_write->cutover": ["tests.support.steps:flaky"]}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAIL_ENV, "1")
        with pytest.raises(StepFailed):
            commands.advance(failing, "default")
    config = write_stores_config(tmp_path / "mfsm.toml", sql_stores(upgraded_url))
    common = ("--db", upgraded_url, "--config", config)
    for command in (
        ("backfill", *common),
        ("reconcile", *common),
        ("import", *common, "--side", "new", "--in", str(export), "--into-other-side"),
    ):
        result = cli(*command)
        assert 3 == result.code, (command, result.stderr)
        assert "in progress or interrupted" in result.error_line, result.error_line
    with SqlTaskStore(upgraded_url, "new_tasks", name="new") as new:
        assert [] == everything(new)
