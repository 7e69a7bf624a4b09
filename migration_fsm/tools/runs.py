"""What the data tools record in the migration database: validation runs, backfill progress
and imports.

The tables are defined in `journal.schema` and created by Alembic revisions 0003 and 0006;
the built-in guards read them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, insert, select, update

from ..journal.chain import row_digest, row_digest_ok
from ..journal.db import utcnow
from ..journal.records import corrupt_rows, decode_rows
from ..journal.schema import backfill_table, imports_table, validation_runs_table

if TYPE_CHECKING:
    from datetime import datetime

    from ..journal import Journal


@dataclass(frozen=True, slots=True)
class ValidationRun:
    """One stored `validate` run; `summary` is the `validate --json` object."""

    id: int
    migration: str
    phase: str | None
    started_at: datetime
    finished_at: datetime
    ok: bool
    summary: dict[str, Any]
    #: The stored digest (revision 0007); `intact` says whether it matches the row.
    digest: str | None = None

    def digest_fields(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "migration": self.migration,
            "phase": self.phase,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "ok": self.ok,
            "summary": self.summary,
        }

    @property
    def intact(self) -> bool:
        """The row is as `validate` wrote it (its digest matches)."""
        return row_digest_ok("validation_run", self.digest_fields(), self.digest)


@dataclass(frozen=True, slots=True)
class BackfillProgress:
    """Where the last `backfill` of a migration got to: the last key copied and whether it ended."""

    migration: str
    cursor: str | None
    copied: int
    done: bool
    started_at: datetime
    updated_at: datetime
    #: The stored digest (revision 0007); `intact` says whether it matches the row.
    digest: str | None = None

    @property
    def intact(self) -> bool:
        """The checkpoint is as `backfill` wrote it (its digest matches)."""
        return row_digest_ok("backfill", _backfill_fields(self), self.digest)


def _backfill_fields(progress: BackfillProgress) -> dict[str, Any]:
    return {
        "migration": progress.migration,
        "cursor": progress.cursor,
        "copied": progress.copied,
        "done": progress.done,
        "started_at": progress.started_at,
        "updated_at": progress.updated_at,
    }


def record_validation(
    store: Journal,
    migration: str,
    *,
    phase: str | None,
    started_at: datetime,
    finished_at: datetime,
    ok: bool,
    summary: dict[str, Any],
) -> int:
    """Journal one validation run; returns its id."""
    with store.transaction() as conn:
        key = conn.execute(
            insert(validation_runs_table).values(
                migration=migration,
                phase=phase,
                started_at=started_at,
                finished_at=finished_at,
                ok=ok,
                summary=summary,
            )
        ).inserted_primary_key
        assert key is not None
        run = ValidationRun(int(key[0]), migration, phase, started_at, finished_at, ok, summary)
        digest = row_digest("validation_run", run.digest_fields())
        conn.execute(
            update(validation_runs_table).where(validation_runs_table.c.id == run.id).values(digest=digest)
        )
    return run.id


def latest_validation(store: Journal, migration: str) -> ValidationRun | None:
    """The most recent validation run of `migration`, if any."""
    found = validation_runs(store, migration, limit=1)
    return found[0] if found else None


def validation_runs(store: Journal, migration: str, *, limit: int | None = None) -> list[ValidationRun]:
    """The validation runs of `migration`, newest first (at most `limit`). A row that no longer
    decodes raises `JournalCorrupt` (exit 4) naming it."""
    runs, bad = _validation_runs(store, migration, limit=limit)
    if bad:
        raise corrupt_rows(migration, bad)
    return runs


def _validation_runs(
    store: Journal, migration: str, *, limit: int | None = None
) -> tuple[list[ValidationRun], list[str]]:
    where = [validation_runs_table.c.migration == migration]
    with store.transaction(readonly=True) as conn:
        if limit is not None:  # the ids of the newest `limit` runs
            ids = (
                conn.execute(
                    select(validation_runs_table.c.id)
                    .where(*where)
                    .order_by(validation_runs_table.c.id.desc())
                )
                .scalars()
                .all()[:limit]
            )
            where.append(validation_runs_table.c.id.in_(ids))
        runs, bad = decode_rows(
            conn,
            validation_runs_table,
            where=where,
            keys=[validation_runs_table.c.id],
            decode=_validation_run,
            label=lambda key: f"validate run #{key[0]}",
        )
    return list(reversed(runs)), bad


def _validation_run(row: Any) -> ValidationRun:
    if not isinstance(row["summary"], dict):
        raise TypeError(f"summary is not an object: {str(row['summary'])[:60]}")
    return ValidationRun(
        id=row["id"],
        migration=row["migration"],
        phase=row["phase"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        ok=bool(row["ok"]),
        summary=dict(row["summary"]),
        digest=row["digest"],
    )


def check_rows(store: Journal, migration: str) -> list[str]:
    """What `verify` finds wrong with the rows outside the hash chain that guards trust: every
    validation run and the backfill checkpoint of `migration` must decode and carry the digest
    they were written with (revision 0007)."""
    runs, problems = _validation_runs(store, migration)
    problems += [
        f"validate run #{run.id} was altered (its digest does not match)" for run in runs if not run.intact
    ]
    with store.transaction(readonly=True) as conn:
        found, bad = decode_rows(
            conn,
            backfill_table,
            where=[backfill_table.c.migration == migration],
            keys=[backfill_table.c.migration],
            decode=_backfill_progress,
            label=lambda _: "the backfill checkpoint",
        )
    problems += bad
    problems += [
        "the backfill checkpoint was altered (its digest does not match)" for p in found if not p.intact
    ]
    return problems


def backfill_progress(store: Journal, migration: str) -> BackfillProgress | None:
    """The backfill progress of `migration`, or None if it never ran."""
    with store.transaction(readonly=True) as conn:
        row = (
            conn.execute(select(backfill_table).where(backfill_table.c.migration == migration))
            .mappings()
            .first()
        )
    if row is None:
        return None
    return _backfill_progress(row)


def _backfill_progress(row: Any) -> BackfillProgress:
    return BackfillProgress(
        migration=row["migration"],
        cursor=row["cursor"],
        copied=int(row["copied"]),
        done=bool(row["done"]),
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        digest=row["digest"],
    )


def start_backfill(store: Journal, migration: str) -> BackfillProgress:
    """Record a fresh backfill of `migration` (replacing any earlier one)."""
    now = utcnow()
    progress = BackfillProgress(migration, None, 0, False, now, now)
    progress = replace(progress, digest=row_digest("backfill", _backfill_fields(progress)))
    values = {
        "cursor": None,
        "copied": 0,
        "done": False,
        "started_at": now,
        "updated_at": now,
        "digest": progress.digest,
    }
    with store.transaction() as conn:
        updated = conn.execute(
            update(backfill_table).where(backfill_table.c.migration == migration).values(**values)
        ).rowcount
        if updated == 0:
            conn.execute(insert(backfill_table).values(migration=migration, **values))
    return progress


#: The checkpoint's UPDATE, built once: a backfill saves one per batch.
_SAVE_BACKFILL = (
    update(backfill_table)
    .where(backfill_table.c.migration == bindparam("mfsm_migration"))
    .values(
        cursor=bindparam("mfsm_cursor"),
        copied=bindparam("mfsm_copied"),
        done=bindparam("mfsm_done"),
        updated_at=bindparam("mfsm_updated_at"),
        digest=bindparam("mfsm_digest"),
    )
)
_BACKFILL_STARTED = select(backfill_table.c.started_at).where(
    backfill_table.c.migration == bindparam("mfsm_migration")
)


def save_backfill(
    store: Journal, migration: str, *, cursor: str | None, copied: int, done: bool = False
) -> None:
    """Move the backfill checkpoint of `migration` to `cursor` (the last key copied)."""
    now = utcnow()
    with store.transaction() as conn:
        started = conn.execute(_BACKFILL_STARTED, {"mfsm_migration": migration}).scalar()
        progress = BackfillProgress(migration, cursor, copied, done, started or now, now)
        digest = row_digest("backfill", _backfill_fields(progress))
        if started is None:
            values = {"cursor": cursor, "copied": copied, "done": done, "updated_at": now, "digest": digest}
            conn.execute(insert(backfill_table).values(migration=migration, started_at=now, **values))
            return
        conn.execute(
            _SAVE_BACKFILL,
            {
                "mfsm_migration": migration,
                "mfsm_cursor": cursor,
                "mfsm_copied": copied,
                "mfsm_done": done,
                "mfsm_updated_at": now,
                "mfsm_digest": digest,
            },
        )


@dataclass(frozen=True, slots=True)
class ImportRun:
    """One journaled `import`: `outcome` is `running` (it has not ended: it is running, or its
    process died), `loaded` or `stopped` (with `error`); `archive` is the archive's summary."""

    id: int
    migration: str
    side: str
    actor: str
    path: str
    archive: dict[str, Any]
    outcome: str
    loaded: int
    error: str | None
    started_at: datetime
    finished_at: datetime | None


