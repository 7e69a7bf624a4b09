"""What moves tasks between the sides inside a transition (DESIGN.md section 10): the
acknowledged pause, the drain and its hand-over, the status transfer, and `retire_old`.

- `pause_consumers(ctx)` publishes the pause of the **giving side** (the side that consumes
  in the source phase and not in the destination: `fsm.giving_side`) through the lease, then
  waits until every live worker of that side (`mfsm_workers`) has acknowledged the pause's
  version. Workers whose heartbeat is older than `worker_ttl_seconds` are gone: named in the
  log, not waited for. No registered worker at all: it says so and goes on (a migration
  without gates works as before). At `pause_timeout_seconds` it fails (the transition stops;
  `resume` waits again, `abort` lifts the pause). `lift_pause` is its undo.
- `drain(ctx, side)` waits until `side` has no `running` task. At the timeout
  (`drain_timeout_seconds`) the tasks still running are handled by `drain_policy`:
  `requeue` **hands each one over**: the ledger gives the key to the receiving side, the
  receiving copy becomes `pending` with `attempts + 1`, and the giving copy `cancelled` (it
  is not to run there: nothing re-queues it on the giving side). A task whose ledger claim
  is running on a **live** worker is not handed over (it is executing right now: a copy on
  the other side would run it twice): the drain stops naming them; `resume` once they have
  finished, or once their worker is gone. `fail` stops the transition. On an edge that moves
  consumption away from `side`, the drain also **gives back** every key the ledger handed
  over to `side` earlier that no worker there claimed (`HandOvers.give_back`): pending on the
  receiving side, given to it in the ledger, `cancelled` on `side`. A side that stops
  consuming owns no task, or the task would run nowhere (issue 12).
- `sync_status(ctx, source, target)` copies every source task's status and attempts to its
  target copy (the whole task when the target has no copy). It never copies `running`:
  a task running on the giving side is handed over as by the drain; a task running on a
  side that keeps consuming leaves the target's status alone. A task the drain handed over
  keeps what the drain gave it: a hand-over **marker** (the giving copy's `cancelled`) is never
  copied over the copy of the side the ledger gives the task to (`tools/ownership.py`, which
  `backfill` and `reconcile` follow too). When the source is the giving side it gives back its
  unclaimed hand-overs first, as the drain does. A target row changes only in its status,
  attempts and updated_at columns (`SetProgress`), in the target's own formats.
- `retire(ctx)` retires every runnable old copy of a task the new side ran or owns
  (`tools/retire.py`): finished on old when it ran on new (its new copy finished, or the
  ledger says it succeeded there); handed over to new (the ledger first, then the old copy
  `cancelled`) when new has not finished it; so that a stock old worker started later runs
  nothing twice, nor alongside new. `runnable_copies` counts the ones left.

All are idempotent and checkpointed, so `resume` after a crash finishes the work.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final

from ..fsm import giving_side, routing_for
from ..journal import utcnow
from ..journal.ledger import HANDED_OVER, Ledger
from ..journal.workers import Workers
from ..tasks.capabilities import ForwardPut, SetProgress, SetProgressMany
from ..tasks.records import ProgressUpdate, TaskRecord, TaskStatus
from ..tasks.scan import merge, records
from ..tasks.sides import open_side
from ..tools.ownership import carries_marker, get_many
from ..tools.ownership import open_ledger as ledger_of
from ..tools.retire import retirements

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from ..fsm import Side
    from ..tasks.records import TaskStore
    from .context import Context

#: Longest pause between two looks at the draining side or at the workers.
POLL_SECONDS = 0.5
#: How many tasks an error message names.
_NAMED: Final = 5


class DrainTimeout(RuntimeError):
    """Tasks were still running at the drain timeout and the policy is `fail`, or they run
    on live workers and cannot be handed over."""


class PauseTimeout(RuntimeError):
    """Live workers of the giving side did not acknowledge the pause in time."""


def _other(side: Side) -> Side:
    return "new" if side == "old" else "old"


def running_count(store: TaskStore) -> int:
    """How many tasks of `store` are `running`."""
    return int(store.count_by_status().get(TaskStatus.RUNNING, 0))


@contextmanager
def open_ledger(ctx: Context) -> Iterator[Ledger]:
    """The execution ledger (`ledger_url`, else the migration database), with the workers'
    table to tell gone workers from live ones."""
    with ledger_of(ctx.settings, ctx.store.engine) as ledger:
        yield ledger


def _named(items: Sequence[str]) -> str:
    more = f" and {len(items) - _NAMED} more" if len(items) > _NAMED else ""
    return ", ".join(items[:_NAMED]) + more


# -- the acknowledged pause ------------------------------------------------------------------


def pause_consumers(ctx: Context) -> None:
    """Pause the giving side's consumers and wait for every live worker's acknowledgement."""
    settings = ctx.settings
    side = giving_side(ctx.source, ctx.dest)
    if side is None:
        ctx.log.warning("pause_skipped", edge=f"{ctx.source}->{ctx.dest}", why="consumption does not move")
        return
    version = ctx.pause(side)
    ctx.save_checkpoint({"side": side, "version": version})  # `status` and `history` show it
    workers = Workers(ctx.store.engine, ttl_seconds=settings.worker_ttl_seconds)
    deadline = time.monotonic() + settings.pause_timeout_seconds
    named: set[str] = set()
    while True:
        judged = workers.side(ctx.migration, side, version)
        gone = [w.worker_id for w in judged.gone]
        if fresh := [w for w in gone if w not in named]:
            named.update(fresh)
            ctx.record_workers_gone(side, fresh, {"side": side, "version": version, "gone": sorted(named)})
            ctx.log.warning(
                "workers_gone",
                side=side,
                workers=fresh,
                why=f"no heartbeat for more than worker_ttl_seconds ({settings.worker_ttl_seconds:g} s)",
            )
        if not judged.live and not gone:
            ctx.log.info(
                "pause_no_workers", side=side, version=version, why="no worker has registered a gate"
            )
            ctx.save_checkpoint({"side": side, "version": version, "acknowledged": 0, "gone": []})
            return
        if judged.all_acknowledged:
            ctx.log.info(
                "pause_acknowledged", side=side, version=version, acknowledged=len(judged.live), gone=gone
            )
            ctx.save_checkpoint(
                {"side": side, "version": version, "acknowledged": len(judged.live), "gone": gone}
            )
            return
        left = deadline - time.monotonic()
        if left <= 0:
            waiting = [w.worker_id for w in judged.waiting]
            raise PauseTimeout(
                f"{len(waiting)} live workers of the {side} side did not acknowledge the pause"
                f" (version {version}) within pause_timeout_seconds ({settings.pause_timeout_seconds:g} s):"
                f" {_named(waiting)}; a worker acknowledges once its dequeues under the old routing"
                " have finished: find out why they do not (or stop them: once their heartbeat is older"
                " than worker_ttl_seconds they count as gone), then run `migration-fsm resume`"
                " (or `migration-fsm abort --reason TEXT`, which lifts the pause)"
            )
        time.sleep(min(POLL_SECONDS, left))
        ctx.heartbeat()


def lift_pause(ctx: Context) -> None:
    """The undo of `pause_consumers`: withdraw the pause (the giving side consumes again)."""
    version = ctx.lift()
    ctx.log.info("pause_lifted", version=version)


# -- hand-over of one task -------------------------------------------------------------------


def set_progress(
    store: TaskStore,
    record: TaskRecord,
    status: TaskStatus,
    attempts: int,
    updated_at: datetime | None = None,
) -> None:
    """Change only the status, attempts and updated_at (default: now) of `store`'s copy
    `record`: through `SetProgress` where the store has it (the row's other columns
    untouched), else `put_forward` of the record with those fields changed (`put` for a store
    without either)."""
    now = updated_at or utcnow()
    if isinstance(store, SetProgress):
        store.set_progress(record.key, status, attempts, now)
        return
    updated = record.model_copy(update={"status": status, "attempts": attempts, "updated_at": now})
    if isinstance(store, ForwardPut):
        store.put_forward(updated)
    else:
        store.put(updated)


class ProgressBatch:
    """Progress changes of one store's copies, applied a batch per transaction
    (`SetProgressMany`; one `set_progress` per row for a store without it). Each change is a
    compare-and-set on the copy's status as it was read: a row a worker changed since is left
    as it is (and not counted by `flush`)."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self.changes: list[tuple[TaskRecord, ProgressUpdate]] = []

    def __len__(self) -> int:
        return len(self.changes)

    def add(
        self, record: TaskRecord, status: TaskStatus, attempts: int, updated_at: datetime | None = None
    ) -> None:
        """Set the copy `record`'s status and attempts (and updated_at, default now) at the next
        `flush`, if its status is still `record.status` then."""
        change = ProgressUpdate(record.key, status, attempts, updated_at or utcnow(), expected=record.status)
        self.changes.append((record, change))

    def flush(self) -> int:
        """Apply the changes kept so far; returns how many rows changed."""
        changes, self.changes = self.changes, []
        if not changes:
            return 0
        if isinstance(self.store, SetProgressMany):
            return self.store.set_progress_many([change for _, change in changes])
        for record, change in changes:
            set_progress(self.store, record, change.status, change.attempts, change.updated_at)
        return len(changes)


