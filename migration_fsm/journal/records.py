"""The journal's records as Python values, and their conversion from and to rows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import select

from ..fsm import Phase, Trigger
from .db import utcnow
from .schema import migrations_table

if TYPE_CHECKING:
    from sqlalchemy import Connection

_Record = TypeVar("_Record", "JournalEntry", "MigrationState")


@dataclass(frozen=True, slots=True)
class MigrationState:
    """One row of `mfsm_migrations`: where a migration stands."""

    id: int
    name: str
    phase: Phase
    percent: int
    version: int
    last_seq: int
    head_hash: str | None
    in_progress_seq: int | None
    lease_holder: str | None
    lease_expires_at: datetime | None
    phase_entered_at: datetime
    created_at: datetime
    updated_at: datetime
    #: The side whose consumers the transition in progress has paused (`Lease.pause`), or None.
    paused_side: str | None = None

    def lease_live(self, now: datetime | None = None) -> bool:
        """Whether someone holds an unexpired lease."""
        return (
            self.lease_holder is not None
            and self.lease_expires_at is not None
            and self.lease_expires_at > (now or utcnow())
        )


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step of one transition, as recorded."""

    position: int
    name: str
    undo: str | None
    status: str  # pending, started, done, failed, undone
    attempts: int
    checkpoint: dict[str, Any] | None
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journal row: a transition's intent and outcome."""

    seq: int
    trigger: Trigger
    source: Phase | None
    dest: Phase
    percent: int
    status: str  # intent, committed, refused, aborted
    actor: str
    reason: str | None
    forced: bool
    guards: list[dict[str, Any]]
    takeovers: list[dict[str, Any]]
    started_at: datetime
    finished_at: datetime | None
    host: str
    pid: int
    error: str | None
    prev_hash: str | None
    hash: str | None
    steps: list[StepRecord] = field(default_factory=list)

    def chained_fields(self, migration: str) -> dict[str, Any]:
        """The fields the hash covers."""
        return {
            "migration": migration,
            "seq": self.seq,
            "trigger": str(self.trigger),
            "source": None if self.source is None else str(self.source),
            "dest": str(self.dest),
            "percent": self.percent,
            "status": self.status,
            "actor": self.actor,
            "reason": self.reason,
            "forced": self.forced,
            "guards": self.guards,
            "takeovers": self.takeovers,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "host": self.host,
            "pid": self.pid,
            "error": self.error,
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="microseconds")


def replace(record: _Record, **changes: Any) -> _Record:
    """A copy of a record with some fields changed."""
    return dataclasses.replace(record, **changes)


def entry_values(entry: JournalEntry) -> dict[str, Any]:
    """The column values of a journal row (all but `migration_id` and `hash`)."""
    return {
        "seq": entry.seq,
        "trigger": entry.trigger.value,
        "source": None if entry.source is None else entry.source.value,
        "dest": entry.dest.value,
        "percent": entry.percent,
        "status": entry.status,
        "actor": entry.actor,
        "reason": entry.reason,
        "forced": entry.forced,
        "guards": entry.guards,
        "takeovers": entry.takeovers,
        "started_at": entry.started_at,
        "finished_at": entry.finished_at,
        "host": entry.host,
        "pid": entry.pid,
        "error": entry.error,
        "prev_hash": entry.prev_hash,
    }


def migration_from_row(row: Any) -> MigrationState:
    return MigrationState(
        id=row["id"],
        name=row["name"],
        phase=Phase(row["phase"]),
        percent=row["percent"],
        version=row["version"],
        last_seq=row["last_seq"],
        head_hash=row["head_hash"],
        in_progress_seq=row["in_progress_seq"],
        lease_holder=row["lease_holder"],
        lease_expires_at=row["lease_expires_at"],
        phase_entered_at=row["phase_entered_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        paused_side=row.get("paused_side"),
    )


def step_from_row(row: Any) -> StepRecord:
    return StepRecord(
        position=row["position"],
        name=row["name"],
        undo=row["undo"],
        status=row["status"],
        attempts=row["attempts"],
        checkpoint=row["checkpoint"],
        error=row["error"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


def entry_from_row(row: Any, steps: list[StepRecord]) -> JournalEntry:
    return JournalEntry(
        seq=row["seq"],
        trigger=Trigger(row["trigger"]),
        source=None if row["source"] is None else Phase(row["source"]),
        dest=Phase(row["dest"]),
        percent=row["percent"],
        status=row["status"],
        actor=row["actor"],
        reason=row["reason"],
        forced=bool(row["forced"]),
        guards=list(row["guards"] or []),
        takeovers=list(row["takeovers"] or []),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        host=row["host"],
        pid=row["pid"],
        error=row["error"],
        prev_hash=row["prev_hash"],
        hash=row["hash"],
        steps=steps,
    )


#: The journal row's `takeovers` entries whose `command` bumped the migration's `version`
#: without a commit: a pause published by a step, and its lift (`Lease.pause`, `Lease.lift`,
#: or `abort`). `verify` counts them: version = committed rows + these.
VERSION_BUMPS = frozenset({"pause", "lift"})


def version_bumps(entry: JournalEntry) -> int:
    """How many times the transition of `entry` bumped the version besides its commit."""
    return sum(1 for takeover in entry.takeovers if takeover.get("command") in VERSION_BUMPS)


def read_migration(conn: Connection, migration_id: int) -> MigrationState:
    """The migration row `migration_id`, read inside the caller's transaction."""
    row = conn.execute(select(migrations_table).where(migrations_table.c.id == migration_id)).mappings().one()
    return migration_from_row(row)
