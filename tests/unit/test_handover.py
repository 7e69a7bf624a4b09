"""The default guards and steps through the engine: drain, state transfer, reverse sync, their
idempotence, and a crash inside a step finished by `resume`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, Final, cast

import pytest
from sqlalchemy import update

from migration_fsm.client import PhaseClient, WorkerGate
from migration_fsm.config import Settings
from migration_fsm.exceptions import Refused, StepFailed
from migration_fsm.fsm import Phase
from migration_fsm.journal import Journal, make_engine, utcnow, workers_table
from migration_fsm.journal.ledger import Ledger
from migration_fsm.journal.workers import Workers
from migration_fsm.log import get_logger
from migration_fsm.migration import Migration
from migration_fsm.plugins import guards
from migration_fsm.plugins import handover as cutover
from migration_fsm.plugins.context import Context
from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import ProgressUpdate, TaskRecord, TaskStatus
from migration_fsm.tasks.sql import SqlTaskStore
from migration_fsm.tools import runs
from migration_fsm.tools.backfill import backfill_migration
from migration_fsm.tools.validate import validate, validate_migration
from tests.support.datatools import MEMORY, everything, memory_store, memory_stores, task, tasks


class Crash(BaseException):
    """Stands for the operator's process dying inside a step."""


class CrashingStore(MemoryTaskStore):
    """A memory store whose `put_many` number `crash_on` raises `error` once, and whose
    `set_progress` (or `set_progress_many`) raises it once for the first key at or above
    `crash_at`."""

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

    def set_progress_many(self, updates: Sequence[ProgressUpdate]) -> int:
        """The batched path: the whole batch (one transaction) crashes when it holds the key."""
        if self.crash_at is not None and any(u.key >= self.crash_at for u in updates):
            self.crash_at = None
            raise self.error
        self.progress.extend(u.key for u in updates)
        return super().set_progress_many(updates)

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
    # t0000101 ran on new; 11 more are pending on both sides: new owns them, so a stock old
    # worker must not run them either (issue 12).
    assert "12 runnable old copies of tasks the new side ran or owns remain" in to_cleanup.guards[1].detail
    assert ["retire_old"] == to_cleanup.steps
    assert (TaskStatus.COMPLETED, 1) == _statuses(old)["t0000101"]  # retired: it ran on new
    assert (TaskStatus.CANCELLED, 0) == _statuses(old)["t0000100"]  # handed over: new runs it
    assert (TaskStatus.PENDING, 0) == _statuses(new)["t0000100"]

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
    # The keys handed over to new at cutover, never claimed there, are given back to old with
    # the consumption (issue 12: the ledger kept giving them to new, and old's workers were
    # refused them: they ran nowhere): pending on old, cancelled on new, old's in the ledger.
    assert {(TaskStatus.PENDING, 1)} == {_statuses(old)[key] for key in running}
    assert {(TaskStatus.CANCELLED, 1)} == {_statuses(new)[key] for key in running}
    ledger = _ledger(engine)
    assert all(ledger.claim(M, key, "old", "old-worker").allowed for key in running)
    # So are the 11 that `retire_old` handed over to new at cleanup, still pending on new.
    assert (TaskStatus.PENDING, 0) == _statuses(old)["t0000100"]
    assert (TaskStatus.CANCELLED, 0) == _statuses(new)["t0000100"]
    _clean(old, new, handed_over=1 + len(running) + 11)


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


# -- issue 12: the acknowledged pause, the hand-over, the progress-only transfer, retire_old ----

M = "default"
TO_CUTOVER: Final = "dual_write->cutover"
LEGACY_STATUS_MAP: Final = {
    "queued": "pending",
    "busy": "running",
    "done": "completed",
    "dead": "failed",
    "dropped": "cancelled",
}


def _edge_context(
    engine: Migration, source: Phase, dest: Phase, saved: list[dict[str, Any]] | None = None
) -> Context:
    """A step's ctx for the edge `source -> dest` (no lease: checkpoints go to `saved`)."""
    state = engine.store.get(M)
    return Context(
        migration=M,
        seq=state.last_seq,
        source=source,
        dest=dest,
        settings=engine.settings,
        log=get_logger(),
        state=state,
        store=engine.store,
        percent=state.percent,
        checkpoint=None,
        _save=(saved if saved is not None else []).append,
    )