@dataclass(slots=True)
class HandOvers:
    """Hands running tasks of the `giving` side over to the other side, and counts."""

    ledger: Ledger
    migration: str
    giving: Side
    giving_store: TaskStore
    receiving_store: TaskStore
    handed_over: int = 0
    given_back: int = 0
    live: list[str] = field(default_factory=list)  # "key (worker)": running on a live worker

    def take(self, record: TaskRecord, receiving: TaskRecord | None) -> None:
        """Hand the running task `record` over (`receiving`: the receiving side's copy): the
        ledger first, so the giving side can no longer claim it; then the receiving copy
        pending with attempts + 1 (after a crash, `resume` writes the same again); then the
        giving copy `cancelled`, so no worker or reaper of the giving side runs it again. A
        key the ledger refuses is left alone: a live worker's (named in `live`), a succeeded
        one, or one claimed on the receiving side."""
        result = self.ledger.hand_over(self.migration, record.key, self.giving, _other(self.giving))
        if not result:
            if result.reason == "live":
                worker = result.holder[1] if result.holder else None
                self.live.append(f"{record.key} ({worker})")
            return
        attempts = record.attempts + 1
        if receiving is None:
            self.receiving_store.put(
                record.model_copy(
                    update={"status": TaskStatus.PENDING, "attempts": attempts, "updated_at": utcnow()}
                )
            )
        elif (receiving.status, receiving.attempts) != (TaskStatus.PENDING, attempts):
            # Whatever the receiving copy says is a copy's (that side does not consume before
            # the commit); once its workers claim the key, the ledger refuses the hand-over.
            set_progress(self.receiving_store, receiving, TaskStatus.PENDING, attempts)
        set_progress(self.giving_store, record, TaskStatus.CANCELLED, record.attempts)
        self.handed_over += 1

    def give_back(self, batch_size: int) -> int:
        """Give the receiving side every key the ledger handed over to the giving side that no
        worker there has claimed: the giving side stops consuming, so left with it such a task
        would run nowhere (issue 12). For each: the receiving copy pending, with the giving
        copy's attempts (the task has not run since it was handed over; that side does not
        consume before the commit), then the ledger, then the giving copy `cancelled` (the
        marker). A key whose giving copy is not pending is left alone: a running one is the
        drain's to hand over, a finished one the status transfer's to carry. Idempotent and
        resumable: a key stays listed until the ledger has given it on. Returns how many."""
        receiving = _other(self.giving)
        given = 0
        after: str | None = None
        while keys := self.ledger.owned_keys(
            self.migration, self.giving, (HANDED_OVER,), after=after, limit=batch_size
        ):
            after = keys[-1]
            mine, theirs = get_many(self.giving_store, keys), get_many(self.receiving_store, keys)
            pending = [mine[key] for key in keys if key in mine and mine[key].status is TaskStatus.PENDING]
            receivers, markers = ProgressBatch(self.receiving_store), ProgressBatch(self.giving_store)
            for record in pending:
                other = theirs.get(record.key)
                if other is None:
                    self.receiving_store.put(record.model_copy(update={"updated_at": utcnow()}))
                elif (other.status, other.attempts) != (TaskStatus.PENDING, record.attempts):
                    receivers.add(other, TaskStatus.PENDING, record.attempts)
            receivers.flush()  # every receiving copy of the page, before the ledger gives any
            for record in pending:
                if self.ledger.hand_over(self.migration, record.key, self.giving, receiving):
                    markers.add(record, TaskStatus.CANCELLED, record.attempts)
                    given += 1
            markers.flush()
        self.given_back += given
        return given


