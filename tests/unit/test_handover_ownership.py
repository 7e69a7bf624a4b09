"""Issue 12: a task handed over by a drain must stay runnable on exactly one side, through
every later rollback, forward edge, backfill, reconcile and `retire_old`, on SQLite and
PostgreSQL, through the real commands.

A hand-over leaves a **marker** on the giving side (its copy `cancelled`) and gives the key
to the receiving side in the execution ledger. The defects: the marker was copied onto the
side that owns the task (backfill, the in-database row copy, reconcile), and a rollback or a
second cutover moved consumption away from a side that owned an unclaimed hand-over without
giving it back, so the task ran nowhere."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final

import pytest

from migration_fsm import commands
from migration_fsm.client import RepairLog
from migration_fsm.config import Settings
from migration_fsm.fsm import Phase
from migration_fsm.journal import Journal
from migration_fsm.journal.ledger import Ledger
from migration_fsm.journal.workers import Workers
from migration_fsm.tasks.factory import build_store
from migration_fsm.tasks.records import TaskRecord, TaskStatus, TaskStore
from migration_fsm.tools.validate import validate_migration
from tests.support.datatools import create_task_table, sql_stores, task, tasks

M: Final = "default"
K: Final = task(3).key  # the task that is handed over


@pytest.fixture
def sides(
    store: Journal, upgraded_url: str, make_settings: Callable[..., Settings]
) -> Iterator[tuple[Settings, TaskStore, TaskStore]]:
    """Settings with two SQL task tables in the test database (SQLite or PostgreSQL), a short
    drain that hands over (`requeue`), the migration in preparation, and both stores."""
    for table in ("old_tasks", "new_tasks"):
        create_task_table(upgraded_url, table)
    settings = make_settings(
        stores=sql_stores(upgraded_url),
        drain_timeout_seconds=0.2,
        drain_policy="requeue",
        backfill_batch_size=4,
    )
    commands.init(settings, M)
    old, new = build_store(settings.stores["old"], "old"), build_store(settings.stores["new"], "new")
    yield settings, old, new
    for opened in (old, new):
        opened.close()  # type: ignore[attr-defined]


def _ledger(settings: Settings, store: Journal) -> Ledger:
    return Ledger(settings.database_url, engine=store.engine, workers=Workers(store.engine, ttl_seconds=30))


def _runners(settings: Settings, store: Journal, old: TaskStore, new: TaskStore, key: str = K) -> set[str]:
    """The sides on which a gated worker would run `key` now: its copy there is pending and
    the ledger lets that side claim it (never claimed, or failed / handed over on that side)."""
    claim = _ledger(settings, store).claim_of(M, key)
    found = set()
    for side, side_store in (("old", old), ("new", new)):
        copy = side_store.get(key)
        if copy is None or copy.status is not TaskStatus.PENDING:
            continue
        if claim is None or (claim.state in ("failed", "handed_over") and claim.side == side):
            found.add(side)
    return found


def _status(side_store: TaskStore, key: str = K) -> TaskStatus:
    record = side_store.get(key)
    assert record is not None
    return record.status


def _forward_to_cutover(settings: Settings, store: Journal) -> None:
    """Backfill, validate, advance into cutover (pause, drain, transfer_state)."""
    commands.backfill(settings, M)
    assert validate_migration(store, settings, M, settle=0)[1].ok
    commands.advance(settings, M, reason="cutover")
    assert Phase.CUTOVER == store.get(M).phase


def _hand_over_at_cutover(
    settings: Settings,
    store: Journal,
    old: TaskStore,
    new: TaskStore,
    records: list[TaskRecord] | None = None,
) -> None:
    """dual_write -> cutover while K runs on old (a dead worker, no claim): the drain times
    out and hands K over to new."""
    commands.advance(settings, M, reason="dual writes")
    old.put_many(records or tasks(8))
    old.put(task(3, status=TaskStatus.RUNNING))
    _forward_to_cutover(settings, store)
    assert (TaskStatus.CANCELLED, TaskStatus.PENDING) == (_status(old), _status(new))
    assert {"new"} == _runners(settings, store, old, new)


def test_a_rollback_gives_an_unclaimed_hand_over_back_and_backfill_keeps_it_runnable(
    store: Journal, sides: tuple[Settings, TaskStore, TaskStore]
) -> None:
    """Handed over to new at cutover, not claimed there, then cutover -> dual_write and a
    backfill: old consumes again, so old must be able to run K (the defect: the ledger still
    gave K to new and old's workers acknowledged it as done elsewhere: K ran nowhere); and
    forward again, new must (after the second transfer_state)."""
    settings, old, new = sides
    _hand_over_at_cutover(settings, store, old, new)
    commands.rollback(settings, M, reason="new workers fail")
    assert Phase.DUAL_WRITE == store.get(M).phase
    assert {"old"} == _runners(settings, store, old, new)
    commands.backfill(settings, M)
    assert {"old"} == _runners(settings, store, old, new)
    _forward_to_cutover(settings, store)
    assert {"new"} == _runners(settings, store, old, new)


def test_backfill_never_copies_a_hand_over_marker_onto_the_side_that_owns_the_task(
    store: Journal, sides: tuple[Settings, TaskStore, TaskStore]
) -> None:
    """A rollback edge configured without steps leaves K given to new (pending there,
    cancelled on old). The backfill in dual_write then copied old's `cancelled` over new's
    pending copy (the in-database row copy on both databases): K ran nowhere once new
    consumed again. Backfill must leave the owner's copy alone."""
    settings, old, new = sides
    settings = settings.model_copy(update={"steps": {"cutover->dual_write": []}})
    _hand_over_at_cutover(settings, store, old, new)
    commands.rollback(settings, M, reason="rollback without steps")
    commands.backfill(settings, M)
    assert TaskStatus.PENDING == _status(new)
    assert all(_status(new, r.key) is TaskStatus.PENDING for r in tasks(8) if r.key != K)  # the rest copied
    _forward_to_cutover(settings, store)
    assert {"new"} == _runners(settings, store, old, new)


def test_reconcile_never_copies_a_hand_over_marker_onto_the_owner(
    store: Journal, upgraded_url: str, sides: tuple[Settings, TaskStore, TaskStore]
) -> None:
    """A repair entry for K (its dual write to new failed once) replayed after the hand-over:
    old's copy (cancelled, written last) looked newer than new's pending one and replaced it."""
    settings, old, new = sides
    _hand_over_at_cutover(settings, store, old, new)
    repair = RepairLog(upgraded_url, M)
    repair.record(K, "new", "ConnectionError: new is down")
    repair.close()
    result = commands.reconcile(settings, M)
    assert 0 == result.open
    assert TaskStatus.PENDING == _status(new)
    assert {"new"} == _runners(settings, store, old, new)


def test_a_rollback_hand_over_to_old_goes_back_to_new_with_the_next_cutover(
    store: Journal, sides: tuple[Settings, TaskStore, TaskStore]
) -> None:
    """The mirror: K runs on new on a worker that is gone; cutover -> dual_write hands it over
    to old (pending there, cancelled on new). Nobody on old takes it, and the migration goes
    forward again: transfer_state copied old's pending over new's cancelled copy, but the
    ledger still gave K to old, so new's workers acknowledged it as done elsewhere."""
    settings, old, new = sides
    commands.advance(settings, M, reason="dual writes")
    old.put_many(tasks(8))
    _forward_to_cutover(settings, store)
    claimed = _ledger(settings, store).claim(M, K, "new", "gone-worker")  # never registered: gone
    assert claimed.allowed
    new.put(task(3, status=TaskStatus.RUNNING, attempts=0))
    commands.rollback(settings, M, reason="new workers fail")
    assert (TaskStatus.PENDING, TaskStatus.CANCELLED) == (_status(old), _status(new))
    assert {"old"} == _runners(settings, store, old, new)
    _forward_to_cutover(settings, store)
    assert {"new"} == _runners(settings, store, old, new)
    assert TaskStatus.CANCELLED == _status(old)


# -- retire_old: old copies of tasks new owns but has not finished --------------------------


def _to_cleanup(settings: Settings, store: Journal) -> None:
    commands.ramp(settings, M, 100, reason="all reads on new")
    assert validate_migration(store, settings, M, settle=0)[1].ok
    commands.advance(settings, M, reason="cleanup")
    assert Phase.CLEANUP == store.get(M).phase


def test_retire_old_hands_over_the_old_copies_of_tasks_new_has_not_finished(
    store: Journal, sides: tuple[Settings, TaskStore, TaskStore]
) -> None:
    """At cutover -> cleanup K is still pending on new (and another task runs there): their
    old copies stayed pending, so a stock old worker started later ran them while new did
    too. `retire_old` marks them handed over on old (`cancelled`, given to new in the ledger);
    `old_drained` and `validate` count them before, and none after."""
    settings, old, new = sides
    commands.advance(settings, M, reason="dual writes")
    old.put_many(tasks(8))
    _forward_to_cutover(settings, store)
    running = task(5).key
    assert _ledger(settings, store).claim(M, running, "new", "new-worker").allowed
    new.put(task(5, status=TaskStatus.RUNNING))
    new.put(task(6, status=TaskStatus.COMPLETED, attempts=1))  # ran on new: retired as before
    commands.ramp(settings, M, 100, reason="all reads on new")
    before = validate_migration(store, settings, M, settle=0)[1]
    assert 8 == before.runnable_old_copies  # every old copy is runnable, and new owns them all
    dry = commands.advance(settings, M, dry_run=True, reason="look")
    assert "8 runnable old copies" in next(g.detail for g in dry.guards if g.name == "old_drained")
    commands.advance(settings, M, reason="cleanup")
    assert Phase.CLEANUP == store.get(M).phase
    assert {TaskStatus.CANCELLED} == {_status(old, r.key) for r in tasks(8) if r.key != task(6).key}
    assert TaskStatus.COMPLETED == _status(old, task(6).key)
    assert (TaskStatus.PENDING, TaskStatus.RUNNING) == (_status(new), _status(new, running))
    ledger = _ledger(settings, store)
    claim = ledger.claim_of(M, K)
    assert claim is not None
    assert ("new", "handed_over") == (claim.side, claim.state)
    assert not ledger.claim(M, K, "old", "old-worker").allowed  # a gated old worker: refused
    assert {"new"} == _runners(settings, store, old, new)
    assert 0 == validate_migration(store, settings, M, settle=0)[1].runnable_old_copies


def test_a_retired_old_copy_is_runnable_on_old_again_after_the_rollbacks(
    store: Journal, sides: tuple[Settings, TaskStore, TaskStore]
) -> None:
    """The way back: cleanup -> cutover restores a runnable (pending) old copy of K, which
    new did not run, and cutover -> dual_write gives K back to old in the ledger."""
    settings, old, new = sides
    commands.advance(settings, M, reason="dual writes")
    old.put_many(tasks(8))
    _forward_to_cutover(settings, store)
    _to_cleanup(settings, store)
    assert TaskStatus.CANCELLED == _status(old)
    commands.rollback(settings, M, reason="fallback reads")
    assert Phase.CUTOVER == store.get(M).phase
    assert (TaskStatus.PENDING, TaskStatus.PENDING) == (_status(old), _status(new))
    assert {"new"} == _runners(settings, store, old, new)
    commands.ramp(settings, M, 0, reason="reads back on old")
    commands.rollback(settings, M, reason="new workers fail")
    assert Phase.DUAL_WRITE == store.get(M).phase
    assert {"old"} == _runners(settings, store, old, new)
    assert all(_runners(settings, store, old, new, r.key) == {"old"} for r in tasks(8))