def _ledger(engine: Migration) -> Ledger:
    return Ledger(engine.store.url, engine=engine.store.engine, workers=_workers(engine))


def _workers(engine: Migration) -> Workers:
    return Workers(engine.store.engine, ttl_seconds=engine.settings.worker_ttl_seconds)


def _age(engine: Migration, side: str, worker_id: str, seconds: float) -> None:
    """Make a worker's last heartbeat `seconds` old."""
    c = workers_table.c
    with engine.store.transaction() as conn:
        conn.execute(
            update(workers_table)
            .where(c.side == side, c.worker_id == worker_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )


def _to_dual_write(engine: Migration) -> None:
    """Into dual_write with no guard on the way to cutover (the tests are about the steps)."""
    engine.settings = engine.settings.model_copy(update={"guards": {TO_CUTOVER: []}})
    engine.advance()


def test_requeue_hands_a_running_task_over_to_the_receiving_side_only(
    walk: tuple[Migration, Settings],
) -> None:
    """At the drain's timeout a running task is pending (attempts + 1) on the receiving side
    and cancelled on the drained side: never re-queued where it was running (the defect:
    `requeue` made it pending on the drained side too), and the ledger gives it to new only."""
    engine, _ = walk
    old, new = memory_store("old"), memory_store("new")
    old.put_many([task(1, status=TaskStatus.RUNNING, attempts=2), task(2, status=TaskStatus.RUNNING)])
    new.put_many([task(1, attempts=2)])  # the second task has no copy on new yet
    cutover.drain(_edge_context(engine, Phase.DUAL_WRITE, Phase.CUTOVER), "old")
    assert {"t0000001": (TaskStatus.CANCELLED, 2), "t0000002": (TaskStatus.CANCELLED, 0)} == _statuses(old)
    assert {"t0000001": (TaskStatus.PENDING, 3), "t0000002": (TaskStatus.PENDING, 1)} == _statuses(new)
    ledger = _ledger(engine)
    assert not ledger.claim(M, "t0000001", "old", "old-worker").allowed
    assert ledger.claim(M, "t0000001", "new", "new-worker").allowed


def test_transfer_never_copies_running_as_running(walk: tuple[Migration, Settings]) -> None:
    """A task still running on the giving side when transfer_state runs is handed over like
    the drain does (the defect: it was copied as `running`, and no worker ever ran it); on an
    edge where the source side keeps consuming, the target's copy is left as it is."""
    engine, _ = walk
    old, new = memory_store("old"), memory_store("new")
    old.put_many([task(1, status=TaskStatus.RUNNING), task(2, status=TaskStatus.COMPLETED, attempts=1)])
    new.put_many([task(1), task(2)])
    cutover.sync_status(_edge_context(engine, Phase.DUAL_WRITE, Phase.CUTOVER), "old", "new")
    assert {"t0000001": (TaskStatus.PENDING, 1), "t0000002": (TaskStatus.COMPLETED, 1)} == _statuses(new)
    assert (TaskStatus.CANCELLED, 0) == _statuses(old)["t0000001"]

    # cleanup -> cutover: the new side consumes on both ends, a running task stays its own.
    new.put_many([task(3, status=TaskStatus.RUNNING), task(4, status=TaskStatus.RUNNING)])
    old.put(task(3))
    cutover.sync_status(_edge_context(engine, Phase.CLEANUP, Phase.CUTOVER), "new", "old")
    assert (TaskStatus.PENDING, 0) == _statuses(old)["t0000003"]  # left as it was
    assert (TaskStatus.PENDING, 0) == _statuses(old)["t0000004"]  # created, pending: never running
    assert TaskStatus.RUNNING not in {status for status, _ in _statuses(old).values()}


def _legacy_table(url: str) -> SqlTaskStore:
    """A legacy task manager's table: its own column names and status words, text timestamps
    in its own format, and payload text as its code wrote it (not canonical JSON)."""
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE legacy_runs (run_id VARCHAR(40) PRIMARY KEY, name VARCHAR(40), args TEXT,"
            " state VARCHAR(20), tries INTEGER, created VARCHAR(40), updated VARCHAR(40))"
        )
        for i, state in ((1, "queued"), (2, "queued"), (3, "done")):
            conn.exec_driver_sql(
                "INSERT INTO legacy_runs VALUES"
                f" ('r{i}', 'email', '{{\"to\":  \"x\" , \"n\": {i}}}', '{state}', 0,"
                f" '2024-01-0{i} 03:04:05', '2024-01-0{i} 03:04:05')"
            )
    engine.dispose()
    return SqlTaskStore(
        url,
        "legacy_runs",
        name="legacy",
        columns={
            "key": "run_id",
            "type": "name",
            "payload": "args",
            "status": "state",
            "attempts": "tries",
            "created_at": "created",
            "updated_at": "updated",
        },
        status_map=LEGACY_STATUS_MAP,
    )


def _raw(url: str) -> dict[str, tuple[Any, ...]]:
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT run_id, name, args, state, tries, created, updated FROM legacy_runs"
        )
        found = {row[0]: tuple(row[1:]) for row in rows}
    engine.dispose()
    return found