# -- the drain -------------------------------------------------------------------------------


def drain(ctx: Context, side: Side) -> None:
    """Wait until `side` has no running task; then apply the drain policy to the rest."""
    settings = ctx.settings
    policy = settings.drain_policy
    checkpoint = ctx.checkpoint or {}
    if checkpoint.get("done"):
        return
    deadline: datetime
    if policy == "requeue" and "deadline" in checkpoint:
        # A resumed drain does not wait the whole timeout again.
        deadline = datetime.fromisoformat(checkpoint["deadline"])
    else:
        deadline = utcnow() + timedelta(seconds=settings.drain_timeout_seconds)
        if policy == "requeue":
            ctx.save_checkpoint({"deadline": deadline.isoformat()})
    with open_side(settings, side) as store:
        while True:
            running = running_count(store)
            left = (deadline - utcnow()).total_seconds()
            ctx.log.info("drain", side=side, running=running, seconds_left=round(max(left, 0), 1))
            if running == 0:
                given = give_back(ctx, side)
                ctx.save_checkpoint(
                    {"deadline": deadline.isoformat(), "requeued": 0, "given_back": given, "done": True}
                )
                return
            if left <= 0:
                break
            time.sleep(min(POLL_SECONDS, left))
            ctx.heartbeat()
        if policy == "fail":
            sample = [r.key for r in _running(store, settings.backfill_batch_size, limit=_NAMED)]
            raise DrainTimeout(
                f"{running} tasks still running on the {side} side after"
                f" {settings.drain_timeout_seconds:g} s (e.g. {', '.join(sample)}) and drain_policy"
                " is 'fail': let them finish or stop them, then run `migration-fsm resume`"
                " (or set drain_policy = 'requeue')"
            )
    done = requeue(ctx, side)
    ctx.save_checkpoint(
        {
            "deadline": deadline.isoformat(),
            "requeued": done.handed_over,
            "given_back": done.given_back,
            "done": not done.live,
        }
    )
    ctx.log.info("drain_requeued", side=side, target=_other(side), requeued=done.handed_over)
    if done.live:
        raise DrainTimeout(
            f"{len(done.live)} tasks still run on live workers of the {side} side after"
            f" {settings.drain_timeout_seconds:g} s: {_named(done.live)}; they are executing right now,"
            f" so re-queuing them on the {_other(side)} side would run them twice: let them finish (or"
            " stop those workers: once a worker's heartbeat is older than worker_ttl_seconds its tasks"
            " are handed over), then run `migration-fsm resume`"
            f" ({done.handed_over} other tasks were handed over)"
        )


