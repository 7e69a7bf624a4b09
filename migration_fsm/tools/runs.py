"""What the data tools record in the migration database: validation runs, backfill progress
and imports.

The tables are defined in `journal.schema` and created by Alembic revisions 0003 and 0006;
the built-in guards read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, insert, select, update

from ..journal.db import utcnow
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


@dataclass(frozen=True, slots=True)
class BackfillProgress:
    """Where the last `backfill` of a migration got to: the last key copied and whether it ended."""

    migration: str
    cursor: str | None
    copied: int
    done: bool
    started_at: datetime
    updated_at: datetime


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
    return int(key[0])


def latest_validation(store: Journal, migration: str) -> ValidationRun | None:
    """The most recent validation run of `migration`, if any."""
    found = validation_runs(store, migration, limit=1)
    return found[0] if found else None


def validation_runs(store: Journal, migration: str, *, limit: int | None = None) -> list[ValidationRun]:
    """The validation runs of `migration`, newest first (at most `limit`)."""
    query = (
        select(validation_runs_table)
        .where(validation_runs_table.c.migration == migration)
        .order_by(validation_runs_table.c.id.desc())
    )
    if limit is not None:
        query = query.limit(limit)
    with store.transaction(readonly=True) as conn:
        rows = conn.execute(query).mappings().all()
    return [
        ValidationRun(
            id=row["id"],
            migration=row["migration"],
            phase=row["phase"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            ok=bool(row["ok"]),
            summary=dict(row["summary"]),
        )
        for row in rows
    ]


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
    return BackfillProgress(
        migration=row["migration"],
        cursor=row["cursor"],
        copied=int(row["copied"]),
        done=bool(row["done"]),
        started_at=row["started_at"],
        updated_at=row["updated_at"],
    )


def start_backfill(store: Journal, migration: str) -> BackfillProgress:
    """Record a fresh backfill of `migration` (replacing any earlier one)."""
    now = utcnow()
    values = {"cursor": None, "copied": 0, "done": False, "started_at": now, "updated_at": now}
    with store.transaction() as conn:
        updated = conn.execute(
            update(backfill_table).where(backfill_table.c.migration == migration).values(**values)
        ).rowcount
        if updated == 0:
            conn.execute(insert(backfill_table).values(migration=migration, **values))
    return BackfillProgress(migration, None, 0, False, now, now)


#: The checkpoint's UPDATE, built once: a backfill saves one per batch.
_SAVE_BACKFILL = (
    update(backfill_table)
    .where(backfill_table.c.migration == bindparam("mfsm_migration"))
    .values(
        cursor=bindparam("mfsm_cursor"),
        copied=bindparam("mfsm_copied"),
        done=bindparam("mfsm_done"),
        updated_at=bindparam("mfsm_updated_at"),
    )
)


def save_backfill(
    store: Journal, migration: str, *, cursor: str | None, copied: int, done: bool = False
) -> None:
    """Move the backfill checkpoint of `migration` to `cursor` (the last key copied)."""
    now = utcnow()
    with store.transaction() as conn:
        updated = conn.execute(
            _SAVE_BACKFILL,
            {
                "mfsm_migration": migration,
                "mfsm_cursor": cursor,
                "mfsm_copied": copied,
                "mfsm_done": done,
                "mfsm_updated_at": now,
            },
        ).rowcount
        if updated == 0:
            values = {"cursor": cursor, "copied": copied, "done": done, "updated_at": now}
            conn.execute(insert(backfill_table).values(migration=migration, started_at=now, **values))


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
