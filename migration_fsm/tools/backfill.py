"""Backfill: copy every task from the old side to the new side in keyset batches.

Each batch is one `put_many` (an idempotent upsert, one transaction on a SQL store) followed
by a checkpoint of its last key. The batch and its checkpoint live in different databases,
so after a crash the next run starts after the last checkpoint and may write one batch a
second time, which the upsert makes harmless: the result is the same as an uninterrupted run.
Memory stays bounded by one batch.

A backfill writes only while no transition is in progress or interrupted and the migration
is still at the version it found when it began: checked when it starts (exit 3) and again
before every batch, under `Journal.data_fence` (the lock every transition takes), so a
batch is never written after the phase left `dual_write` (a task the new workers finished
would go back to pending and run twice).

Between two SQL stores of one kind of database the batches are copied as rows (`RowCopy`):
the source database reads each field in the target column's form (text timestamps and
epoch counts converted in SQL) and checks it, so no record is decoded and encoded again; a
row that fails a check goes the record path alone, its batch's other rows stay rows.
`BackfillResult` counts the rows of each path (`backfill --json`'s `paths`).

A backfill never carries a hand-over marker onto the side that owns the task
(`ownership.py`): while a key the ledger gives to the new side, unfinished there, lies ahead
of the cursor, batches go the record path and leave the new copy of such a key as it is
when the old copy is the marker (`cancelled`). Those keys are the few handed over and not
yet claimed, or running on new; with none (the usual case, since the default rollback gives
hand-overs back to old) every batch is a row copy.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url

from ..exceptions import BadInput
from ..fsm import authoritative_phases, routing_for
from ..journal.locks import lease_holder_name
from ..tasks.capabilities import Count
from ..tasks.scan import page
from ..tasks.sides import open_sides, shares_migration_file
from ..tasks.sql import RowCopy
from ..tasks.sql.rowcopy import CopiedBatch
from . import runs
from .ownership import OwnedKeys, open_ledger
from .progress import NoProgress, Progress

#: How often a backfill's row copy waits for the disk (and saves its checkpoint), at most.
DURABLE_EVERY_SECONDS = 1.0

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from ..config import Settings
    from ..journal import Journal
    from ..tasks.records import TaskStore


@dataclass(frozen=True, slots=True)
class BackfillResult:
    """What one backfill run did: the `backfill --json` object."""

    copied: int  # rows written by this run
    total: int  # rows on the new side afterwards
    seconds: float
    rows_per_second: float
    resumed_from: str | None  # the checkpoint key this run started after; None for a fresh start
    fast: int = 0  # of `copied`, rows copied as rows (`RowCopy`), never decoded
    records: int = 0  # of `copied`, rows copied as records (decoded and encoded again)

    def as_json(self) -> dict[str, Any]:
        return {
            "copied": self.copied,
            "total": self.total,
            "seconds": self.seconds,
            "rows_per_second": self.rows_per_second,
            "resumed_from": self.resumed_from,
            "paths": {"fast": self.fast, "records": self.records},
        }


def total_of(store: TaskStore) -> int:
    """How many tasks `store` holds."""
    if isinstance(store, Count):
        return store.count()
    return sum(store.count_by_status().values())


def copy_tasks(
    old: TaskStore,
    new: TaskStore,
    *,
    batch_size: int,
    after: str | None = None,
    checkpoint: Callable[[str, int], None] | None = None,
    max_rate: float | None = None,
    progress: Progress | None = None,
    done_before: int = 0,
    fence: Callable[[], AbstractContextManager[object]] | None = None,
    owned: OwnedKeys | None = None,
    checkpoint_in_same_log: bool = False,
) -> BackfillResult:
    """Copy the tasks of `old` with keys > `after` into `new`, `batch_size` at a time.

    After each batch `checkpoint(last_key, copied_so_far)` is called. `max_rate` caps the
    rows per second (the run sleeps between batches), so the copy never starves the
    database it reads. `done_before` is what earlier runs copied (for the progress ETA).
    Each batch is read and written inside `fence()` (`Journal.data_fence`: it raises, and
    the copy stops, when the migration changed since the backfill began). `owned`: the keys
    the ledger gives to the new side, whose new copy no hand-over marker may replace
    (`OwnedKeys.without_markers`); such a copy counts as copied (it is current).
    `checkpoint_in_same_log`: `checkpoint` writes to the log `new` writes to (one SQLite file,
    or one PostgreSQL server), after it, so it never outlives the batch: one a batch then."""
    fenced = fence or nullcontext
    progress = progress or NoProgress()
    if max_rate is not None:
        # Smaller batches keep the pace even instead of bursty.
        batch_size = max(1, min(batch_size, int(max_rate)))
    started = time.monotonic()
    progress.start(total_of(old), done_before)
    rows = RowCopy.between(old, new)
    copied = fast = 0
    cursor = after
    # Row copies commit without waiting for the disk (SQLite in WAL mode: synchronous=NORMAL;
    # PostgreSQL: synchronous_commit off), except one a second. A checkpoint is saved only
    # after a durable commit, and a durable commit makes every earlier one durable too (each
    # database writes its log in order), so a checkpoint never gets ahead of the rows on disk:
    # a crash or a power cut can only make the next run repeat the last second's batches,
    # never skip one. The target waits for the disk once more before the run ends (or is marked
    # done): a durable copy of the last batch again could write nothing, and so wait for nothing.
    synced = time.monotonic()
    unsynced = False  # whether a batch since the last durable commit did not wait for the disk
    try:
        while True:
            durable = time.monotonic() - synced >= DURABLE_EVERY_SECONDS
            with fenced():
                batch = _copy_batch(old, new, rows, cursor, batch_size, owned, durable=durable)
            written, last = batch.count, batch.last
            if last is None:
                break
            unsynced = unsynced or not batch.durable
            copied += written
            fast += batch.fast
            cursor = last
            if batch.durable:
                synced, unsynced = time.monotonic(), False
            if checkpoint is not None and (batch.durable or checkpoint_in_same_log):
                checkpoint(cursor, copied)
            progress.advance(written, cursor)
            if max_rate is not None:
                ahead = started + copied / max_rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            if written < batch_size:
                break
        if unsynced and not checkpoint_in_same_log and rows is not None:
            rows.target.make_durable()  # every batch before is on disk now
            if checkpoint is not None and cursor is not None:
                checkpoint(cursor, copied)
    finally:
        progress.finish()
    seconds = time.monotonic() - started
    return BackfillResult(
        copied=copied,
        total=total_of(new),
        seconds=round(seconds, 3),
        rows_per_second=round(copied / seconds, 1) if seconds > 0 else 0.0,
        resumed_from=after,
        fast=fast,
        records=copied - fast,
    )


def _copy_batch(  # noqa: PLR0917 - both stores, the row copy, the page, the owned keys
    old: TaskStore,
    new: TaskStore,
    rows: RowCopy | None,
    after: str | None,
    batch_size: int,
    owned: OwnedKeys | None = None,
    *,
    durable: bool = True,
) -> CopiedBatch:
    """Copy the next batch after `after`: as rows when the two stores allow it and no owned
    key lies ahead (a row that fails a check goes as its record, alone), else as records.
    Returns how many went which way and the batch's last key (None when there was none)."""
    guarded = owned is not None and owned.any_after(after)
    if rows is not None and not guarded:
        copied = rows.copy_batch(after, batch_size, durable=durable)
        if copied is not None:
            return copied
    records = page(old, batch_size, after)  # also the rows' fallback: it converts or names the bad row
    new.put_many(owned.without_markers(records, new) if owned is not None and guarded else records)
    return CopiedBatch(0, len(records), records[-1].key if records else None)