def _running(store: TaskStore, batch_size: int, limit: int | None = None) -> list[TaskRecord]:
    found = []
    for record in records(store, batch_size):
        if record.status is TaskStatus.RUNNING:
            found.append(record)
            if limit is not None and len(found) >= limit:
                break
    return found


def requeue(ctx: Context, side: Side) -> HandOvers:
    """Hand every task still running on `side` over to the other side (`HandOvers.take`).

    Idempotent: a handed-over task is no longer running on `side`."""
    batch_size = ctx.settings.backfill_batch_size
    with (
        open_side(ctx.settings, side) as giving,
        open_side(ctx.settings, _other(side)) as receiving,
        open_ledger(ctx) as ledger,
    ):
        done = HandOvers(ledger, ctx.migration, side, giving, receiving)
        for record in _running(giving, batch_size):
            done.take(record, receiving.get(record.key))
        if giving_side(ctx.source, ctx.dest) == side:
            done.give_back(batch_size)
    return done


def give_back(ctx: Context, side: Side) -> int:
    """On an edge that moves consumption away from `side`: give the other side every key the
    ledger handed over to `side` that no worker there claimed (`HandOvers.give_back`)."""
    if giving_side(ctx.source, ctx.dest) != side:
        return 0
    with (
        open_side(ctx.settings, side) as giving,
        open_side(ctx.settings, _other(side)) as receiving,
        open_ledger(ctx) as ledger,
    ):
        given = HandOvers(ledger, ctx.migration, side, giving, receiving).give_back(
            ctx.settings.backfill_batch_size
        )
    if given:
        ctx.log.info("handed_back", side=side, target=_other(side), given_back=given)
    return given