def test_set_progress_and_transfer_change_only_the_progress_columns_of_a_legacy_row(
    walk: tuple[Migration, Settings],
) -> None:
    """transfer_state into a legacy table writes status, attempts and updated_at in the table's
    own words and format; the payload text and created_at stay byte for byte (the defect: the
    whole row was rewritten, payload as canonical JSON and timestamps in another format)."""
    engine, _ = walk
    url = engine.store.url
    legacy = _legacy_table(url)
    try:
        before = _raw(url)
        cast("dict[str, Any]", MEMORY)["new"] = legacy  # the legacy table receives the transfer
        old = memory_store("old")
        old.put_many([r.model_copy(update={"key": f"r{i}"}) for i, r in ((1, task(1)), (2, task(2)))])
        old.put(legacy.get("r1").model_copy(update={"status": TaskStatus.COMPLETED, "attempts": 1}))  # type: ignore[union-attr]
        old.put(legacy.get("r2").model_copy(update={"status": TaskStatus.FAILED, "attempts": 3}))  # type: ignore[union-attr]
        saved: list[dict[str, Any]] = []
        cutover.sync_status(_edge_context(engine, Phase.DUAL_WRITE, Phase.CUTOVER, saved), "old", "new")
        assert 2 == saved[-1]["updated"]
        after = _raw(url)
        for key, word, tries in (("r1", "done", 1), ("r2", "dead", 3)):
            name, args, state, attempts, created, updated = after[key]
            assert (name, args, created) == (before[key][0], before[key][1], before[key][4])
            assert (state, attempts) == (word, tries)
            # The source's updated_at, in the row's own text format (no T, no fraction, no Z).
            assert updated == f"2024-01-0{key[1]} 03:04:05"
        assert after["r3"] == before["r3"]
        assert legacy.set_progress("r3", TaskStatus.PENDING, 4, task(9).updated_at)
        assert ("queued", 4) == _raw(url)["r3"][2:4]
        assert _raw(url)["r3"][1] == before["r3"][1]
        assert not legacy.set_progress("nope", TaskStatus.PENDING, 0, task(9).updated_at)
    finally:
        legacy.close()


def test_retire_old_marks_old_copies_that_ran_on_new_finished_in_old_words(
    walk: tuple[Migration, Settings],
) -> None:
    """After cutover -> cleanup no old copy of a task that ran on new is runnable: a stock old
    worker started later runs nothing twice (the defect: all of them ran again). The new copy
    finished, or the ledger says it succeeded on new; the old row gets old's own status word."""
    engine, _ = walk
    url = engine.store.url
    legacy = _legacy_table(url)
    try:
        cast("dict[str, Any]", MEMORY)["old"] = legacy  # the legacy table is the old side
        new = memory_store("new")
        for key in ("r1", "r2", "r3"):
            record = legacy.get(key)
            assert record is not None
            new.put(record)
        new.put(legacy.get("r1").model_copy(update={"status": TaskStatus.COMPLETED, "attempts": 1}))  # type: ignore[union-attr]
        ledger = _ledger(engine)
        claim = ledger.claim(M, "r2", "new", "new-worker").claim  # succeeded on new; its copy lags
        assert claim is not None
        ledger.finish(claim, "succeeded")
        ctx = _edge_context(engine, Phase.CUTOVER, Phase.CLEANUP)
        assert 2 == cutover.runnable_copies(ctx)
        assert "2 runnable old copies" in guards.old_drained(ctx).detail
        before = _raw(url)
        cutover.retire(ctx)
        after = _raw(url)
        assert ("done", 1) == after["r1"][2:4]
        assert ("done", 0) == after["r2"][2:4]
        assert after["r3"] == before["r3"]  # finished on old already
        assert before["r1"][1] == after["r1"][1]  # payload text untouched
        assert 0 == cutover.runnable_copies(ctx)
        cutover.retire(_edge_context(engine, Phase.CUTOVER, Phase.CLEANUP))  # idempotent
        assert after == _raw(url)
    finally:
        legacy.close()


