"""Which old copies a stock old worker would still run although the new side ran them or
owns them: what the step `retire_old` retires, and what `validate` and the guard
`old_drained` count (DESIGN.md section 10, issue 12).

Once the new side consumes (`cutover`, `cleanup`, `complete`), every task with a new copy is
new's to run. An old copy still pending (or running) is one a stock old worker, started later
without a gate, would run: again if new ran it, a second time alongside new if new has not
finished it yet. `retire_old` therefore retires each runnable old copy of a task with a new
copy, in old's own status words:

- the new copy finished: the old copy gets its status and attempts (as before);
- the ledger says the task succeeded on new (its copy lags): `completed`;
- new has not finished it (pending or running there): a **hand-over** from old to new, like a
  drain's: the ledger gives the key to new (`Ledger.hand_over`, a no-op when a new worker has
  claimed it already), then the old copy becomes `cancelled`, the marker no copy carries onto
  the owner (`ownership.py`). The rollback `cleanup -> cutover` copies new's status back over
  the marker (`reverse_sync`: a runnable old copy again, of a task new did not run), and
  `cutover -> dual_write` gives the key back to old in the ledger (`give_back`).

A key the ledger gives to old (a claim of an old worker, running or succeeded, or a
hand-over to old) is not new's: left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ..journal.ledger import SUCCEEDED
from ..tasks.records import TaskStatus
from ..tasks.scan import merge, records

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..journal.ledger import ClaimState, Ledger
    from ..tasks.records import TaskRecord, TaskStore

#: Statuses a worker would still take (or hold): an old copy in one of them is runnable.
RUNNABLE: Final = frozenset({TaskStatus.PENDING, TaskStatus.RUNNING})
#: Statuses of a task that ran to its end.
FINISHED: Final = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})


@dataclass(frozen=True, slots=True)
class Retirement:
    """One runnable old copy to retire: the status and attempts it gets, and whether the
    ledger must first give the key to new (`hand_over`: new has not finished the task)."""

    record: TaskRecord
    status: TaskStatus
    attempts: int
    hand_over: bool = False


def retirements(
    old: TaskStore,
    new: TaskStore,
    ledger: Ledger | None,
    migration: str,
    batch_size: int,
    *,
    owned_by_new: bool = True,
) -> Iterator[Retirement]:
    """Each runnable old copy of a task the new side ran or owns (see the module docstring),
    in key order. Without a `ledger`, only the copies whose new copy finished. Without
    `owned_by_new` (old consumes: before `cutover`, or back in `dual_write`), only the copies
    of tasks that *ran* on new: the others are old's to run."""
    batch: list[tuple[TaskRecord, TaskRecord]] = []
    for mine, theirs in merge(records(old, batch_size), records(new, batch_size)):
        if mine is None or theirs is None or mine.status not in RUNNABLE:
            continue
        if theirs.status in FINISHED:
            yield from _decide(batch, ledger, migration)
            batch.clear()
            yield Retirement(mine, theirs.status, max(mine.attempts, theirs.attempts))
        elif ledger is not None and owned_by_new:
            batch.append((mine, theirs))
            if len(batch) >= batch_size:
                yield from _decide(batch, ledger, migration)
                batch.clear()
    yield from _decide(batch, ledger, migration)
    if ledger is not None:  # succeeded on new, which has no copy of it at all
        for mine, status, attempts in ledger_ran_on_new(old, new, ledger, migration, batch_size):
            if new.get(mine.key) is None:
                yield Retirement(mine, status, attempts)


def _decide(
    batch: list[tuple[TaskRecord, TaskRecord]], ledger: Ledger | None, migration: str
) -> Iterator[Retirement]:
    """The runnable old copies of tasks new has not finished, judged by their claims (one
    ledger query per batch)."""
    if not batch or ledger is None:
        return
    claims = ledger.claims_of(migration, [mine.key for mine, _ in batch])
    for mine, theirs in batch:
        claim = claims.get(mine.key)
        if claim is not None and claim.side == "new" and claim.state == SUCCEEDED:
            yield Retirement(mine, TaskStatus.COMPLETED, max(mine.attempts, theirs.attempts))
        elif _news(claim):
            yield Retirement(mine, TaskStatus.CANCELLED, mine.attempts, hand_over=True)


def _news(claim: ClaimState | None) -> bool:
    """Whether the ledger lets the key be new's: never claimed, claimed on new, or a failed
    claim or a hand-over of old that a hand-over to new takes over."""
    if claim is None or claim.side == "new":
        return True
    return claim.state not in ("running", SUCCEEDED)


def ran_on_new(
    old: TaskStore, new: TaskStore, ledger: Ledger | None, migration: str, batch_size: int
) -> Iterator[tuple[TaskRecord, TaskStatus, int]]:
    """Each runnable old copy of a task that *ran* on the new side, with the status and
    attempts the old copy should have (`retirements` without the hand-overs)."""
    for retirement in retirements(old, new, ledger, migration, batch_size):
        if not retirement.hand_over:
            yield retirement.record, retirement.status, retirement.attempts


def ledger_ran_on_new(
    old: TaskStore, new: TaskStore, ledger: Ledger, migration: str, batch_size: int
) -> Iterator[tuple[TaskRecord, TaskStatus, int]]:
    """The part of `ran_on_new` the ledger alone knows: runnable old copies of keys that
    succeeded on the new side while the new copy does not say finished (yet)."""
    from .ownership import get_many

    after: str | None = None
    while keys := ledger.succeeded_keys(migration, "new", after=after, limit=batch_size):
        after = keys[-1]
        olds, news = get_many(old, keys), get_many(new, keys)
        for key in keys:
            mine, theirs = olds.get(key), news.get(key)
            if mine is None or mine.status not in RUNNABLE:
                continue
            if theirs is not None and theirs.status in FINISHED:
                continue  # the store scan has it
            yield mine, TaskStatus.COMPLETED, max(mine.attempts, theirs.attempts if theirs else 0)
