"""Validation: a streaming merge of the old and the new side by key, reporting every difference.

Neither side is ever loaded whole: one page of each is in memory, plus at most one batch of
differences waiting to be re-read. A difference is re-read once (`get` on both sides, a
moment later) before it is reported, so a write in flight during the scan (landed on one
side, about to land on the other) is not reported as a loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ..store import utcnow
from . import runs
from .records import IDENTITY_FIELDS, PROGRESS_FIELDS, TaskRecord, TaskStatus
from .scan import merge, records
from .sides import open_sides

if TYPE_CHECKING:
    from ..config import Settings
    from ..store import Store
    from .records import TaskStore

MISSING: Final = "missing"  # on old, not on new
EXTRA: Final = "extra"  # on new, not on old
MISMATCHED: Final = "mismatched"  # on both, identity (key, type, payload, created_at) differs
STATUS_DIFFERS: Final = "status_differs"  # same identity, other status or attempts

#: How long a difference waits before it is re-read, so that a dual write in flight lands.
DEFAULT_SETTLE_SECONDS: Final = 0.2


@dataclass(slots=True)
class ValidationReport:
    """The result of one validation: the `validate --json` object."""

    old_count: int = 0
    new_count: int = 0
    missing: int = 0
    extra: int = 0
    mismatched: int = 0
    status_differs: int = 0
    counts_old: dict[TaskStatus, int] = field(default_factory=lambda: dict.fromkeys(TaskStatus, 0))
    counts_new: dict[TaskStatus, int] = field(default_factory=lambda: dict.fromkeys(TaskStatus, 0))
    sample_missing: list[str] = field(default_factory=list)
    sample_extra: list[str] = field(default_factory=list)
    sample_mismatched: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Nothing is missing on the new side and no identity differs (extra and
        status_differs are reported, not failures)."""
        return self.missing == 0 and self.mismatched == 0

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "old_count": self.old_count,
            "new_count": self.new_count,
            "missing": self.missing,
            "extra": self.extra,
            "mismatched": self.mismatched,
            "status_differs": self.status_differs,
            "counts_by_status": {
                "old": {str(k): v for k, v in self.counts_old.items()},
                "new": {str(k): v for k, v in self.counts_new.items()},
            },
            "samples": {
                "missing": list(self.sample_missing),
                "extra": list(self.sample_extra),
                "mismatched": [dict(s) for s in self.sample_mismatched],
            },
        }


def classify(old: TaskRecord | None, new: TaskRecord | None) -> tuple[str, list[str]] | None:
    """The kind of difference between two records with the same key, and the differing
    fields; None when they agree (only `updated_at` or `metadata` may differ)."""
    if old is None or new is None:
        if old is None and new is None:
            return None
        return (MISSING if new is None else EXTRA), []
    if old == new:  # the common case: one cheap comparison, no canonical JSON
        return None
    if old.type != new.type or old.created_at != new.created_at or old.payload != new.payload:
        fields = old.differing_fields(new)
        if any(name in IDENTITY_FIELDS for name in fields):
            return MISMATCHED, fields
    progress = [name for name in PROGRESS_FIELDS if getattr(old, name) != getattr(new, name)]
    return (STATUS_DIFFERS, progress) if progress else None


class _Validation:
    def __init__(self, old: TaskStore, new: TaskStore, sample_size: int, settle: float) -> None:
        self.old, self.new = old, new
        self.sample_size = sample_size
        self.settle = settle
        self.report = ValidationReport()
        # (key, old as scanned, new as scanned, when seen): differences waiting for their re-read.
        self.pending: list[tuple[str, TaskRecord | None, TaskRecord | None, float]] = []

    def count(self, old: TaskRecord | None, new: TaskRecord | None, sign: int) -> None:
        report = self.report
        if old is not None:
            report.old_count += sign
            report.counts_old[old.status] += sign
        if new is not None:
            report.new_count += sign
            report.counts_new[new.status] += sign

    def recheck(self) -> None:
        """Re-read every waiting difference on both sides and report what is still different."""
        if not self.pending:
            return
        wait = self.pending[0][3] + self.settle - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        for key, old, new, _ in self.pending:
            again_old, again_new = self.old.get(key), self.new.get(key)
            # The counts follow the re-read, so they agree with the differences reported.
            self.count(old, new, -1)
            self.count(again_old, again_new, +1)
            verdict = classify(again_old, again_new)
            if verdict is not None:
                self.report_difference(key, *verdict)
        self.pending.clear()

    def report_difference(self, key: str, kind: str, fields: list[str]) -> None:
        report, room = self.report, self.sample_size
        if kind == MISSING:
            report.missing += 1
            if len(report.sample_missing) < room:
                report.sample_missing.append(key)
        elif kind == EXTRA:
            report.extra += 1
            if len(report.sample_extra) < room:
                report.sample_extra.append(key)
        elif kind == MISMATCHED:
            report.mismatched += 1
            if len(report.sample_mismatched) < room:
                report.sample_mismatched.append({"key": key, "fields": fields})
        else:
            report.status_differs += 1


def validate(
    old: TaskStore,
    new: TaskStore,
    *,
    batch_size: int = 1000,
    sample_size: int = 20,
    settle: float = DEFAULT_SETTLE_SECONDS,
) -> ValidationReport:
    """Compare the two sides key by key; see the module docstring and docs/VALIDATION.md."""
    started = time.monotonic()
    run = _Validation(old, new, sample_size, settle)
    for o, n in merge(records(old, batch_size), records(new, batch_size)):
        run.count(o, n, +1)
        if classify(o, n) is not None:
            either = o if o is not None else n
            assert either is not None
            run.pending.append((either.key, o, n, time.monotonic()))
            if len(run.pending) >= batch_size:
                run.recheck()
    run.recheck()
    run.report.seconds = round(time.monotonic() - started, 3)
    return run.report


def validate_migration(
    store: Store, settings: Settings, migration: str, *, settle: float = DEFAULT_SETTLE_SECONDS
) -> tuple[int, ValidationReport]:
    """`migration-fsm validate`: validate the configured stores and record the run in the
    migration database (the guards `checksums_match` reads it). Returns (run id, report)."""
    with open_sides(settings) as (old, new):
        state = store.get(migration)
        started_at = utcnow()
        report = validate(
            old,
            new,
            batch_size=settings.backfill_batch_size,
            sample_size=settings.validate_sample_size,
            settle=settle,
        )
    summary = report.as_json()
    summary["seconds"] = report.seconds
    run_id = runs.record_validation(
        store,
        migration,
        phase=str(state.phase),
        started_at=started_at,
        finished_at=utcnow(),
        ok=report.ok,
        summary=summary,
    )
    return run_id, report
