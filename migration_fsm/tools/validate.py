"""Validation: a streaming merge of the old and the new side by key, reporting every difference.

Neither side is ever loaded whole: one page of each is in memory, plus at most two batches of
differences waiting to be re-read. A difference is re-read once (on both sides, a batch at
a time through `get_many` where the store has it, a moment later) before it is reported, so
a write in flight during the scan (landed on one side, about to land on the other) is not
reported as a loss.

The scan compares identity rows (`identity.py`), not decoded records: runs of equal rows
are compared a slice at a time, a row whose raw values differ is settled by the canonical
checksum of both sides, and only a real difference is decoded in full (by its re-read).
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Final

from ..exceptions import DatabaseUnavailable
from ..fsm import routing_for
from ..journal import utcnow
from ..journal.ledger import Ledger
from ..tasks.capabilities import IdentityGet, IdentityScan
from ..tasks.identity import (
    ATTEMPTS,
    CREATED_AT,
    KEY,
    PAYLOAD,
    RUN_AT,
    STATUS,
    TYPE,
    RecordRows,
    get_many,
    identity_pages,
    identity_source,
    status_of,
)
from ..tasks.records import IDENTITY_FIELDS, PROGRESS_FIELDS, TaskRecord, TaskStatus, same_json
from ..tasks.sides import open_sides
from ..tasks.sql.compare import IdentityJoin
from . import runs
from .retire import FINISHED, RUNNABLE, ledger_ran_on_new, retirements

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from ..config import Settings
    from ..journal import Journal
    from ..tasks.identity import IdentityRow
    from ..tasks.records import TaskStore

MISSING: Final = "missing"  # on old, not on new
EXTRA: Final = "extra"  # on new, not on old
MISMATCHED: Final = "mismatched"  # on both, identity (key, type, payload, created_at, run_at) differs
STATUS_DIFFERS: Final = "status_differs"  # same identity, other status or attempts

#: How a task was compared, for `rows_by_path`: equal inside the database (`IdentityJoin`, the
#: row never reached Python); equal on raw values in Python; raw values differed and decoding
#: both identities (the checksum) found them equal; compared as records (a store without
#: identity rows); a possible difference, re-read before it was reported.
IN_DATABASE: Final = "in_database"
RAW: Final = "raw"
DECODED: Final = "decoded"
RECORDS: Final = "records"
REREAD: Final = "reread"
PATHS: Final = (IN_DATABASE, RAW, DECODED, RECORDS, REREAD)

#: How long a difference waits before it is re-read, so that a dual write in flight lands.
DEFAULT_SETTLE_SECONDS: Final = 0.5
#: Keys per page of `IdentityJoin`, in batches: equal rows never leave the database, so a page
#: costs little memory, and larger pages cost fewer statements.
_JOINED_BATCHES: Final = 20
#: Rows compared in one slice after a difference; the slice doubles while rows agree.
_FIRST_RUN: Final = 8
_status_of_row: Final = itemgetter(STATUS)
_seen: Final = itemgetter(3)  # of a waiting difference


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
    #: Old copies still pending or running of tasks that ran on the new side, and (while the
    #: new side consumes) of tasks it owns and has not finished: a stock old worker would run
    #: them (again, or alongside new); `retire_old` retires them (`retire.retirements`).
    runnable_old_copies: int = 0
    #: From the execution ledger (None when validate ran without it, or it was unreachable).
    executed_twice: int | None = None
    refused_executions: int | None = None
    #: How each task was compared (each key once): `PATHS`.
    paths: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))

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
            "runnable_old_copies": self.runnable_old_copies,
            "executed_twice": self.executed_twice,
            "refused_executions": self.refused_executions,
            "rows_by_path": dict(self.paths),
        }


def classify(old: TaskRecord | None, new: TaskRecord | None) -> tuple[str, list[str]] | None:
    """The kind of difference between two records with the same key, and the differing
    fields; None when they agree (only `updated_at` or `metadata` may differ)."""
    if old is None or new is None:
        if old is None and new is None:
            return None
        return (MISSING if new is None else EXTRA), []
    same_payload = same_json(old.payload, new.payload)  # type-aware: `==` says True == 1 == 1.0
    if same_payload and old == new:  # the common case: no canonical JSON
        return None
    if (
        old.type != new.type
        or old.created_at != new.created_at
        or not same_payload
        or old.run_at != new.run_at
    ):
        fields = old.differing_fields(new)
        if any(name in IDENTITY_FIELDS for name in fields):
            return MISMATCHED, fields
    progress = [name for name in PROGRESS_FIELDS if getattr(old, name) != getattr(new, name)]
    return (STATUS_DIFFERS, progress) if progress else None


def _same_payloads(rows_a: Sequence[IdentityRow], rows_b: Sequence[IdentityRow]) -> bool:
    """For rows already equal by `==`: whether their payloads are equal as JSON too. JSON text
    compares exactly; a decoded payload (a dict: JSON or JSONB columns, memory stores) must
    also match in JSON types, which `==` ignores (`True == 1 == 1.0`)."""
    return all(
        type(a[PAYLOAD]) is str or same_json(a[PAYLOAD], b[PAYLOAD])
        for a, b in zip(rows_a, rows_b, strict=True)
    )


class _Side:
    """One side's identity rows, a page at a time; counts each page as it arrives."""

    def __init__(self, pages: Iterator[Sequence[IdentityRow]], counts: dict[TaskStatus, int]) -> None:
        self.pages = pages
        self.counts = counts
        self.page: Sequence[IdentityRow] = ()
        self.at = 0
        self.total = 0

    def ready(self) -> bool:
        """Whether a row is waiting at `at` (fetching the next page when this one is done)."""
        while self.at >= len(self.page):
            page = next(self.pages, None)
            if page is None:
                return False
            self.page, self.at = page, 0
            self.total += len(page)
            for status, n in Counter(map(_status_of_row, page)).items():
                self.counts[status_of(status)] += n
        return True