def start_import(
    store: Journal, migration: str, *, side: str, actor: str, path: str, archive: dict[str, Any]
) -> int:
    """Journal an import that is about to write; returns its id (`finish_import` ends it)."""
    with store.transaction() as conn:
        key = conn.execute(
            insert(imports_table).values(
                migration=migration,
                side=side,
                actor=actor,
                path=path,
                archive=archive,
                outcome="running",
                loaded=0,
                started_at=utcnow(),
            )
        ).inserted_primary_key
    assert key is not None
    return int(key[0])


def finish_import(store: Journal, run: int, *, loaded: int, error: str | None = None) -> None:
    """End the journaled import `run`: `loaded`, or `stopped` with `error`."""
    with store.transaction() as conn:
        conn.execute(
            update(imports_table)
            .where(imports_table.c.id == run)
            .values(
                outcome="loaded" if error is None else "stopped",
                loaded=loaded,
                error=error,
                finished_at=utcnow(),
            )
        )


def import_runs(store: Journal, migration: str) -> list[ImportRun]:
    """The journaled imports of `migration`, oldest first."""
    query = select(imports_table).where(imports_table.c.migration == migration).order_by(imports_table.c.id)
    with store.transaction(readonly=True) as conn:
        rows = conn.execute(query).mappings().all()
    return [
        ImportRun(
            id=row["id"],
            migration=row["migration"],
            side=row["side"],
            actor=row["actor"],
            path=row["path"],
            archive=dict(row["archive"]),
            outcome=row["outcome"],
            loaded=int(row["loaded"]),
            error=row["error"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
        )
        for row in rows
    ]