# -- status transfer -------------------------------------------------------------------------


def sync_status(ctx: Context, source_side: Side, target_side: Side) -> None:
    """Copy each source task's status and attempts to the target (the whole task when the
    target lacks it), batch by batch from the checkpoint; see the module docstring for
    `running` and for the tasks a drain handed over."""
    settings = ctx.settings
    checkpoint = ctx.checkpoint or {}
    if checkpoint.get("done"):
        return
    with (
        open_side(settings, source_side) as source,
        open_side(settings, target_side) as target,
        open_ledger(ctx) as ledger,
    ):
        sync = _Sync(ctx, HandOvers(ledger, ctx.migration, source_side, source, target), target_side)
        if sync.handing:  # before the merge, which then keeps what the give-back wrote
            sync.handovers.give_back(settings.backfill_batch_size)
        sync.run(source, target)
    ctx.log.info("status_synced", source=source_side, target=target_side, **sync.counts)
    _stop_if_live(sync.handovers.live, source_side, target_side)


class _Sync:
    """One run of `sync_status`: the merge of both sides from the checkpoint's cursor."""

    def __init__(self, ctx: Context, handovers: HandOvers, target_side: Side) -> None:
        self.ctx = ctx
        self.handovers = handovers
        self.target_side = target_side
        self.checkpoint = ctx.checkpoint or {}
        self.counts = {
            name: int(self.checkpoint.get(name, 0))
            for name in ("updated", "created", "handed_over", "given_back", "kept", "changed_meanwhile")
        }
        self.handing = giving_side(ctx.source, ctx.dest) == handovers.giving
        self.creates: list[TaskRecord] = []
        self.progress: ProgressBatch | None = None
        self.cursor: str | None = self.checkpoint.get("cursor")

    def save(self, target: TaskStore, *, done: bool = False) -> None:
        if self.creates:
            target.put_many(self.creates)
        self.creates = []
        if self.progress is not None:  # one transaction per batch; then the checkpoint
            tried = len(self.progress)
            applied = self.progress.flush()
            self.counts["updated"] += applied
            self.counts["changed_meanwhile"] += tried - applied
        self.counts["handed_over"] = int(self.checkpoint.get("handed_over", 0)) + self.handovers.handed_over
        self.counts["given_back"] = int(self.checkpoint.get("given_back", 0)) + self.handovers.given_back
        self.ctx.save_checkpoint({"cursor": self.cursor, **self.counts, "done": done})

    def run(self, source: TaskStore, target: TaskStore) -> None:
        batch_size = self.ctx.settings.backfill_batch_size
        self.progress = ProgressBatch(target)
        after = self.cursor
        if not self.checkpoint:  # a fresh start says so at once: `status` shows the step's progress
            self.save(target)
        seen = 0
        for mine, theirs in merge(records(source, batch_size, after), records(target, batch_size, after)):
            if mine is None:  # only on the target: nothing to copy
                continue
            self.cursor = mine.key
            self.one(mine, theirs)
            seen += 1
            if seen % batch_size == 0:
                self.save(target)
        if self.handovers.live:
            self.cursor = None  # `resume` looks at every key again: the live ones are behind the cursor
        self.save(target, done=not self.handovers.live)

    def one(self, mine: TaskRecord, theirs: TaskRecord | None) -> None:
        counts = self.counts
        if theirs is None or mine.status is TaskStatus.RUNNING:
            created = _absent_or_running(self.handovers, mine, theirs, handing=self.handing)
            if created is not None:
                self.creates.append(created)
                counts["created"] += 1
            elif not self.handing:
                counts["kept"] += 1
        elif (mine.status, mine.attempts) != (theirs.status, theirs.attempts):
            ledger = self.handovers.ledger
            if _handed_over_to(ledger, self.ctx.migration, mine, theirs, self.target_side):
                counts["kept"] += 1
            elif self.progress is not None:
                self.progress.add(theirs, mine.status, mine.attempts, mine.updated_at)


