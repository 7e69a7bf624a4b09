"""Built-in guards of the data tools (DESIGN.md section 6). Each says its figures either way."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..exceptions import MigrationFSMError
from ..fsm import ROUTING, EntryStatus, Phase, Trigger
from ..tasks.capabilities import SetupCheck
from ..tasks.records import TaskStatus
from ..tasks.sides import SIDES, open_side, open_sides, stores_configured
from ..tools import runs
from .context import GuardVerdict
from .metric_guards import finished_on_new_side, percent, task_rate_verdict

if TYPE_CHECKING:
    from datetime import datetime

    from ..tasks.records import TaskStore
    from .context import Context


def _at(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _since(ctx: Context) -> str:
    return f"{ctx.state.phase} was entered at {_at(ctx.state.phase_entered_at)}"


def _altered(what: str) -> GuardVerdict:
    return GuardVerdict(
        False,
        f"{what} was altered outside migration-fsm (its digest does not match): run"
        " `migration-fsm verify`, then run the tool again",
    )


def _total(store: TaskStore) -> int:
    return sum(store.count_by_status().values())


def stores_reachable(ctx: Context) -> GuardVerdict:
    """Both stores answer a scan and a count (so their table, columns and statuses map), and a
    store over a real queue finds its setup complete (`SetupCheck`)."""
    if not stores_configured(ctx.settings):
        return GuardVerdict(False, "configure [stores.old] and [stores.new] first")
    figures = []
    for side in SIDES:
        try:
            with open_side(ctx.settings, side) as store:
                problems = store.check_setup() if isinstance(store, SetupCheck) else []
                if problems:
                    return GuardVerdict(False, f"{side} store not set up: {'; '.join(problems)}")
                store.scan(None, 1)
                figures.append(f"{side} '{store.name}' has {_total(store)} tasks")
        except Exception as exc:  # noqa: BLE001 - any failure to read is the verdict
            return GuardVerdict(False, f"{side} store unreachable: {exc}")
    return GuardVerdict(True, "; ".join(figures))


def _dual_writes_began(ctx: Context) -> datetime | None:
    """When dual writes last began: the last committed advance from a phase whose routing
    writes only the old side into one that writes both (`preparation` -> `dual_write`)."""
    began = None
    for entry in ctx.store.journal(ctx.state, with_steps=False):
        if (
            entry.status == EntryStatus.COMMITTED
            and entry.trigger is Trigger.ADVANCE
            and entry.source is not None
            and not ROUTING[entry.source].write_new
            and ROUTING[entry.dest].write_old
            and ROUTING[entry.dest].write_new
            and entry.finished_at is not None
        ):
            began = entry.finished_at
    return began


def backfill_complete(ctx: Context) -> GuardVerdict:
    """The last backfill finished, and it started after dual writes began (else tasks written
    to the old side before then may be missing on the new side)."""
    progress = runs.backfill_progress(ctx.store, ctx.migration)
    if progress is None:
        return GuardVerdict(False, "no backfill has run: run `migration-fsm backfill`")
    if not progress.intact:
        return _altered("the backfill checkpoint")
    if not progress.done:
        return GuardVerdict(
            False,
            f"the backfill stopped after key '{progress.cursor}' ({progress.copied} tasks copied,"
            f" last progress {_at(progress.updated_at)}): run `migration-fsm backfill` to continue",
        )
    began = _dual_writes_began(ctx)
    if began is not None and progress.started_at < began:
        return GuardVerdict(
            False,
            f"the last backfill started at {_at(progress.started_at)}, before dual writes began at"
            f" {_at(began)}: run `migration-fsm backfill` again",
        )
    return GuardVerdict(
        True, f"backfill finished at {_at(progress.updated_at)}: {progress.copied} tasks copied"
    )


def counts_match(ctx: Context) -> GuardVerdict:
    """Both sides hold as many tasks (counted twice, a moment apart, before refusing, so a
    dual write in flight is not a mismatch)."""
    with open_sides(ctx.settings) as (old, new):
        for attempt in range(2):
            old_total = _total(old)
            new_total = _total(new)
            if old_total == new_total:
                return GuardVerdict(True, f"old {old_total} = new {new_total} tasks")
            if attempt == 0:
                time.sleep(0.2)
    diff = new_total - old_total
    more = f"{abs(diff)} {'more' if diff > 0 else 'fewer'} on the new side"
    return GuardVerdict(
        False, f"old {old_total}, new {new_total} tasks ({more}): run `migration-fsm validate` to see which"
    )


def checksums_match(ctx: Context) -> GuardVerdict:
    """The latest `validate` run since the current phase was entered found nothing missing
    and no identity mismatched."""
    run = runs.latest_validation(ctx.store, ctx.migration)
    if run is not None and not run.intact:
        return _altered(f"validate run #{run.id}")
    if run is None or run.started_at < ctx.state.phase_entered_at:
        return GuardVerdict(False, f"no validate run since {_since(ctx)}: run `migration-fsm validate`")
    s = run.summary
    figures = (
        f"validate run #{run.id} at {_at(run.started_at)}: missing {s['missing']}, mismatched"
        f" {s['mismatched']} (extra {s['extra']}, status_differs {s['status_differs']},"
        f" {s['old_count']} old / {s['new_count']} new)"
    )
    if s["missing"] or s["mismatched"]:
        return GuardVerdict(False, f"{figures}: fix the differences, then run `migration-fsm validate`")
    return GuardVerdict(True, figures)


def old_drained(ctx: Context) -> GuardVerdict:
    """No task is `running` on the old side; says how many runnable old copies remain of
    tasks the new side ran or owns (`retire_old` retires them)."""
    from .handover import runnable_copies

    with open_side(ctx.settings, "old") as old:
        running = old.count_by_status().get(TaskStatus.RUNNING, 0)
    if running:
        return GuardVerdict(False, f"{running} tasks still running on the old side: wait for them")
    copies = runnable_copies(ctx)
    retire = "; `retire_old` retires them on the old side" if copies and ctx.source is Phase.CUTOVER else ""
    return GuardVerdict(
        True,
        f"no task running on the old side; {copies} runnable old copies of tasks the new side"
        f" ran or owns remain{retire}",
    )


def no_double_execution(ctx: Context) -> GuardVerdict:
    """The execution ledger counts no task that succeeded more than once."""
    from .handover import open_ledger

    with open_ledger(ctx) as ledger:
        counts = ledger.counts(ctx.migration)
    figures = (
        f"executed_twice {counts.executed_twice}, refused_executions {counts.refused_executions}"
        f" (old {counts.refused_by_side.get('old', 0)}, new {counts.refused_by_side.get('new', 0)}),"
        f" handed_over {counts.handed_over}"
    )
    if counts.executed_twice:
        return GuardVerdict(
            False,
            f"{figures}: {counts.executed_twice} tasks ran more than once; find out which workers"
            " run without a WorkerGate (see docs/MIGRATION.md) before going on",
        )
    return GuardVerdict(True, figures)


def backup_exists(ctx: Context) -> GuardVerdict:
    """`backup_path` is an export of the old side that verifies and started after the
    current phase was entered."""
    from ..tools.archive import verify_archive

    path = ctx.settings.backup_path
    if not path:
        return GuardVerdict(False, "backup_path is not configured")
    try:
        summary = verify_archive(path)
    except MigrationFSMError as exc:
        return GuardVerdict(False, f"{exc}: run `migration-fsm export --side old --out {path} --overwrite`")
    if summary.side != "old":
        return GuardVerdict(False, f"{path} is an export of the {summary.side} side, not the old one")
    if summary.migration not in (None, ctx.state.name):
        return GuardVerdict(
            False, f"{path} is an export for migration '{summary.migration}', not '{ctx.state.name}'"
        )
    if summary.started_at < ctx.state.phase_entered_at:
        return GuardVerdict(
            False,
            f"{path} was exported at {_at(summary.started_at)}, before {_since(ctx)}:"
            f" run `migration-fsm export --side old --out {path} --overwrite` again",
        )
    return GuardVerdict(
        True, f"{path}: {summary.count} tasks of the old side, exported at {_at(summary.started_at)}"
    )


def failure_rate_ok(ctx: Context) -> GuardVerdict:
    """Among tasks that finished on the new side since the current phase was entered,
    failed / (completed + failed) is at most `max_failure_rate` (a metric guard of kind
    `failure_rate`: its value is journaled)."""
    limit = ctx.settings.max_failure_rate
    finished = finished_on_new_side(ctx.settings, ctx.state.phase_entered_at)
    return task_rate_verdict(
        "failure_rate_ok", "failure_rate", finished, since_text=_since(ctx),
        low=None, high=limit, bounds=f"limit {percent(limit)}",
    ).as_guard_verdict()  # fmt: skip


def completion_rate_ok(ctx: Context) -> GuardVerdict:
    """Among tasks that finished on the new side since the current phase was entered,
    completed / (completed + failed + cancelled) is at least `min_completion_rate` (a metric
    guard of kind `completion_rate`: its value is journaled)."""
    least = ctx.settings.min_completion_rate
    finished = finished_on_new_side(ctx.settings, ctx.state.phase_entered_at)
    return task_rate_verdict(
        "completion_rate_ok", "completion_rate", finished, since_text=_since(ctx),
        low=least, high=None, bounds=f"minimum {percent(least)}",
    ).as_guard_verdict()  # fmt: skip
