"""The journal's records as Python values, and their conversion from and to rows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import and_, or_, select

from ..exceptions import JournalCorrupt
from ..fsm import EntryStatus, Phase, StepStatus, Trigger
from .db import utcnow
from .schema import journal_table, migrations_table

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sqlalchemy import Column, ColumnElement, Connection, Select, Table

_Record = TypeVar("_Record", "JournalEntry", "MigrationState")
_Decoded = TypeVar("_Decoded")


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


#: What decoding a row that was altered outside migration-fsm raises: invalid JSON or a
#: malformed timestamp (ValueError, raised by the driver's result processing on SQLite), an
#: unknown trigger, phase or status (ValueError), a JSON value of the wrong shape (TypeError,
#: KeyError, AttributeError).
UNDECODABLE = (ValueError, TypeError, KeyError, AttributeError)


def undecodable(what: str, exc: BaseException) -> str:
    """`what does not decode (Type: first line)`."""
    lines = str(exc).strip().splitlines()
    return f"{what} does not decode ({type(exc).__name__}: {lines[0] if lines else ''})"


def _one_of(value: Any, allowed: type[EntryStatus] | type[StepStatus]) -> str:
    return allowed(value).value  # ValueError when it is not one of them


def _records(value: Any, field: str, keys: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A JSON list of objects (each with `keys`), or TypeError / KeyError naming `field`."""
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise TypeError(f"{field} is not a list of objects: {str(value)[:60]}")
    for item in value:
        missing = [key for key in keys if key not in item]
        if missing:
            raise KeyError(f"{field}: an entry has no {', '.join(missing)}")
    return list(value)


def decode_rows(
    conn: Connection,
    table: Table,
    *,
    where: Sequence[ColumnElement[bool]],
    keys: Sequence[Column[Any]],
    decode: Callable[[Any], _Decoded],
    label: Callable[[tuple[Any, ...]], str],
) -> tuple[list[_Decoded], list[str]]:
    """The rows of `table` matching `where`, ordered by `keys`, each decoded by `decode`, and
    the description of every row that does not decode (named by `label(keys)`). One query
    when every row decodes; row by row otherwise, so that every bad row is named."""
    query = select(table).where(*where).order_by(*keys)
    try:
        return [decode(row) for row in conn.execute(query).mappings()], []
    except UNDECODABLE:
        pass
    decoded: list[_Decoded] = []
    bad: list[str] = []
    for key in conn.execute(select(*keys).where(*where).order_by(*keys)).all():
        same = [column == value for column, value in zip(keys, key, strict=True)]
        try:
            decoded.append(decode(conn.execute(select(table).where(*where, *same)).mappings().one()))
        except UNDECODABLE as exc:
            bad.append(undecodable(label(tuple(key)), exc))
    return decoded, bad


def corrupt_rows(migration: str, bad: Sequence[str]) -> JournalCorrupt:
    """The exit-4 error naming every row of `migration` that does not decode."""
    return JournalCorrupt(
        f"journal of migration '{migration}' does not verify: {'; '.join(bad)}: altered outside"
        " migration-fsm; restore the database from a backup (`migration-fsm verify` names every"
        " such row)"
    )


def migration_from_row(row: Any) -> MigrationState:
    """A `mfsm_migrations` row (a bad phase raises ValueError: see `UNDECODABLE`)."""
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
    checkpoint = row["checkpoint"]
    if checkpoint is not None and not isinstance(checkpoint, dict):
        raise TypeError(f"checkpoint is not an object: {str(checkpoint)[:60]}")
    return StepRecord(
        position=row["position"],
        name=row["name"],
        undo=row["undo"],
        status=_one_of(row["status"], StepStatus),
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
        status=_one_of(row["status"], EntryStatus),
        actor=row["actor"],
        reason=row["reason"],
        forced=bool(row["forced"]),
        guards=_records(row["guards"] or [], "guards", ("name", "passed", "detail")),
        takeovers=_records(row["takeovers"] or [], "takeovers"),
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


def phase_entered_at(entries: Sequence[JournalEntry]) -> datetime | None:
    """When the current phase was entered, as the hash-chained journal says: the `finished_at`
    of the last committed row that changed the phase (`init` included). The migration row's
    `phase_entered_at` is outside the chain; `verify` and the guards that rely on it check it
    against this."""
    entered = None
    for entry in entries:
        if entry.status == EntryStatus.COMMITTED and entry.source is not entry.dest:
            entered = entry.finished_at
    return entered


def read_migration(conn: Connection, migration_id: int) -> MigrationState:
    """The migration row `migration_id`, read inside the caller's transaction."""
    row = conn.execute(select(migrations_table).where(migrations_table.c.id == migration_id)).mappings().one()
    return migration_from_row(row)


def read_with_hold(name: str) -> Select[Any]:
    """Migration `name` and `held`: whether a hold stands on it (as `Journal._standing_hold`
    decides it)."""
    m, j = migrations_table.c, journal_table.c
    changed_phase = and_(j.status == EntryStatus.COMMITTED.value, or_(j.source.is_(None), j.source != j.dest))
    newest = (
        select(j.status == EntryStatus.HELD.value)
        .where(
            j.migration_id == m.id,
            or_(j.status.in_([EntryStatus.HELD.value, EntryStatus.RELEASED.value]), changed_phase),
        )
        .order_by(j.seq.desc())
        .limit(1)
        .scalar_subquery()
    )
    return select(migrations_table, newest.label("held")).where(m.name == name)