def same_server(first: str, second: str) -> bool:
    """Whether two database URLs are on one PostgreSQL server (one write-ahead log)."""
    a, b = make_url(first), make_url(second)
    return a.get_backend_name() == b.get_backend_name() == "postgresql" and (a.host, a.port) == (
        b.host,
        b.port,
    )


def backfill_migration(
    store: Journal,
    settings: Settings,
    migration: str,
    *,
    batch_size: int | None = None,
    max_rate: float | None = None,
    progress: Progress | None = None,
) -> BackfillResult:
    """`migration-fsm backfill`: continue the migration's unfinished backfill from its
    checkpoint (in `mfsm_backfill`), or start a fresh one when the last one finished."""
    with open_sides(settings) as (old, new):  # no stores configured: ConfigError, first
        state = store.get(migration)  # an unknown migration is bad input, before anything is copied
        # A transition in progress (its drain may take minutes) or interrupted: exit 3, nothing
        # copied. Checked again before every batch, under the fence every transition takes.
        store.check_data_fence(state, "backfill", state.version)
        if routing_for(state.phase, state.percent).authoritative != "old":
            # Once new is authoritative, copying old over it would undo finished work.
            safe = authoritative_phases("old")
            raise BadInput(
                f"backfill copies the old side over the new one, which is only safe in"
                f" {' or '.join(safe)}; migration '{migration}' is in {state.phase}:"
                f" roll back to {safe[-1]} first"
            )
        previous = runs.backfill_progress(store, migration)
        if previous is not None and not previous.done:
            after, before = previous.cursor, previous.copied
        else:
            runs.start_backfill(store, migration)
            after, before = None, 0

        def checkpoint(cursor: str, copied: int) -> None:
            runs.save_backfill(store, migration, cursor=cursor, copied=before + copied)

        holder = lease_holder_name(settings.actor)
        hold = not shares_migration_file(settings, "new")
        new_store = settings.stores.get("new")
        same_log = not hold or (
            new_store is not None
            and new_store.url is not None
            and same_server(settings.database_url, new_store.url)
        )

        def fence() -> AbstractContextManager[object]:
            return store.data_fence(migration, holder, tool="backfill", version=state.version, hold=hold)

        with open_ledger(settings, store.engine) as ledger:
            owned = OwnedKeys(ledger, migration, "new")
            result = copy_tasks(
                old,
                new,
                batch_size=batch_size or settings.backfill_batch_size,
                after=after,
                checkpoint=checkpoint,
                max_rate=max_rate,
                progress=progress,
                done_before=before,
                fence=fence,
                owned=owned,
                checkpoint_in_same_log=same_log,
            )
        final = runs.backfill_progress(store, migration)
        cursor = final.cursor if final is not None else after
        runs.save_backfill(store, migration, cursor=cursor, copied=before + result.copied, done=True)
        return result