def _stop_if_live(live: list[str], source_side: Side, target_side: Side) -> None:
    if live:
        raise DrainTimeout(
            f"{len(live)} tasks still run on live workers of the {source_side} side:"
            f" {_named(live)}; copying them to the {target_side} side would run them twice:"
            " let them finish (or stop those workers), then run `migration-fsm resume`"
        )


def _absent_or_running(
    handovers: HandOvers, mine: TaskRecord, theirs: TaskRecord | None, *, handing: bool
) -> TaskRecord | None:
    """A source task the target lacks, or one running on the source: the copy to create on
    the target (None: nothing to create). Never `running`: a task running on the giving side
    is handed over (as by the drain); one running on a side that keeps consuming leaves the
    target's copy as it is, or gets a pending copy there."""
    if mine.status is not TaskStatus.RUNNING:
        return mine
    if handing:
        handovers.take(mine, theirs)
        return None
    return mine.model_copy(update={"status": TaskStatus.PENDING}) if theirs is None else None


def _handed_over_to(ledger: Ledger, migration: str, mine: TaskRecord, theirs: TaskRecord, side: Side) -> bool:
    """Whether the source copy `mine` is the giving end of a hand-over to `side` (cancelled
    there by a drain, while the target's copy waits or runs): then the target keeps what the
    drain gave it (`ownership.carries_marker`). Only a cancelled source copy asks the ledger."""
    if mine.status is not TaskStatus.CANCELLED:
        return False
    return carries_marker(mine, theirs, ledger.claim_of(migration, mine.key), side)


# -- retire_old ------------------------------------------------------------------------------


def runnable_copies(ctx: Context) -> int:
    """How many old copies a stock old worker would still run although the new side ran them
    or, while it consumes (in the edge's source phase), owns them (`tools.retire.retirements`:
    what `retire_old` retires, and what `validate` counts as `runnable_old_copies`)."""
    batch_size = ctx.settings.backfill_batch_size
    with (
        open_side(ctx.settings, "old") as old,
        open_side(ctx.settings, "new") as new,
        open_ledger(ctx) as ledger,
    ):
        owned = routing_for(ctx.source, ctx.percent).consume_from == "new"
        return sum(1 for _ in retirements(old, new, ledger, ctx.migration, batch_size, owned_by_new=owned))


def retire(ctx: Context) -> None:
    """Retire every runnable old copy of a task the new side ran or owns, in the old store's
    own status vocabulary (its status map), so a stock old worker runs none of them: finished
    as on new when new ran it; a hand-over to new when new has not finished it (the ledger
    gives the key to new first, then the old copy is `cancelled`; a key the ledger refuses to
    hand over is left alone). Idempotent: a retired copy is no longer runnable, and a crash
    between the ledger and the old copy leaves the copy runnable, so the next run redoes it."""
    checkpoint = ctx.checkpoint or {}
    if checkpoint.get("done"):
        return
    counts = {"retired": 0, "handed_over": 0}
    batch_size = ctx.settings.backfill_batch_size
    ctx.save_checkpoint(dict(counts))
    with (
        open_side(ctx.settings, "old") as old,
        open_side(ctx.settings, "new") as new,
        open_ledger(ctx) as ledger,
    ):
        batch = ProgressBatch(old)
        for one in retirements(old, new, ledger, ctx.migration, batch_size):
            if one.hand_over:
                given = ledger.hand_over(ctx.migration, one.record.key, "old", "new")
                if not given and not (given.holder is not None and given.holder[0] == "new"):
                    continue  # the ledger gives it to old (a live old worker runs it): not new's
                counts["handed_over"] += 1
            batch.add(one.record, one.status, one.attempts)  # the ledger first, the copy after
            if len(batch) >= batch_size:
                counts["retired"] += batch.flush()  # one transaction per batch
                ctx.save_checkpoint(dict(counts))
                ctx.heartbeat()
        counts["retired"] += batch.flush()
    ctx.save_checkpoint({**counts, "done": True})
    ctx.log.info("old_retired", **counts)