class _Validation:
    def __init__(self, old: TaskStore, new: TaskStore, sample_size: int, settle: float) -> None:
        self.old, self.new = old, new
        self.sample_size = sample_size
        self.settle = settle
        self.report = ValidationReport()
        # (key, old status as scanned, new status as scanned, when seen): differences waiting
        # for their re-read; None for a side that lacked the key.
        self.pending: list[tuple[str, TaskStatus | None, TaskStatus | None, float]] = []
        self.batch_size = 1000

    def count(self, old: TaskStatus | None, new: TaskStatus | None, sign: int) -> None:
        report = self.report
        if old is not None:
            report.old_count += sign
            report.counts_old[old] += sign
        if new is not None:
            report.new_count += sign
            report.counts_new[new] += sign

    def scan(self, old_rows: IdentityScan, new_rows: IdentityScan, batch_size: int) -> None:
        """Merge both sides' identity rows by key; every possible difference waits in `pending`."""
        self.batch_size = batch_size
        paths = self.report.paths
        equal = RECORDS if isinstance(old_rows, RecordRows) or isinstance(new_rows, RecordRows) else RAW
        a = _Side(identity_pages(old_rows, batch_size), self.report.counts_old)
        b = _Side(identity_pages(new_rows, batch_size), self.report.counts_new)
        run = _FIRST_RUN
        while True:
            has_a, has_b = a.ready(), b.ready()
            if not (has_a and has_b):
                if has_a:
                    self.differs(a.page[a.at], None)
                    a.at += 1
                elif has_b:
                    self.differs(None, b.page[b.at])
                    b.at += 1
                else:
                    break
                continue
            rows_a, i, rows_b, j = a.page, a.at, b.page, b.at
            span = min(run, len(rows_a) - i, len(rows_b) - j)
            if rows_a[i : i + span] == rows_b[j : j + span] and _same_payloads(
                rows_a[i : i + span], rows_b[j : j + span]
            ):  # the common case: a run of equal rows
                a.at, b.at = i + span, j + span
                paths[equal] += span
                run *= 2
                continue
            run = _FIRST_RUN
            while rows_a[i] == rows_b[j] and _same_payloads(
                (rows_a[i],), (rows_b[j],)
            ):  # stops inside the span
                i, j = i + 1, j + 1
                paths[equal] += 1
            row_a, row_b = rows_a[i], rows_b[j]
            if row_a[KEY] < row_b[KEY]:
                self.differs(row_a, None)
                a.at, b.at = i + 1, j
            elif row_b[KEY] < row_a[KEY]:
                self.differs(None, row_b)
                a.at, b.at = i, j + 1
            else:
                self.pair(old_rows, new_rows, row_a, row_b, equal)
                a.at, b.at = i + 1, j + 1
        # Rows were counted by status as their pages arrived; re-reads adjusted both counts since.
        self.report.old_count += a.total
        self.report.new_count += b.total

    def scan_joined(self, join: IdentityJoin, batch_size: int) -> None:
        """`scan`, compared inside the database: only the pairs it did not find equal (and
        the keys on one side only) reach Python, and are settled as `scan` settles them."""
        self.batch_size = batch_size
        report, after = self.report, None
        while True:
            page, last = join.page(after, batch_size * _JOINED_BATCHES)
            for found, counts in ((page.old_counts, report.counts_old), (page.new_counts, report.counts_new)):
                for status, n in found.items():
                    counts[status] += n
            report.old_count += page.old_count
            report.new_count += page.new_count
            for row_a, row_b in page.pairs:
                if row_a is None or row_b is None:
                    self.differs(row_a, row_b)
                else:
                    self.pair(join.old, join.new, row_a, row_b, IN_DATABASE)
            report.paths[IN_DATABASE] += page.old_count - sum(1 for a, _ in page.pairs if a is not None)
            if last is None:
                return
            after = last

    def pair(
        self,
        old_rows: IdentityScan,
        new_rows: IdentityScan,
        row_a: IdentityRow,
        row_b: IdentityRow,
        equal: str,
    ) -> None:
        """Two rows of one key whose raw values are not all equal: a possible difference, or
        equal after all (on raw identity values: `equal`'s path; by decoding: `DECODED`)."""
        same_raw = (
            row_a[TYPE : CREATED_AT + 1] == row_b[TYPE : CREATED_AT + 1]
            and row_a[RUN_AT] == row_b[RUN_AT]
            and _same_payloads((row_a,), (row_b,))
        )
        if not same_raw and old_rows.identity_checksum(row_a) != new_rows.identity_checksum(row_b):
            self.differs(row_a, row_b)  # other forms of one value (JSON spacing, a zone) agree by checksum
        elif row_a[STATUS] != row_b[STATUS] or row_a[ATTEMPTS] != row_b[ATTEMPTS]:
            self.differs(row_a, row_b)
        else:
            self.report.paths[equal if same_raw else DECODED] += 1

    def differs(self, old: IdentityRow | None, new: IdentityRow | None) -> None:
        """A possible difference: it waits for its re-read."""
        either = old if old is not None else new
        assert either is not None
        self.report.paths[REREAD] += 1
        self.pending.append(
            (
                either[KEY],
                None if old is None else status_of(old[STATUS]),
                None if new is None else status_of(new[STATUS]),
                time.monotonic(),
            )
        )
        if len(self.pending) >= self.batch_size:
            self.recheck_settled()

    def recheck_settled(self) -> None:
        """Re-read the waiting differences whose settle time has passed, when they make half a
        batch: younger ones wait while the scan goes on (so a scan that meets many differences
        does not stop for each batch's settle time). At two batches waiting, the oldest batch
        is re-read, after its settle time: memory stays bounded."""
        settled = bisect_right(self.pending, time.monotonic() - self.settle, key=_seen)
        if settled >= max(self.batch_size // 2, 1):
            self.recheck(settled)
        elif len(self.pending) >= 2 * self.batch_size:
            self.recheck(self.batch_size)

    def recheck(self, count: int | None = None) -> None:
        """Re-read the first `count` waiting differences (all of them by default) on both
        sides and report what is still different: as identity rows where both stores offer
        them (`identities_of`), decoding only the rows whose raw identities differ (one
        `get_many` per side when the store offers it)."""
        batch = self.pending[:count]
        if not batch:
            return
        # Every difference waits its whole settle time, the newest too: the scan's tail is where
        # the writes in flight are, and a re-read right behind them would report them missing.
        wait = batch[-1][3] + self.settle - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        keys = [key for key, *_ in batch]
        again: dict[str, _Reread] = {}
        if isinstance(self.old, IdentityGet) and isinstance(self.new, IdentityGet):
            rows_a, rows_b = self.old.identities_of(keys), self.new.identities_of(keys)
            for key in keys:
                settled = _settled_raw(rows_a.get(key), rows_b.get(key))
                if settled is not None:
                    again[key] = settled
        rest = [key for key in keys if key not in again]  # decoded: the record path's answer
        if rest:
            olds, news = get_many(self.old, rest), get_many(self.new, rest)
            for key in rest:
                a, b = olds.get(key), news.get(key)
                again[key] = (
                    None if a is None else a.status,
                    None if b is None else b.status,
                    classify(a, b),
                )
        for key, old, new, _ in batch:
            again_old, again_new, verdict = again[key]
            # The counts follow the re-read, so they agree with the differences reported.
            self.count(old, new, -1)
            self.count(again_old, again_new, +1)
            if (  # the same task, runnable on old although it ran on new
                verdict is not None
                and verdict[0] == STATUS_DIFFERS
                and again_old in RUNNABLE
                and again_new in FINISHED
            ):
                self.report.runnable_old_copies += 1
            if verdict is not None:
                self.report_difference(key, *verdict)
        del self.pending[: len(batch)]

    def report_difference(self, key: str, kind: str, fields: list[str]) -> None:
        """Count a difference; keep its key among the kind's samples when it is one of the
        first `sample_size` keys in key order (a scan in another order keeps the same ones)."""
        report, room = self.report, self.sample_size
        if kind == MISSING:
            report.missing += 1
            _keep(report.sample_missing, key, room)
        elif kind == EXTRA:
            report.extra += 1
            _keep(report.sample_extra, key, room)
        elif kind == MISMATCHED:
            report.mismatched += 1
            keys = [sample["key"] for sample in report.sample_mismatched]
            at = bisect_right(keys, key)
            if at < room:
                report.sample_mismatched.insert(at, {"key": key, "fields": fields})
                del report.sample_mismatched[room:]
        else:
            report.status_differs += 1


#: A difference re-read: (old status, new status, `classify`'s verdict); None for a side
#: without the task.
_Reread = tuple["TaskStatus | None", "TaskStatus | None", "tuple[str, list[str]] | None"]


def _settled_raw(a: IdentityRow | None, b: IdentityRow | None) -> _Reread | None:
    """The re-read of two identity rows of one key, when their raw values settle it without
    decoding: both readable, the same identity on raw values, so at most a progress
    difference (`classify` would say the same). None otherwise: the rows are decoded."""
    if (
        a is None
        or b is None
        or None in (a[STATUS], b[STATUS], a[TYPE], b[TYPE], a[CREATED_AT], b[CREATED_AT])
    ):
        return None
    same = a[TYPE : CREATED_AT + 1] == b[TYPE : CREATED_AT + 1] and a[RUN_AT] == b[RUN_AT]
    if not (same and _same_payloads((a,), (b,))):
        return None
    progress = [name for name, at in (("status", STATUS), ("attempts", ATTEMPTS)) if a[at] != b[at]]
    verdict = (STATUS_DIFFERS, progress) if progress else None
    return status_of(a[STATUS]), status_of(b[STATUS]), verdict


def _keep(samples: list[str], key: str, room: int) -> None:
    """Insert `key` into the sorted `samples`, keeping the first `room`."""
    at = bisect_right(samples, key)
    if at < room:
        samples.insert(at, key)
        del samples[room:]


def validate(
    old: TaskStore,
    new: TaskStore,
    *,
    batch_size: int = 1000,
    sample_size: int = 20,
    settle: float = DEFAULT_SETTLE_SECONDS,
    fast: bool = True,
    in_database: bool = True,
) -> ValidationReport:
    """Compare the two sides key by key; see the module docstring and docs/VALIDATION.md.

    When both stores offer `IdentityScan` (and `fast`), their raw identity rows are compared:
    inside the database when one connection reaches both tables (`IdentityJoin`, and
    `in_database`), else in Python; otherwise rows built from their records are. Whichever
    path, the report is the same (but for `rows_by_path`, which says which path each row took)."""
    started = time.monotonic()
    run = _Validation(old, new, sample_size, settle)
    both = fast and isinstance(old, IdentityScan) and isinstance(new, IdentityScan)
    join = IdentityJoin.between(old, new) if both and in_database else None
    if join is not None:
        run.scan_joined(join, batch_size)
    else:
        run.scan(identity_source(old, fast=both), identity_source(new, fast=both), batch_size)
    run.recheck()
    run.report.seconds = round(time.monotonic() - started, 3)
    return run.report


def validate_migration(
    store: Journal, settings: Settings, migration: str, *, settle: float = DEFAULT_SETTLE_SECONDS
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
        owned_by_new = routing_for(state.phase, state.percent).consume_from == "new"
        ledger_figures(report, old, new, settings, migration, store, owned_by_new=owned_by_new)
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


def ledger_figures(  # noqa: PLR0917 - the report, both sides and where the ledger is
    report: ValidationReport,
    old: TaskStore,
    new: TaskStore,
    settings: Settings,
    migration: str,
    store: Journal,
    *,
    owned_by_new: bool,
) -> None:
    """Add the execution ledger's figures to `report`: `executed_twice`, `refused_executions`,
    and the runnable old copies of keys the ledger alone says succeeded on the new side. An
    unreachable ledger database leaves them None (and adds nothing).

    `owned_by_new` (the new side consumes: `cutover`, `cleanup`, `complete`): every task with
    a new copy is new's, so `runnable_old_copies` counts exactly what `retire_old` retires
    and `old_drained` names (`retire.retirements`: ran on new, or owned by new and not
    finished there), in a second pass over both sides."""
    url = settings.ledger_database_url
    batch_size = settings.backfill_batch_size
    try:
        with Ledger(url, engine=store.engine if url == settings.database_url else None) as ledger:
            counts = ledger.counts(migration)
            if owned_by_new:
                runnable = sum(1 for _ in retirements(old, new, ledger, migration, batch_size))
            else:
                runnable = report.runnable_old_copies + sum(
                    1 for _ in ledger_ran_on_new(old, new, ledger, migration, batch_size)
                )
    except DatabaseUnavailable:
        return
    report.executed_twice = counts.executed_twice
    report.refused_executions = counts.refused_executions
    report.runnable_old_copies = runnable
