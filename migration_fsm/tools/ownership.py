"""Who owns a handed-over task, and the hand-over markers no copy may carry onto its owner
(DESIGN.md section 10, issue 12).

A drain's hand-over gives a key to the receiving side in the execution ledger (claim state
`handed_over`, side = the receiver), makes the receiving copy `pending` and leaves a
**marker** on the giving side: its copy `cancelled`, so that no worker or reaper there runs
it again. The marker is not an end of the task: the task has not run, its owner is the other
side. Every path that copies statuses from one side to the other (`backfill` and its row
copy, `reconcile`, `transfer_state` / `reverse_sync`) must therefore not copy a marker over
the owner's unfinished copy, or the task runs nowhere. The ledger is the authority:

- `carries_marker`: the source copy is `cancelled`, the target's copy is not finished, and the
  ledger gives the key to the target side. Such a copy is left as the target has it.
- `OwnedKeys`: the keys the ledger gives to one side and that side has not finished
  (`handed_over` not yet claimed, or `running`), loaded once (they are the few tasks handed
  over or in flight), for the paths that copy in batches.

The other half is in `plugins/handover.py` (`give_back`): an edge that moves consumption away
from a side also gives that side's unclaimed hand-overs to the receiving side, so a key is
never owned by a side that no longer consumes.
"""

from __future__ import annotations

import bisect
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

from ..journal.ledger import HANDED_OVER, RUNNING, Ledger
from ..journal.workers import Workers
from ..tasks.capabilities import BulkGet
from ..tasks.records import TaskStatus
from .retire import FINISHED

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from sqlalchemy import Engine

    from ..config import Settings
    from ..journal.ledger import ClaimState
    from ..tasks.records import TaskRecord, TaskStore

#: Claim states in which the side holding the claim owns a task it has not finished.
OWNING: Final = (HANDED_OVER, RUNNING)


@contextmanager
def open_ledger(settings: Settings, engine: Engine) -> Iterator[Ledger]:
    """The execution ledger (`ledger_url`, else the migration database whose `engine` is
    given), with the workers' table to tell gone workers from live ones."""
    workers = Workers(engine, ttl_seconds=settings.worker_ttl_seconds)
    url = settings.ledger_database_url
    if url == settings.database_url:
        with Ledger(url, engine=engine, workers=workers) as shared:  # closes its own connections only
            yield shared
        return
    with Ledger(url, workers=workers) as ledger:
        yield ledger


def carries_marker(mine: TaskRecord, theirs: TaskRecord | None, claim: ClaimState | None, side: str) -> bool:
    """Whether copying the source copy `mine` over the target's copy `theirs` (on `side`)
    would carry a hand-over marker onto the task's owner: `mine` is cancelled, `theirs` is
    not finished, and the ledger gives the key to `side`."""
    return (
        mine.status is TaskStatus.CANCELLED
        and theirs is not None
        and theirs.status not in FINISHED
        and claim is not None
        and claim.side == side
    )


def get_many(store: TaskStore, keys: Sequence[str]) -> dict[str, TaskRecord]:
    """The records of `store` with these keys (`BulkGet` when the store has it)."""
    if isinstance(store, BulkGet):
        return dict(store.get_many(keys))
    found = {}
    for key in keys:
        record = store.get(key)
        if record is not None:
            found[key] = record
    return found


class OwnedKeys:
    """The keys the ledger gives to `side` that it has not finished (`OWNING`), in Python
    string order (the order of a store's scan), loaded once."""

    def __init__(self, ledger: Ledger, migration: str, side: str, batch_size: int = 1000) -> None:
        self.ledger, self.migration, self.side = ledger, migration, side
        keys: list[str] = []
        after: str | None = None
        while found := ledger.owned_keys(migration, side, OWNING, after=after, limit=batch_size):
            keys.extend(found)
            after = found[-1]
        self.keys = sorted(keys)
        self._set = frozenset(keys)

    def any_after(self, after: str | None) -> bool:
        """Whether an owned key sorts after `after` (None: any at all)."""
        if after is None:
            return bool(self.keys)
        return bisect.bisect_right(self.keys, after) < len(self.keys)

    def without_markers(self, records: Sequence[TaskRecord], target: TaskStore) -> list[TaskRecord]:
        """`records` (source copies bound for `target`) but those that would carry a hand-over
        marker onto their owner (`carries_marker`)."""
        suspects = [r.key for r in records if r.key in self._set and r.status is TaskStatus.CANCELLED]
        if not suspects:
            return list(records)
        theirs = get_many(target, suspects)
        kept = set()
        for key in suspects:
            claim = self.ledger.claim_of(self.migration, key)
            mine = next(r for r in records if r.key == key)
            if carries_marker(mine, theirs.get(key), claim, self.side):
                kept.add(key)
        return [r for r in records if r.key not in kept]