def test_validate_counts_runnable_old_copies_and_reads_the_ledger(walk: tuple[Migration, Settings]) -> None:
    """validate's additive keys: runnable old copies (store and ledger), executed_twice and
    refused_executions from the ledger."""
    engine, settings = walk
    old, new = memory_store("old"), memory_store("new")
    old.put_many([task(1), task(2), task(3)])
    new.put_many([task(1, status=TaskStatus.COMPLETED, attempts=1), task(2), task(3)])
    ledger = _ledger(engine)
    claim = ledger.claim(M, "t0000002", "new", "n1").claim
    assert claim is not None
    ledger.finish(claim, "succeeded")
    assert not ledger.claim(M, "t0000002", "old", "o1").allowed  # refused and counted
    report = validate_migration(engine.store, settings, M, settle=0)[1].as_json()
    assert (2, 0, 1) == (
        report["runnable_old_copies"],
        report["executed_twice"],
        report["refused_executions"],
    )


# -- the pause ------------------------------------------------------------------------------


def _paused(engine: Migration) -> str | None:
    return engine.store.get(M).paused_side


def test_pause_with_no_registered_worker_goes_on_and_says_so(walk: tuple[Migration, Settings]) -> None:
    """A migration without gates works as before: nobody to wait for; the commit clears the pause."""
    engine, _ = walk
    _to_dual_write(engine)
    version = engine.store.get(M).version
    outcome = engine.advance()
    assert ("committed", ["pause_consumers", "drain_old", "transfer_state"]) == (
        outcome.status,
        outcome.steps,
    )
    state = engine.store.get(M)
    row = engine.store.entry(state, state.last_seq)
    assert {"side": "old", "version": version + 1, "acknowledged": 0, "gone": []} == row.steps[0].checkpoint
    assert [("pause", "old")] == [(t["command"], t.get("side")) for t in row.takeovers]
    assert (None, version + 2) == (state.paused_side, state.version)  # the pause, then the commit


def test_pause_waits_for_every_live_gate_and_names_the_gone_workers(
    walk: tuple[Migration, Settings], upgraded_url: str
) -> None:
    """A live WorkerGate of the giving side acknowledges the pause and the step goes on; a
    worker whose heartbeat is older than worker_ttl_seconds is gone: named, not waited for."""
    engine, _ = walk
    _to_dual_write(engine)
    workers = _workers(engine)
    workers.register(M, "old", "ghost")
    _age(engine, "old", "ghost", engine.settings.worker_ttl_seconds + 5)
    workers.register(M, "new", "new-side")  # the receiving side's workers are not waited for
    with (
        PhaseClient(upgraded_url, ttl=0.02, listen=False) as client,
        WorkerGate(client, "old", "live-gate", poll_seconds=0.01) as gate,
    ):
        assert gate.may_consume()
        outcome = engine.advance()
        assert not gate.may_consume()  # paused, then cutover: old consumes no more
    assert "committed" == outcome.status
    state = engine.store.get(M)
    checkpoint = engine.store.entry(state, state.last_seq).steps[0].checkpoint
    assert checkpoint is not None
    assert ("old", 1, ["ghost"]) == (checkpoint["side"], checkpoint["acknowledged"], checkpoint["gone"])


