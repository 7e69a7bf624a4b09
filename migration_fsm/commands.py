"""One plain function per operator verb. They take settings, do the work and return data;
`cli` only parses arguments and prints what they return."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .exceptions import BadInput, ConfigError, DatabaseUnavailable, JournalCorrupt, TriggerNotAllowed
from .fsm import EntryStatus, Phase, StepStatus, Trigger, allowed_triggers, mermaid, replay, routing_for
from .journal import Journal, JournalEntry, MigrationState, chain_hash, make_engine, redact, redact_text
from .journal.ledger import Ledger, LedgerCounts
from .journal.records import corrupt_rows, phase_entered_at, version_bumps
from .journal.workers import SideWorkers, Workers
from .migration import Migration, TransitionResult
from .plugins import notify

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from .config import Settings
    from .plugins.notify import DeliveryReport, TargetState
    from .tools.archive import ArchiveSummary, Imported
    from .tools.backfill import BackfillResult
    from .tools.progress import Progress
    from .tools.reconcile import Reconciled
    from .tools.runs import ValidationRun
    from .tools.validate import ValidationReport


@contextmanager
def open_store(settings: Settings, *, readonly: bool = False) -> Iterator[Journal]:
    """The migration database, checked to be at the schema head (`readonly`: for a command
    that only reads; a SQLite file is then opened read-only)."""
    store = Journal.open(settings.database_url, readonly=readonly)
    try:
        yield store
    finally:
        store.close()


@contextmanager
def open_engine(settings: Settings, migration: str, *, deliver: bool = True) -> Iterator[Migration]:
    """A `Migration` on the migration database. With `[[notify]]` targets (and `deliver`),
    the targets get their cursors first, and once the command is done (the operator lock
    released), refused or stopped by a failing step, the events it wrote are delivered within
    the targets' `timeout_seconds` (`plugins.notify.deliver_pending`, which never raises);
    what is left waits in the outbox for the next command."""
    with open_store(settings) as store:
        if not (deliver and settings.notify):
            yield Migration(store, settings, migration)
            return
        notify.register(store, settings, migration)
        try:
            yield Migration(store, settings, migration)
        except Exception:
            notify.deliver_pending(settings, migration, journal=store)
            raise
        notify.deliver_pending(settings, migration, journal=store)


def db_upgrade(settings: Settings) -> tuple[set[str], set[str]]:
    """Create or upgrade the schema to the Alembic head; (revisions before, after). A ledger
    in its own database (`ledger_url`) is upgraded too, by the same revisions."""
    urls = [settings.database_url]
    if settings.ledger_url and settings.ledger_url != settings.database_url:
        urls.append(settings.ledger_url)
    results = []
    for url in urls:
        store = Journal(url, engine=make_engine(url, create=True))
        try:
            results.append(store.upgrade())
        finally:
            store.close()
    return results[0]


def init(settings: Settings, migration: str) -> MigrationState:
    """Create the migration in `preparation`."""
    with open_engine(settings, migration) as engine:
        return engine.init()


def advance(
    settings: Settings,
    migration: str,
    *,
    dry_run: bool = False,
    force: bool = False,
    reason: str | None = None,
) -> TransitionResult:
    """Take the next edge."""
    with open_engine(settings, migration, deliver=not dry_run) as engine:
        return engine.advance(reason=reason, force=force, dry_run=dry_run)


def rollback(
    settings: Settings,
    migration: str,
    *,
    reason: str,
    to: Phase | None = None,
    dry_run: bool = False,
    seen_version: int | None = None,
) -> list[TransitionResult]:
    """Go back one edge, or edge by edge to `to` (with `seen_version`: only if the migration
    is still at that version, else exit 3; what `watch` does)."""
    with open_engine(settings, migration, deliver=not dry_run) as engine:
        return engine.rollback(reason=reason, to=to, dry_run=dry_run, seen_version=seen_version)


def release(settings: Settings, migration: str, *, reason: str) -> JournalEntry:
    """Release the hold `watch` placed (`on_failure = "pause"`): `advance` and a ramp up are
    allowed again. Exit 2 when no hold stands."""
    with open_engine(settings, migration) as engine:
        return engine.release(reason=reason)


def ramp(settings: Settings, migration: str, percent: int, *, reason: str | None = None) -> TransitionResult:
    """Set the cutover percent."""
    with open_engine(settings, migration) as engine:
        return engine.ramp(percent, reason=reason)


def approve(settings: Settings, migration: str, *, edge: str, reason: str) -> JournalEntry:
    """Approve `edge` (one of `[approvals]`) for another operator to take."""
    with open_engine(settings, migration) as engine:
        return engine.approve(edge, reason=reason)


def resume(settings: Settings, migration: str, *, steal: bool = False) -> TransitionResult:
    """Finish the interrupted transition."""
    with open_engine(settings, migration) as engine:
        return engine.resume(steal=steal)


def abort(settings: Settings, migration: str, *, reason: str) -> TransitionResult:
    """Undo the interrupted transition's done steps and stay in its source phase."""
    with open_engine(settings, migration) as engine:
        return engine.abort(reason=reason)


