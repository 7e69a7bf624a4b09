"""Replay the dual-write repair log: copy each missed write from the side that has it."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update

from migration_fsm.fsm import RepairStatus
from migration_fsm.journal import redact_text, repair_log_table, utcnow

from .ownership import carries_marker

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from migration_fsm.journal import Journal
    from migration_fsm.journal.ledger import Ledger

    from ..tasks.records import TaskStore


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What one `reconcile` run did."""

    replayed: int  # copied to the side that missed them
    already_current: int  # the missing side already had this version or a newer one, or owns the task
    absent: int  # no side has the record any more: nothing to copy
    failed: int  # still open: the copy failed again
    open: int  # open entries left afterwards

    def as_json(self) -> dict[str, Any]:
        return {
            "replayed": self.replayed,
            "already_current": self.already_current,
            "absent": self.absent,
            "failed": self.failed,
            "open": self.open,
        }


def open_entries(store: Journal, migration: str) -> int:
    """How many repair entries of `migration` are still open."""
    with store.transaction(readonly=True) as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(repair_log_table)
                .where(
                    repair_log_table.c.migration == migration, repair_log_table.c.status == RepairStatus.OPEN
                )
            ).scalar_one()
        )


def reconcile(
    store: Journal,
    migration: str,
    old: TaskStore,
    new: TaskStore,
    *,
    batch: int = 500,
    fence: Callable[[], AbstractContextManager[object]] | None = None,
    ledger: Ledger | None = None,
) -> Reconciled:
    """Replay every open entry: read the record from the side that took the write, put it on
    the side that missed it unless that side already holds the same or a newer version, and
    close the entry. Idempotent: a second run finds nothing open and changes nothing. Each
    batch of entries is replayed inside `fence()` (`Journal.data_fence`).

    With the execution `ledger`, a hand-over marker (the giving side's `cancelled` copy) is
    never put over the unfinished copy of the side the ledger gives the task to
    (`ownership.carries_marker`): that copy is current, however late its updated_at."""
    fenced = fence or nullcontext
    sides = {"old": old, "new": new}
    replayed = current = absent = failed = 0
    last_id = 0
    while True:
        with store.transaction(readonly=True) as conn:
            rows = (
                conn.execute(
                    select(repair_log_table.c.id, repair_log_table.c.key, repair_log_table.c.side)
                    .where(
                        repair_log_table.c.migration == migration,
                        repair_log_table.c.status == RepairStatus.OPEN,
                        repair_log_table.c.id > last_id,
                    )
                    .order_by(repair_log_table.c.id)
                    .limit(batch)
                )
                .mappings()
                .all()
            )
        if not rows:
            break
        last_id = rows[-1]["id"]
        outcomes: list[tuple[int, RepairStatus, str | None]] = []
        with fenced():  # the tasks are written under the fence; the entries closed after it
            for row in rows:
                missing_side = row["side"]
                source = sides["new" if missing_side == "old" else "old"]
                target = sides[missing_side]
                outcome, error = RepairStatus.DONE, None
                try:
                    record = source.get(row["key"])
                    if record is None:
                        absent += 1
                    else:
                        there = target.get(row["key"])
                        if (there is not None and there.updated_at >= record.updated_at) or (
                            ledger is not None
                            and carries_marker(
                                record, there, ledger.claim_of(migration, record.key), missing_side
                            )
                        ):
                            current += 1
                        else:
                            target.put(record)
                            replayed += 1
                except Exception as exc:  # noqa: BLE001 - one bad entry must not stop the others
                    outcome, error = RepairStatus.OPEN, redact_text(f"{type(exc).__name__}: {exc}")
                    failed += 1
                outcomes.append((row["id"], outcome, error))
        for entry_id, outcome, error in outcomes:
            with store.transaction() as conn:
                values: dict[str, Any] = {"status": outcome, "attempts": repair_log_table.c.attempts + 1}
                if outcome == RepairStatus.DONE:
                    values["resolved_at"] = utcnow()
                else:
                    values["error"] = (error or "")[:2000]
                conn.execute(
                    update(repair_log_table).where(repair_log_table.c.id == entry_id).values(**values)
                )
    return Reconciled(replayed, current, absent, failed, open_entries(store, migration))