def test_pause_timeout_stops_the_transition_and_abort_lifts_the_pause(
    walk: tuple[Migration, Settings],
) -> None:
    """A live worker that never acknowledges: the step fails at pause_timeout_seconds, naming
    it (exit 1, the pause stays in force); `abort` lifts it (the step's undo); `resume` after
    the acknowledgement goes on without publishing a second pause."""
    engine, settings = walk
    engine.settings = settings.model_copy(update={"pause_timeout_seconds": 0.2, "guards": {TO_CUTOVER: []}})
    engine.advance()
    workers = _workers(engine)
    workers.register(M, "old", "stuck")
    with pytest.raises(StepFailed, match=r"step pause_consumers failed: .*did not acknowledge.*stuck"):
        engine.advance()
    state = engine.store.get(M)
    assert ("old", Phase.DUAL_WRITE) == (state.paused_side, state.phase)
    paused_version = state.version
    engine.abort(reason="the worker is stuck")
    state = engine.store.get(M)
    assert (None, Phase.DUAL_WRITE, paused_version + 1) == (state.paused_side, state.phase, state.version)
    aborted = engine.store.entry(state, state.last_seq)
    # The pause step failed (not done, so no undo of it runs): the abort itself lifts the pause.
    assert ("aborted", "failed") == (aborted.status, aborted.steps[0].status)
    assert ["pause", "lift"] == [t["command"] for t in aborted.takeovers if t["command"] != "abort"]

    with pytest.raises(StepFailed, match="stuck"):
        engine.advance()
    state = engine.store.get(M)
    workers.acknowledge(M, "old", "stuck", state.version)  # the worker comes round
    assert "committed" == engine.resume().status
    row = engine.store.entry(engine.store.get(M), state.in_progress_seq or 0)
    assert 1 == sum(1 for t in row.takeovers if t["command"] == "pause")


def test_abort_after_the_pause_runs_its_undo_and_lifts_the_pause(walk: tuple[Migration, Settings]) -> None:
    """The pause done, a later step fails (drain_policy 'fail'): `abort` runs lift_pause, the
    undo of pause_consumers, and the giving side consumes again."""
    engine, settings = walk
    engine.settings = settings.model_copy(update={"drain_policy": "fail", "guards": {TO_CUTOVER: []}})
    engine.advance()
    memory_store("old").put(task(1, status=TaskStatus.RUNNING))
    with pytest.raises(StepFailed, match="drain_old failed"):
        engine.advance()
    assert "old" == _paused(engine)
    engine.abort(reason="not now")
    state = engine.store.get(M)
    aborted = engine.store.entry(state, state.last_seq)
    assert (None, Phase.DUAL_WRITE) == (state.paused_side, state.phase)
    assert ["undone", "failed", "pending"] == [s.status for s in aborted.steps]
    lifted = [t["command"] for t in aborted.takeovers if t["command"] != "abort"]
    assert ["pause", "lift"] == lifted  # lifted once, by the undo


# -- hand-over and the ledger -----------------------------------------------------------------


def test_a_running_claim_of_a_live_worker_is_never_handed_over(walk: tuple[Migration, Settings]) -> None:
    """The drain's timeout: a task whose ledger claim runs on a live worker is executing right
    now: the drain stops naming it and its worker instead of re-queuing it (which would run it
    twice); once it finished, `resume` commits and the transfer carries its result."""
    engine, settings = walk
    engine.settings = settings.model_copy(update={"guards": {TO_CUTOVER: []}})
    engine.advance()
    old, new = memory_store("old"), memory_store("new")
    old.put_many([task(1, status=TaskStatus.RUNNING), task(2, status=TaskStatus.RUNNING)])
    new.put_many([task(1), task(2)])
    _workers(engine).acknowledge(M, "old", "busy-worker", 10**6)  # live, and past any pause
    ledger = _ledger(engine)
    claim = ledger.claim(M, "t0000001", "old", "busy-worker").claim
    assert claim is not None
    with pytest.raises(StepFailed, match=r"1 tasks still run on live workers.*t0000001 \(busy-worker\)"):
        engine.advance()
    assert (TaskStatus.PENDING, 0) == _statuses(new)["t0000001"]  # not re-queued
    assert (TaskStatus.PENDING, 1) == _statuses(new)["t0000002"]  # no claim: handed over
    ledger.finish(claim, "succeeded")
    old.put(task(1, status=TaskStatus.COMPLETED, attempts=1))
    assert "committed" == engine.resume().status
    assert (TaskStatus.COMPLETED, 1) == _statuses(new)["t0000001"]
    assert 0 == ledger.counts(M).executed_twice


