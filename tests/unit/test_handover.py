"""The default guards and steps through the engine: drain, state transfer, reverse sync, their
idempotence, and a crash inside a step finished by `resume`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

import pytest

from migration_fsm.config import Settings
from migration_fsm.exceptions import Refused, StepFailed
from migration_fsm.fsm import Phase
from migration_fsm.journal import Journal
from migration_fsm.log import get_logger
from migration_fsm.migration import Migration
from migration_fsm.plugins import handover as cutover
from migration_fsm.plugins.context import Context
from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import TaskRecord, TaskStatus
from migration_fsm.tools import runs
from migration_fsm.tools.backfill import backfill_migration
from migration_fsm.tools.validate import validate, validate_migration
from tests.support.datatools import MEMORY, everything, memory_store, memory_stores, task, tasks


class Crash(BaseException):
    """Stands for the operator's process dying inside a step."""


class CrashingStore(MemoryTaskStore):
    """A memory store whose `put_many` number `crash_on` raises `error` once, and whose
    `set_progress` raises it once for the first key at or above `crash_at`."""

    def __init__(
        self,
        name: str,
        records: Sequence[TaskRecord],
        crash_on: int,
        error: BaseException,
        crash_at: str | None = None,
    ) -> None:
        self.crash_on, self.error, self.puts, self.crash_at = crash_on, error, 0, crash_at
        self.batches: list[int] = []
        self.progress: list[str] = []
        super().__init__(name, records)
        self.puts, self.batches = 0, []

    def set_progress(self, key: str, status: TaskStatus, attempts: int, updated_at: datetime) -> bool:
        if self.crash_at is not None and key >= self.crash_at:
            self.crash_at = None
            raise self.error
        self.progress.append(key)
        return super().set_progress(key, status, attempts, updated_at)

    def put_many(self, records: Sequence[TaskRecord]) -> int:
        self.puts += 1
        if self.puts == self.crash_on:
            raise self.error
        self.batches.append(len(records))
        return super().put_many(records)


@pytest.fixture
def walk(store: Journal, make_settings: Callable[..., Settings]) -> Iterator[tuple[Migration, Settings]]:
    """An engine on `default` (in preparation) with shared memory stores and a short drain."""
    MEMORY.clear()
    settings = make_settings(stores=memory_stores(), drain_timeout_seconds=0.2, backfill_batch_size=7)
    engine = Migration(store, settings, "default")
    engine.init()
    yield engine, settings
    MEMORY.clear()


def _statuses(store: MemoryTaskStore) -> dict[str, tuple[TaskStatus, int]]:
    return {r.key: (r.status, r.attempts) for r in everything(store)}


def _clean(old: MemoryTaskStore, new: MemoryTaskStore, handed_over: int = 0) -> None:
    """Both sides agree, but for the `handed_over` tasks: cancelled on the giving side, pending
    with one more attempt on the receiving side."""
    report = validate(old, new, settle=0)
    assert (0, 0, 0, handed_over) == (report.missing, report.extra, report.mismatched, report.status_differs)


