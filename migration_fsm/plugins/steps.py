"""Built-in steps of the data tools (DESIGN.md section 6): idempotent and checkpointed, so
`resume` after a crash inside one finishes it from its last checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..tasks.sides import open_sides
from ..tools import runs
from ..tools.backfill import copy_tasks
from ..tools.progress import LogProgress
from . import handover
from .handover import drain, sync_status

if TYPE_CHECKING:
    from .context import Context


def backfill(ctx: Context) -> None:
    """Copy every task from the old side to the new side, checkpointing each batch in the
    journal; when done, record it for the guard `backfill_complete`."""
    checkpoint = ctx.checkpoint or {}
    if checkpoint.get("done"):
        return
    if not checkpoint:
        runs.start_backfill(ctx.store, ctx.migration)
    after: str | None = checkpoint.get("cursor")
    before = int(checkpoint.get("copied", 0))

    def save(cursor: str, copied: int) -> None:
        ctx.save_checkpoint({"cursor": cursor, "copied": before + copied})

    with open_sides(ctx.settings) as (old, new):
        result = copy_tasks(
            old,
            new,
            batch_size=ctx.settings.backfill_batch_size,
            after=after,
            checkpoint=save,
            progress=LogProgress("backfill_progress", ctx.log),
            done_before=before,
        )
    cursor = (ctx.checkpoint or {}).get("cursor", after)
    copied = before + result.copied
    ctx.save_checkpoint({"cursor": cursor, "copied": copied, "done": True})
    runs.save_backfill(ctx.store, ctx.migration, cursor=cursor, copied=copied, done=True)


def pause_consumers(ctx: Context) -> None:
    """Pause the giving side's consumers (the side that consumes in the source phase and not
    in the destination) and wait until every live worker of it has acknowledged the pause."""
    handover.pause_consumers(ctx)


def lift_pause(ctx: Context) -> None:
    """Undo of `pause_consumers` (run by `abort`): the giving side consumes again."""
    handover.lift_pause(ctx)


def retire_old(ctx: Context) -> None:
    """Mark every old task that ran on the new side finished on the old side (in its own
    status vocabulary), so that an old worker started later runs nothing twice."""
    handover.retire(ctx)


def drain_old(ctx: Context) -> None:
    """Wait until no task runs on the old side; then apply `drain_policy` to the rest."""
    drain(ctx, "old")


def transfer_state(ctx: Context) -> None:
    """Copy every old task's status and attempts to its new copy (creating missing copies);
    never `running` (a task still running on old is handed over to new, pending)."""
    sync_status(ctx, "old", "new")


def drain_new(ctx: Context) -> None:
    """Wait until no task runs on the new side; then apply `drain_policy` to the rest."""
    drain(ctx, "new")


def reverse_sync(ctx: Context) -> None:
    """Copy every new task's status and attempts to the old side, including tasks that
    exist only on the new side; never `running`."""
    sync_status(ctx, "new", "old")