@dataclass(frozen=True, slots=True)
class Status:
    """What `status` shows: the `status --json` object plus details for people."""

    state: MigrationState
    interrupted: JournalEntry | None
    #: side -> its workers (live, acknowledged the current version, gone), when read.
    workers: dict[str, SideWorkers] | None = None
    #: The execution ledger's counts, when read (None: not read, or `ledger_error`).
    ledger: LedgerCounts | None = None
    ledger_error: str | None = None
    #: Each `[[notify]]` target's delivery state (empty: no target configured).
    notify: list[TargetState] = field(default_factory=list)
    #: The hold of `watch` that stands (`held` row), if any.
    hold: JournalEntry | None = None

    def as_json(self) -> dict[str, Any]:
        interrupted = None
        if self.interrupted is not None:
            entry = self.interrupted
            interrupted = {
                "seq": entry.seq,
                "trigger": str(entry.trigger),
                "source": None if entry.source is None else str(entry.source),
                "dest": str(entry.dest),
                "step": next((s.name for s in entry.steps if s.status != StepStatus.DONE), None),
            }
        state = self.state
        return {
            "migration": state.name,
            "phase": str(state.phase),
            "version": state.version,
            "percent": state.percent,
            "routing": routing_for(state.phase, state.percent).as_dict(),
            "interrupted": interrupted,
            "allowed": [] if interrupted else allowed_triggers(state.phase),
            "paused": state.paused_side,
            "workers": None
            if self.workers is None
            else {side: judged.as_json() for side, judged in self.workers.items()},
            "ledger": None if self.ledger is None else self.ledger.as_json(),
            "notify": [target.as_json() for target in self.notify],
            "hold": None
            if self.hold is None
            else {
                "seq": self.hold.seq,
                "actor": self.hold.actor,
                "reason": redact(self.hold.reason),
                "at": None if self.hold.finished_at is None else self.hold.finished_at.isoformat(),
            },
        }


def status(settings: Settings, migration: str, store: Journal | None = None) -> Status:
    """Where the migration stands (reusing `store` when given, as `status --watch` does)."""
    if store is None:
        with open_store(settings, readonly=True) as opened:
            return status(settings, migration, opened)
    state = store.get(migration)
    entry = None if state.in_progress_seq is None else store.entry(state, state.in_progress_seq)
    workers = Workers(store.engine, ttl_seconds=settings.worker_ttl_seconds).sides(migration, state.version)
    counts, error = ledger_counts(settings, migration, store)
    return Status(
        state,
        entry,
        workers,
        counts,
        error,
        notify.target_report(store, settings, migration),
        store.standing_hold(state),
    )


def ledger_counts(
    settings: Settings, migration: str, store: Journal
) -> tuple[LedgerCounts | None, str | None]:
    """The execution ledger's counts (on the migration database, or `ledger_url`); when the
    ledger's own database cannot be read, None and why (the rest of `status` still shows)."""
    url = settings.ledger_database_url
    try:
        if url == settings.database_url:
            return Ledger(url, engine=store.engine).counts(migration), None
        engine = make_engine(url, readonly=True)
        try:
            return Ledger(url, engine=engine).counts(migration), None
        finally:
            engine.dispose()
    except (DatabaseUnavailable, ConfigError) as exc:
        return None, redact_text(str(exc))


def history(settings: Settings, migration: str, store: Journal | None = None) -> list[JournalEntry]:
    """The journal, oldest first, with any secret a row written before they were hidden
    (a guard's detail, an error) redacted for display (`verify` reads the rows as stored);
    reusing `store` when given, as `serve` does."""
    if store is None:
        with open_store(settings, readonly=True) as opened:
            return history(settings, migration, opened)
    return [_redacted(entry) for entry in store.journal(store.get(migration))]