def test_a_running_claim_of_a_gone_worker_is_handed_over(walk: tuple[Migration, Settings]) -> None:
    """A worker whose heartbeat is older than worker_ttl_seconds is gone: its running claim is
    handed over (compare-and-set on the worker and attempt seen), and only new may run it."""
    engine, _ = walk
    ledger = _ledger(engine)
    _workers(engine).register(M, "old", "crashed")
    claim = ledger.claim(M, "k", "old", "crashed").claim
    assert claim is not None
    assert not ledger.hand_over(M, "k", "old", "new")  # live: refused
    assert ("live", ("old", "crashed")) == (
        ledger.hand_over(M, "k", "old", "new").reason,
        ledger.hand_over(M, "k", "old", "new").holder,
    )
    _age(engine, "old", "crashed", engine.settings.worker_ttl_seconds + 1)
    assert ledger.hand_over(M, "k", "old", "new")
    assert ["handed_over"] == [e.outcome for e in ledger.executions(M, "k")]
    assert not ledger.claim(M, "k", "old", "another-old").allowed
    assert ledger.claim(M, "k", "new", "n").allowed


def test_an_edge_that_moves_consumption_without_a_pause_step_warns(
    walk: tuple[Migration, Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    """A config that lists its own steps keeps them; `advance --dry-run` warns when the edge
    moves consumption and none of them is pause_consumers (and the log at advance)."""
    engine, settings = walk
    own = {TO_CUTOVER: ["drain_old", "transfer_state"]}
    engine.settings = settings.model_copy(update={"steps": own, "guards": {TO_CUTOVER: []}})
    engine.advance()
    plan = engine.advance(dry_run=True)
    assert ["drain_old", "transfer_state"] == plan.steps
    [warning] = plan.warnings
    assert "moves consumption off the old side but has no pause_consumers step" in warning
    engine.settings = settings.model_copy(
        update={"steps": {TO_CUTOVER: ["pause_consumers", "drain_old"]}, "guards": {TO_CUTOVER: []}}
    )
    assert [] == engine.advance(dry_run=True).warnings
    assert [] == engine.rollback(reason="r", dry_run=True)[0].warnings  # dual_write -> preparation


class CountingStore(MemoryTaskStore):
    """A memory store that counts its progress writes: single rows and batches."""

    def __init__(self, name: str, records: Sequence[TaskRecord]) -> None:
        self.singles = 0
        self.batches: list[int] = []
        super().__init__(name, records)

    def set_progress(self, key: str, status: TaskStatus, attempts: int, updated_at: datetime) -> bool:
        self.singles += 1
        return super().set_progress(key, status, attempts, updated_at)

    def set_progress_many(self, updates: Sequence[ProgressUpdate]) -> int:
        self.batches.append(len(updates))
        return super().set_progress_many(updates)


def test_transfer_and_retire_write_progress_a_batch_per_transaction(walk: tuple[Migration, Settings]) -> None:
    """transfer_state and retire_old apply progress `set_progress_many` a batch at a time (the
    defect: one transaction per row, about 2,000 to 5,000 rows a second on SQLite WAL and
    PostgreSQL), each row a compare-and-set on the status it was read with."""
    engine, settings = walk
    engine.settings = settings.model_copy(update={"guards": {TO_CUTOVER: []}})
    source = tasks(30)
    memory_store("old").put_many([r.model_copy(update={"status": TaskStatus.COMPLETED}) for r in source])
    MEMORY["new"] = new = CountingStore("new", source)
    engine.advance()
    engine.advance()
    assert (0, [7, 7, 7, 7, 2]) == (new.singles, new.batches)  # backfill_batch_size = 7
    assert {(TaskStatus.COMPLETED, 0)} == set(_statuses(new).values())
    engine.ramp(100)
    MEMORY["old"] = old = CountingStore("old", [task(i) for i in range(40, 55)])
    new.put_many([task(i, status=TaskStatus.COMPLETED, attempts=1) for i in range(40, 55)])
    cutover.retire(_edge_context(engine, Phase.CUTOVER, Phase.CLEANUP))
    assert (0, [7, 7, 1]) == (old.singles, old.batches)
    assert {(TaskStatus.COMPLETED, 1)} == set(_statuses(old).values())
