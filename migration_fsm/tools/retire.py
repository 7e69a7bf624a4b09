"""Which old copies of tasks that ran on the new side a stock old worker would still run:
what the step `retire_old` marks finished, and what `validate` and the guard `old_drained`
count (DESIGN.md section 10)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from ..tasks.capabilities import BulkGet
from ..tasks.records import TaskStatus
from ..tasks.scan import merge, records

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from ..journal.ledger import Ledger
    from ..tasks.records import TaskRecord, TaskStore

#: Statuses a worker would still take (or hold): an old copy in one of them is runnable.
RUNNABLE: Final = frozenset({TaskStatus.PENDING, TaskStatus.RUNNING})
#: Statuses of a task that ran to its end.
FINISHED: Final = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})


def ran_on_new(
    old: TaskStore, new: TaskStore, ledger: Ledger | None, migration: str, batch_size: int
) -> Iterator[tuple[TaskRecord, TaskStatus, int]]:
    """Each runnable old copy (pending or running) of a task that ran on the new side, with
    the status and attempts the old copy should have: the new copy's, when it finished; else
    `completed` when the ledger says the task succeeded on the new side."""
    for mine, theirs in merge(records(old, batch_size), records(new, batch_size)):
        if mine is not None and theirs is not None and mine.status in RUNNABLE and theirs.status in FINISHED:
            yield mine, theirs.status, max(mine.attempts, theirs.attempts)
    if ledger is not None:
        yield from ledger_ran_on_new(old, new, ledger, migration, batch_size)


def _get_many(store: TaskStore, keys: Sequence[str]) -> dict[str, TaskRecord]:
    if isinstance(store, BulkGet):
        return dict(store.get_many(keys))
    found = {}
    for key in keys:
        record = store.get(key)
        if record is not None:
            found[key] = record
    return found


def ledger_ran_on_new(
    old: TaskStore, new: TaskStore, ledger: Ledger, migration: str, batch_size: int
) -> Iterator[tuple[TaskRecord, TaskStatus, int]]:
    """The part of `ran_on_new` the ledger alone knows: runnable old copies of keys that
    succeeded on the new side while the new copy does not say finished (yet)."""
    after: str | None = None
    while keys := ledger.succeeded_keys(migration, "new", after=after, limit=batch_size):
        after = keys[-1]
        olds, news = _get_many(old, keys), _get_many(new, keys)
        for key in keys:
            mine, theirs = olds.get(key), news.get(key)
            if mine is None or mine.status not in RUNNABLE:
                continue
            if theirs is not None and theirs.status in FINISHED:
                continue  # the store scan has it
            yield mine, TaskStatus.COMPLETED, max(mine.attempts, theirs.attempts if theirs else 0)