def _redacted(entry: JournalEntry) -> JournalEntry:
    from dataclasses import replace as replaced

    return replaced(
        entry,
        reason=redact(entry.reason),
        error=redact(entry.error),
        guards=[
            {**g, "detail": redact_text(g["detail"])} if isinstance(g["detail"], str) else g
            for g in entry.guards
        ],
        steps=[replaced(step, error=redact(step.error)) for step in entry.steps],
    )


def validation_runs(settings: Settings, migration: str) -> list[ValidationRun]:
    """The stored `validate` runs of the migration, oldest first (shown by `history`)."""
    from .tools.runs import validation_runs as stored_runs

    with open_store(settings, readonly=True) as store:
        return list(reversed(stored_runs(store, migration)))


def history_json(entries: list[JournalEntry]) -> list[dict[str, Any]]:
    """The `history --json` list."""
    return [
        {
            "seq": e.seq,
            "trigger": str(e.trigger),
            "source": None if e.source is None else str(e.source),
            "dest": str(e.dest),
            "status": e.status,
            "actor": e.actor,
            "reason": e.reason,
            "forced": e.forced,
            "started_at": e.started_at.isoformat(),
            "finished_at": None if e.finished_at is None else e.finished_at.isoformat(),
            "guards": [{"name": g["name"], "passed": g["passed"], "detail": g["detail"]} for g in e.guards],
            "steps": [{"name": s.name, "status": s.status, "attempts": s.attempts} for s in e.steps],
            "error": e.error,
        }
        for e in entries
    ]


@dataclass(frozen=True, slots=True)
class Verified:
    """A journal that checked out."""

    migration: str
    rows: int
    head_hash: str | None
    phase: Phase
    percent: int
    #: With `--expect-head`: the row whose hash is the anchor (None: no anchor given).
    anchor_seq: int | None = None


def verify(settings: Settings, migration: str, *, expect_head: str | None = None) -> Verified:
    """Check the hash chain, that replaying the journal gives the stored phase and percent,
    that `phase_entered_at` is when the journal says the phase was entered, and the digests
    of the validation runs and the backfill checkpoint (revision 0007). With `expect_head`
    (a head hash kept outside the database, e.g. pasted into the change ticket by an earlier
    `verify`), also that this hash is still a row of the chain: a rewind or a rewrite of the
    journal since then is detected.

    Raises `JournalCorrupt` (exit 4) naming every row that is wrong or does not decode.
    """
    from .tools.runs import check_rows

    with open_store(settings, readonly=True) as store:
        state = store.get(migration)
        entries, problems = store.decoded_journal(state)
        problems += check_rows(store, migration)
    if problems:
        raise corrupt_rows(migration, problems)
    return verify_entries(state, entries, expect_head=expect_head)


def verify_entries(
    state: MigrationState, entries: list[JournalEntry], *, expect_head: str | None = None
) -> Verified:
    """`verify` on rows already read."""
    name = state.name

    def corrupt(why: str) -> JournalCorrupt:
        return JournalCorrupt(f"journal of migration '{name}' does not verify: {why}")

    prev, committed = _check_chain(state, entries, corrupt)
    bumps = sum(version_bumps(entry) for entry in entries)  # pauses and lifts bump it too
    if state.head_hash != prev:
        raise corrupt("the last row(s) were deleted or altered (the head hash does not match)")
    if state.last_seq != len(entries):
        raise corrupt(f"the journal has {len(entries)} rows, the migration counts {state.last_seq}")
    try:
        phase, percent = replay(committed)
    except (ValueError, TriggerNotAllowed) as exc:
        raise corrupt(f"replaying it fails: {exc}") from exc
    if (phase, percent) != (state.phase, state.percent):
        raise corrupt(
            f"replaying it gives {phase} at {percent}%, the stored state is {state.phase} at {state.percent}%"
        )
    if state.version != len(committed) + bumps:
        raise corrupt(
            f"it has {len(committed)} committed rows and {bumps} pauses or lifts,"
            f" the stored version is {state.version}"
        )
    entered = phase_entered_at(entries)
    if entered is not None and entered != state.phase_entered_at:
        raise corrupt(
            f"the migration row's phase_entered_at ({state.phase_entered_at.isoformat()}) is not when"
            f" the journal says {state.phase} was entered ({entered.isoformat()})"
        )
    anchor = None
    if expect_head is not None:
        anchor = _find_anchor(entries, expect_head, corrupt)
    return Verified(name, len(entries), prev, phase, percent, anchor)