def test_a_forward_walk_and_rollback_with_the_default_guards_and_steps(
    walk: tuple[Migration, Settings],
) -> None:
    """Defaults refuse until backfill and validate ran; drain + transfer at cutover; reverse sync back."""
    engine, settings = walk
    store = engine.store
    old, new = memory_store("old"), memory_store("new")
    old.put_many(tasks(40, mixed=True))  # every fifth task is running on the old side
    running = [r.key for r in everything(old) if r.status is TaskStatus.RUNNING]

    first = engine.advance()
    assert [("stores_reachable", True, "old 'old' has 40 tasks; new 'new' has 0 tasks")] == [
        (g.name, g.passed, g.detail) for g in first.guards
    ]
    both = tasks(5, start=100)  # dual writes
    old.put_many(both)
    new.put_many(both)
    with pytest.raises(
        Refused, match=r"backfill_complete \(no backfill has run.*checksums_match \(no validate"
    ):
        engine.advance()

    assert 45 == backfill_migration(store, settings, "default").copied
    assert validate_migration(store, settings, "default", settle=0)[1].ok
    old.put(task(0, status=TaskStatus.COMPLETED, attempts=1))  # an old worker finishes a task
    to_cutover = engine.advance()
    assert ["backfill_complete", "repair_log_empty", "checksums_match"] == [g.name for g in to_cutover.guards]
    assert ["pause_consumers", "drain_old", "transfer_state"] == to_cutover.steps
    assert (TaskStatus.COMPLETED, 1) == _statuses(new)["t0000000"]  # transferred: it will not run again
    # Handed over: pending with one more attempt on the receiving side only; never re-queued
    # on the drained side, whose copy is cancelled (no worker or reaper there runs it again).
    assert {(TaskStatus.PENDING, 1)} == {_statuses(new)[key] for key in running}
    assert {(TaskStatus.CANCELLED, 0)} == {_statuses(old)[key] for key in running}
    _clean(old, new, handed_over=len(running))

    engine.ramp(100)
    new.put(task(2, status=TaskStatus.COMPLETED, attempts=1))  # a new worker's work
    new.put(task(101, status=TaskStatus.COMPLETED, attempts=1))  # pending on old: a runnable old copy
    assert validate_migration(store, settings, "default", settle=0)[1].ok
    to_cleanup = engine.advance()
    assert [
        ("percent_is_100", True),
        ("old_drained", True),
        ("checksums_match", True),
        ("no_double_execution", True),
    ] == [(g.name, g.passed) for g in to_cleanup.guards]
    assert "1 runnable old copies of tasks that ran on the new side remain" in to_cleanup.guards[1].detail
    assert ["retire_old"] == to_cleanup.steps
    assert (TaskStatus.COMPLETED, 1) == _statuses(old)["t0000101"]  # retired: it ran on new

    new.put(task(300))  # only the new side is written in cleanup
    new.put(task(301, status=TaskStatus.RUNNING))
    back = engine.rollback(reason="test rollback", to=Phase.DUAL_WRITE)
    assert [["reverse_sync"], ["pause_consumers", "drain_new", "reverse_sync"]] == [o.steps for o in back]
    assert Phase.DUAL_WRITE == store.get("default").phase
    assert (TaskStatus.COMPLETED, 1) == _statuses(old)["t0000002"]
    # Running on new when the rollback drained it: handed over to old, cancelled on new.
    assert (TaskStatus.PENDING, 1) == _statuses(old)["t0000301"]
    assert (TaskStatus.CANCELLED, 0) == _statuses(new)["t0000301"]
    assert "t0000300" in _statuses(old)
    # The keys handed over to new at cutover came back (reverse sync) as new had them.
    _clean(old, new, handed_over=1)


def test_drain_policy_fail_stops_the_transition_until_the_task_finishes(
    walk: tuple[Migration, Settings],
) -> None:
    """drain_policy 'fail': a task still running stops cutover; once it finished, resume commits."""
    engine, settings = walk
    engine.settings = settings.model_copy(
        update={"drain_policy": "fail", "guards": {"dual_write->cutover": []}}
    )
    old, new = memory_store("old"), memory_store("new")
    old.put_many([task(1), task(2, status=TaskStatus.RUNNING)])
    new.put_many([task(1), task(2)])
    engine.advance()
    with pytest.raises(
        StepFailed, match=r"1 tasks still running on the old side after 0.2 s \(e.g. t0000002\)"
    ):
        engine.advance()
    old.put(task(2, status=TaskStatus.COMPLETED))
    outcome = engine.resume()
    assert ("committed", Phase.CUTOVER) == (outcome.status, outcome.edge.dest)
    assert (TaskStatus.COMPLETED, 0) == _statuses(new)["t0000002"]


