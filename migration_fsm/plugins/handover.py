"""What moves tasks between the sides inside a transition: drain and status transfer.

- `drain(ctx, side)` waits until `side` has no `running` task. At the timeout
  (`drain_timeout_seconds`) the tasks still running are handled by `drain_policy`:
  `requeue` makes each one `pending` with `attempts + 1` on the other side, and on the
  drained side too, so the two agree and nothing claims to run it any more; `fail` stops
  the transition (let the tasks finish or stop them, then `resume`).
- `sync_status(ctx, source, target)` copies every source task's status and attempts to its
  target copy, and the whole task when the target has no copy.

Both are idempotent and save a checkpoint after every batch, so `resume` after a crash
finishes the work instead of starting it over.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ..journal import utcnow
from ..tasks.records import TaskRecord, TaskStatus
from ..tasks.scan import merge, records
from ..tasks.sides import open_side

if TYPE_CHECKING:
    from ..fsm import Side
    from ..tasks.records import TaskStore
    from .context import Context

#: Longest pause between two looks at the draining side.
POLL_SECONDS = 0.5


class DrainTimeout(RuntimeError):
    """Tasks were still running at the drain timeout and the policy is `fail`."""


def _other(side: Side) -> Side:
    return "new" if side == "old" else "old"


def running_count(store: TaskStore) -> int:
    """How many tasks of `store` are `running`."""
    return int(store.count_by_status().get(TaskStatus.RUNNING, 0))


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
                ctx.save_checkpoint({"deadline": deadline.isoformat(), "requeued": 0, "done": True})
                return
            if left <= 0:
                break
            time.sleep(min(POLL_SECONDS, left))
            ctx.heartbeat()
        if policy == "fail":
            sample = [r.key for r in _running(store, settings.backfill_batch_size, limit=5)]
            raise DrainTimeout(
                f"{running} tasks still running on the {side} side after"
                f" {settings.drain_timeout_seconds:g} s (e.g. {', '.join(sample)}) and drain_policy"
                " is 'fail': let them finish or stop them, then run `migration-fsm resume`"
                " (or set drain_policy = 'requeue')"
            )
        with open_side(settings, _other(side)) as target:
            requeued = _requeue(ctx, store, target, deadline)
    ctx.log.info("drain_requeued", side=side, target=_other(side), requeued=requeued)


def _running(store: TaskStore, batch_size: int, limit: int | None = None) -> list[TaskRecord]:
    found = []
    for record in records(store, batch_size):
        if record.status is TaskStatus.RUNNING:
            found.append(record)
            if limit is not None and len(found) >= limit:
                break
    return found


def _requeue(ctx: Context, source: TaskStore, target: TaskStore, deadline: datetime) -> int:
    """Make every task still running on `source` pending with attempts + 1, on `target`
    first and then on `source`.

    Idempotent: the requeued copy is computed from the source record, which changes only
    once the target has it, so a crash in between rewrites the same thing."""
    batch_size = ctx.settings.backfill_batch_size
    now = utcnow()
    requeued = 0
    batch: list[TaskRecord] = []

    def flush() -> None:
        nonlocal requeued, batch
        if batch:
            target.put_many(batch)
            source.put_many(batch)
            requeued += len(batch)
            batch = []

    # Rewriting keys the keyset scan has passed does not move its cursor.
    for record in records(source, batch_size):
        if record.status is TaskStatus.RUNNING:
            batch.append(
                record.model_copy(
                    update={"status": TaskStatus.PENDING, "attempts": record.attempts + 1, "updated_at": now}
                )
            )
            if len(batch) >= batch_size:
                flush()
    flush()
    ctx.save_checkpoint({"deadline": deadline.isoformat(), "requeued": requeued, "done": True})
    return requeued


def sync_status(ctx: Context, source_side: Side, target_side: Side) -> None:
    """Copy each source task's status and attempts to the target (the whole task when the
    target lacks it), batch by batch from the checkpoint."""
    settings = ctx.settings
    batch_size = settings.backfill_batch_size
    checkpoint = ctx.checkpoint or {}
    if checkpoint.get("done"):
        return
    after: str | None = checkpoint.get("cursor")
    updated, created = int(checkpoint.get("updated", 0)), int(checkpoint.get("created", 0))
    with open_side(settings, source_side) as source, open_side(settings, target_side) as target:
        writes: list[TaskRecord] = []
        seen = 0
        cursor = after

        def save(done: bool = False) -> None:
            nonlocal writes, seen
            if writes:
                target.put_many(writes)
            writes, seen = [], 0
            ctx.save_checkpoint(
                {
                    "cursor": cursor,
                    "updated": updated,
                    "created": created,
                    "done": done,
                }
            )

        for mine, theirs in merge(records(source, batch_size, after), records(target, batch_size, after)):
            if mine is None:  # only on the target: nothing to copy
                continue
            cursor = mine.key
            seen += 1
            if theirs is None:
                writes.append(mine)
                created += 1
            elif (mine.status, mine.attempts) != (theirs.status, theirs.attempts):
                writes.append(
                    theirs.model_copy(
                        update={
                            "status": mine.status,
                            "attempts": mine.attempts,
                            "updated_at": mine.updated_at,
                        }
                    )
                )
                updated += 1
            if seen >= batch_size:
                save()
        save(done=True)
    ctx.log.info(
        "status_synced",
        source=source_side,
        target=target_side,
        updated=updated,
        created=created,
    )