def _find_anchor(
    entries: list[JournalEntry], expect_head: str, corrupt: Callable[[str], JournalCorrupt]
) -> int:
    """The seq of the closed row whose hash is `expect_head` (a full hash, or its first 12 or
    more characters); `JournalCorrupt` when no row has it: the journal was rewound past the
    anchor, or rewritten (every hash recomputed) since the anchor was taken."""
    wanted = expect_head.strip().lower()
    if len(wanted) < 12:
        raise BadInput(f"--expect-head needs at least 12 characters of the hash, not '{expect_head}'")
    for entry in reversed(entries):
        if entry.hash is not None and entry.hash.startswith(wanted):
            return entry.seq
    raise corrupt(
        f"no row has the expected head hash {wanted}: the journal was rewound or rewritten since"
        " that hash was taken (restore it from a backup and compare)"
    )


def _check_chain(
    state: MigrationState, entries: list[JournalEntry], corrupt: Callable[[str], JournalCorrupt]
) -> tuple[str | None, list[tuple[Trigger, Phase | None, Phase, int]]]:
    """Walk the rows: seqs without gaps, an intent only as the interrupted last row, every
    closed row's hash chained to the one before. The chain's head and the committed edges."""
    prev: str | None = None
    committed: list[tuple[Trigger, Phase | None, Phase, int]] = []
    for index, entry in enumerate(entries, start=1):
        if entry.seq != index:
            raise corrupt(f"row #{index} is missing (found #{entry.seq} in its place)")
        if entry.status == EntryStatus.INTENT:
            if index != len(entries) or state.in_progress_seq != entry.seq:
                raise corrupt(
                    f"row #{entry.seq} is an unfinished intent that is not the interrupted transition"
                )
            continue
        if entry.prev_hash != prev or entry.hash != chain_hash(prev, state.name, entry):
            raise corrupt(f"row #{entry.seq} was altered, or a row before it was")
        prev = entry.hash
        if entry.status == EntryStatus.COMMITTED:
            committed.append((entry.trigger, entry.source, entry.dest, entry.percent))
    if state.in_progress_seq is not None and (not entries or entries[-1].status != EntryStatus.INTENT):
        raise corrupt(f"the interrupted transition #{state.in_progress_seq} has no intent row")
    return prev, committed


def backfill(
    settings: Settings,
    migration: str,
    *,
    batch_size: int | None = None,
    max_rate: float | None = None,
    progress: Progress | None = None,
) -> BackfillResult:
    """Copy the old side's tasks to the new side, continuing an unfinished backfill."""
    from .tools.backfill import backfill_migration

    with open_store(settings) as store:
        return backfill_migration(
            store, settings, migration, batch_size=batch_size, max_rate=max_rate, progress=progress
        )


def validate(settings: Settings, migration: str) -> ValidationReport:
    """Compare the two sides key by key and record the run (the guards read it)."""
    from .tools.validate import validate_migration

    with open_store(settings) as store:
        return validate_migration(store, settings, migration)[1]


def export(
    settings: Settings, migration: str, *, side: str, out: str, overwrite: bool = False
) -> ArchiveSummary:
    """Write every task of one side to a JSON Lines file (gzip for .gz) with a summary line
    naming the side and the migration. Never replaces an existing file unless `overwrite`,
    and never a non-regular file or one of the configured databases."""
    from .tasks.sides import open_side, side_name
    from .tools.archive import export_tasks

    chosen = side_name(side)
    with open_store(settings) as store:
        store.get(migration)  # an unknown migration is bad input, before anything is written
    with open_side(settings, chosen) as tasks:
        return export_tasks(
            tasks,
            out,
            side=chosen,
            migration=migration,
            batch_size=settings.backfill_batch_size,
            overwrite=overwrite,
            protected=protected_files(settings),
        )


def protected_files(settings: Settings) -> dict[Path, str]:
    """The files no export may replace: every configured SQLite database, with its journal
    files, mapped to what it is."""
    from .journal.db import sqlite_path

    urls = {"the migration database": settings.database_url}
    if settings.ledger_url:
        urls["the execution ledger's database"] = settings.ledger_url
    for name, store in settings.stores.items():
        if store.url:
            urls[f"the {name} store's database"] = store.url
    files: dict[Path, str] = {}
    for what, url in urls.items():
        path = sqlite_path(url)
        if path is not None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                files[path.with_name(path.name + suffix)] = f"{what} ({path.name}{suffix})"
    return files