def test_a_crash_inside_transfer_state_is_finished_by_resume(walk: tuple[Migration, Settings]) -> None:
    """The process dies mid-transfer; `resume --steal` continues from the step's checkpoint."""
    engine, settings = walk
    engine.settings = settings.model_copy(update={"guards": {"dual_write->cutover": []}})
    source = tasks(60, mixed=True)
    old = memory_store("old")
    old.put_many([r.model_copy(update={"status": TaskStatus.COMPLETED}) for r in source])
    MEMORY["new"] = new = CrashingStore("new", source, crash_on=0, error=Crash(), crash_at="t0000022")
    engine.advance()
    with pytest.raises(Crash):
        engine.advance()
    state = engine.store.get("default")
    assert state.in_progress_seq is not None
    step = engine.store.entry(state, state.in_progress_seq).steps[2]
    assert ("transfer_state", "started") == (step.name, step.status)
    assert step.checkpoint is not None
    assert "t0000020" == step.checkpoint["cursor"]  # three batches of 7 went through
    before = list(new.progress)
    outcome = engine.resume(steal=True)
    assert "committed" == outcome.status
    assert all(key > "t0000020" for key in new.progress[len(before) :])  # from the checkpoint on
    assert {(TaskStatus.COMPLETED, 0)} == set(_statuses(new).values())
    _clean(old, new)


def _context(engine: Migration, checkpoint: dict[str, Any] | None, saved: list[dict[str, Any]]) -> Context:
    state = engine.store.get("default")
    return Context(
        migration="default",
        seq=state.last_seq,
        source=state.phase,
        dest=state.phase,
        settings=engine.settings,
        log=get_logger(),
        state=state,
        store=engine.store,
        percent=state.percent,
        checkpoint=checkpoint,
        _save=saved.append,
    )


def test_transfer_and_requeue_are_idempotent(walk: tuple[Migration, Settings]) -> None:
    """Running transfer_state or the requeue again (fresh or from a done checkpoint) changes nothing."""
    engine, _ = walk
    old, new = memory_store("old"), memory_store("new")
    records = tasks(30, mixed=True)
    old.put_many(records)
    new.put_many([r.model_copy(update={"status": TaskStatus.PENDING}) for r in records[:25]])
    saved: list[dict[str, Any]] = []  # six running tasks get handed over; 25 is created on new by it
    cutover.drain(_context(engine, None, saved), "old")
    assert {"requeued": 6, "done": True} == {k: saved[-1][k] for k in ("requeued", "done")}
    cutover.sync_status(_context(engine, None, saved), "old", "new")
    after = (_statuses(old), _statuses(new))
    # The six handed-over tasks keep what the drain gave them (kept), cancelled on old.
    assert {"done": True, "cursor": "t0000029", "updated": 15, "created": 4, "kept": 6} == {
        k: saved[-1][k] for k in ("done", "cursor", "updated", "created", "kept")
    }
    for checkpoint in (None, saved[-1]):
        cutover.drain(_context(engine, checkpoint, saved), "old")
        cutover.sync_status(_context(engine, checkpoint, saved), "old", "new")
        assert after == (_statuses(old), _statuses(new))
    _clean(old, new, handed_over=6)


def test_the_backfill_step_resumes_from_its_checkpoint_and_records_completion(
    walk: tuple[Migration, Settings],
) -> None:
    """The built-in step `backfill` checkpoints in the journal; after a crash, resume finishes the copy."""
    engine, settings = walk
    engine.settings = settings.model_copy(update={"steps": {"preparation->dual_write": ["backfill"]}})
    old = memory_store("old")
    old.put_many(tasks(30))
    MEMORY["new"] = new = CrashingStore("new", [], crash_on=3, error=Crash())
    with pytest.raises(Crash):
        engine.advance()
    state = engine.store.get("default")
    assert state.in_progress_seq is not None
    step = engine.store.entry(state, state.in_progress_seq).steps[0]
    assert {"cursor": "t0000013", "copied": 14} == step.checkpoint
    assert "committed" == engine.resume(steal=True).status
    assert everything(old) == everything(new)
    assert [7, 7, 7, 7, 2] == new.batches  # the crashed batch never landed: nothing copied twice
    progress = runs.backfill_progress(engine.store, "default")
    assert progress is not None
    assert ("t0000029", 30, True) == (progress.cursor, progress.copied, progress.done)