def import_(
    settings: Settings, migration: str, *, side: str, path: str, into_other_side: bool = False
) -> Imported:
    """Verify an export, then load it into one side in batches of idempotent upserts.

    Refused (nothing written) when the archive was exported from the other side (unless
    `into_other_side`) or for another migration, and while a transition of the migration is
    in progress or interrupted; each batch is written under the data fence
    (`Journal.data_fence`), so an import stops before its next batch once a transition
    begins. Every import is journaled (`mfsm_imports`) with the archive's summary."""
    from .journal.locks import lease_holder_name
    from .tasks.sides import open_side, shares_migration_file, side_name
    from .tools import runs
    from .tools.archive import import_tasks

    chosen = side_name(side)

    def check(summary: ArchiveSummary) -> None:
        if summary.migration is not None and summary.migration != migration:
            raise BadInput(
                f"{path} was exported for migration '{summary.migration}', not '{migration}':"
                f" import it with -m {summary.migration}"
            )
        if summary.side != chosen and not into_other_side:
            raise BadInput(
                f"{path} holds the {summary.side} side's tasks, not the {chosen} side's: pass"
                f" --into-other-side to load them into the {chosen} side anyway"
            )

    holder = lease_holder_name(settings.actor)
    with open_store(settings) as store:
        state = store.get(migration)
        store.check_data_fence(state, "import", state.version)  # refuse before reading the archive
        hold = not shares_migration_file(settings, chosen)
        loaded = 0
        run: int | None = None

        def fence() -> AbstractContextManager[object]:
            return store.data_fence(migration, holder, tool="import", version=state.version, hold=hold)

        def started(summary: ArchiveSummary) -> None:
            nonlocal run
            check(summary)
            run = runs.start_import(
                store, migration, side=chosen, actor=settings.actor, path=str(path), archive=summary.as_json()
            )

        def progress(total: int) -> None:
            nonlocal loaded
            loaded = total

        with open_side(settings, chosen) as tasks:
            try:
                result = import_tasks(
                    tasks,
                    path,
                    batch_size=settings.backfill_batch_size,
                    fence=fence,
                    check=started,
                    loaded_so_far=progress,
                )
            except BaseException as exc:
                if run is not None:
                    runs.finish_import(
                        store, run, loaded=loaded, error=redact_text(f"{type(exc).__name__}: {exc}")
                    )
                raise
        assert run is not None
        runs.finish_import(store, run, loaded=result.loaded)
        return result


def reconcile(settings: Settings, migration: str) -> Reconciled:
    """Replay the open dual-write repair entries from the side that took each write.

    Refused while a transition is in progress or interrupted (exit 3); each batch of entries
    is replayed under the data fence (`Journal.data_fence`), so a transition that begins
    meanwhile stops it before its next batch. The execution ledger keeps a hand-over marker
    off the side that owns the task (`tools.ownership`)."""
    from .journal.locks import lease_holder_name
    from .tasks.sides import open_sides, shares_migration_file
    from .tools.ownership import open_ledger
    from .tools.reconcile import reconcile as replay_repairs

    with open_store(settings) as store:
        state = store.get(migration)  # an unknown migration is bad input, before any store is opened
        store.check_data_fence(state, "reconcile", state.version)
        holder = lease_holder_name(settings.actor)
        hold = not (shares_migration_file(settings, "old") or shares_migration_file(settings, "new"))

        def fence() -> AbstractContextManager[object]:
            return store.data_fence(migration, holder, tool="reconcile", version=state.version, hold=hold)

        with open_sides(settings) as (old, new), open_ledger(settings, store.engine) as ledger:
            return replay_repairs(
                store, migration, old, new, batch=settings.backfill_batch_size, fence=fence, ledger=ledger
            )


def deliver_pending(
    settings: Settings, migration: str, budget_seconds: float | None = None
) -> DeliveryReport:
    """Send the events of `migration` its `[[notify]]` targets have not received yet, in
    order, within `budget_seconds` (default: the targets' largest `timeout_seconds`)."""
    return notify.deliver_pending(settings, migration, budget_seconds)


def diagram() -> str:
    """The state machine as Mermaid, from the definition the engine uses."""
    return mermaid()
