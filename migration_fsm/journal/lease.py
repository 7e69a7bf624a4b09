"""The `Lease` on an interrupted transition, and the errors that name who holds it.

`Journal.claim` and `Journal.take_over` return a `Lease`. Each of its methods is one
compare-and-set: a statement whose `WHERE` requires that the migration row still has our
transition in progress (`in_progress_seq = :seq`) and our name as the holder
(`lease_holder = :me`), checked by its rowcount. A method that changes several rows first
updates the migration row under that condition, in the same transaction, and its rowcount
decides. Nothing reads the holder and then writes.

`pause` and `lift` publish and withdraw the pause of one side's consumers (DESIGN.md
section 10) while the transition is in progress. Each is one compare-and-set on the
migration row that also bumps `version`, so `PhaseClient`s and `WorkerGate`s see it like a
committed transition (by poll, and on PostgreSQL by NOTIFY), and each is journaled as a
`takeovers` entry of the transition's row (`{"command": "pause" | "lift", "side", "version",
...}`), which the row's hash covers once it is closed; `verify` counts those entries, so
"version = committed rows + pauses and lifts" still holds. The lease's own compare-and-set
is on `in_progress_seq` and `lease_holder`, never on `version`, so a pause published inside
a step does not disturb the commit. The commit clears the pause (consumption resumes on the
receiving side with the new phase, in the same version bump); `abort` lifts it (one more
version, journaled on the aborted row).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import and_, exists, insert, select, text, update

from ..exceptions import ConcurrentChange, Conflict, LeaseHeld, TransitionInterrupted
from ..fsm import EntryStatus, StepStatus
from . import pgpath
from .closing import decide_close, notify_payload
from .db import redact, utcnow
from .outbox import emit
from .records import MigrationState, migration_from_row, read_migration
from .schema import NOTIFY_CHANNEL, events_table, journal_table, migrations_table, steps_table

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy import ColumnElement, Connection, Select

    from .journal import Journal

#: Step statuses that end a step (they set `finished_at`).
FINISHED: Final = frozenset({StepStatus.DONE, StepStatus.FAILED, StepStatus.UNDONE})
#: The event each of them writes (`journal/outbox.py`).
_STEP_EVENTS: Final[dict[str, str]] = {
    StepStatus.DONE: "step_done",
    StepStatus.FAILED: "step_failed",
    StepStatus.UNDONE: "step_undone",
}


@dataclass(frozen=True, slots=True)
class Lease:
    """Our hold on transition `seq` of migration `migration_id`, as `holder`."""

    journal: Journal
    migration_id: int
    seq: int
    holder: str
    lease_seconds: float

    def _ours(self) -> ColumnElement[bool]:
        """The compare-and-set condition on the migration row."""
        m = migrations_table.c
        return (m.id == self.migration_id) & (m.in_progress_seq == self.seq) & (m.lease_holder == self.holder)

    def _lost(self, conn: Connection) -> LeaseHeld:
        return lease_lost(read_migration(conn, self.migration_id), self.seq)

    def lost(self) -> LeaseHeld:
        """The error saying this lease is no longer ours (read in a transaction of its own)."""
        with self.journal.transaction(readonly=True) as conn:
            return self._lost(conn)

    def heartbeat(self) -> bool:
        """Renew the lease for `lease_seconds` from now; False when it is no longer ours."""
        now = utcnow()
        with self.journal.transaction() as conn:
            return (
                conn.execute(
                    update(migrations_table)
                    .where(self._ours())
                    .values(lease_expires_at=now + timedelta(seconds=self.lease_seconds))
                ).rowcount
                == 1
            )

    def _update_step(
        self, position: int, values: dict[str, Any], event: str | None = None, **extra: Any
    ) -> None:
        s = steps_table.c
        with self.journal.transaction() as conn:
            updated = conn.execute(
                update(steps_table)
                .where(
                    s.migration_id == self.migration_id,
                    s.seq == self.seq,
                    s.position == position,
                    exists().where(self._ours()),
                )
                .values(**values)
            ).rowcount
            if updated != 1:
                raise self._lost(conn)
            if event is not None:
                emit(conn, self.migration_id, event, self.seq, step=position, **extra)

    def start_step(self, position: int) -> None:
        """Mark step `position` `started`, count an attempt and clear its last error."""
        now = utcnow()
        self._update_step(
            position,
            {
                "status": StepStatus.STARTED,
                "error": None,
                "attempts": steps_table.c.attempts + 1,
                "started_at": now,
                "finished_at": None,
            },
        )

    def mark_step(
        self, position: int, status: str, error: str | None = None, *, undo_failed: bool = False
    ) -> None:
        """Record step `position`'s new `status` (and `error`); `done`, `failed` and `undone`
        also set its `finished_at`. The event written with it is `step_done`, `step_failed`
        or `step_undone` (`step_failed` with `"undo": true` when `undo_failed`: the undo of a
        done step raised, the step stays `done`)."""
        values: dict[str, Any] = {"status": status, "error": redact(error)}
        if status in FINISHED:
            values["finished_at"] = utcnow()
        if undo_failed:
            self._update_step(position, values, "step_failed", undo=True)
        else:
            self._update_step(position, values, _STEP_EVENTS.get(status))

    def save_checkpoint(self, position: int, checkpoint: dict[str, Any]) -> None:
        """Journal step `position`'s checkpoint (a plain JSON object)."""
        self._update_step(position, {"checkpoint": checkpoint})

    def workers_gone(self, position: int, checkpoint: dict[str, Any], side: str, workers: list[str]) -> None:
        """Journal step `position`'s checkpoint naming the `workers` of `side` found gone, with
        the `workers_gone` event."""
        self._update_step(position, {"checkpoint": checkpoint}, "workers_gone", side=side, workers=workers)

    def pause(self, side: str) -> int:
        """Publish the pause of `side`'s consumers; returns the version every live worker of
        that side must acknowledge. Idempotent: when `side` is already paused (a step run
        again by `resume`) nothing changes and the current version is returned."""
        if side not in ("old", "new"):
            raise ValueError(f"side must be 'old' or 'new', not {side!r}")
        return self._signal("pause", side)

    def lift(self) -> int:
        """Withdraw the pause published by this transition (if any); returns the version."""
        return self._signal("lift", None)

    def _signal(self, command: str, side: str | None) -> int:
        m = migrations_table.c
        now = utcnow()
        with self.journal.transaction() as conn:
            change = m.paused_side.is_(None) | (m.paused_side != side) if side else m.paused_side.isnot(None)
            row = (
                conn.execute(
                    update(migrations_table)
                    .where(self._ours(), change)
                    .values(paused_side=side, version=m.version + 1, updated_at=now)
                    .returning(*migrations_table.c)
                )
                .mappings()
                .first()
            )
            if row is None:  # not ours any more, or nothing to change
                current = read_migration(conn, self.migration_id)
                if current.in_progress_seq != self.seq or current.lease_holder != self.holder:
                    raise lease_lost(current, self.seq)
                return current.version
            after = migration_from_row(row)
            self._journal_signal(conn, command, side, after.version, now)
            emit(conn, self.migration_id, command, self.seq, side=side)
            _notify(self.journal, conn, after)
            return after.version

    def _journal_signal(
        self, conn: Connection, command: str, side: str | None, version: int, now: datetime
    ) -> None:
        """Append the pause or lift to the transition's `takeovers` (under the row lock the
        compare-and-set on the migration row took)."""
        j = journal_table.c
        where = (j.migration_id == self.migration_id) & (j.seq == self.seq)
        takeovers = conn.execute(select(j.takeovers).where(where)).scalar_one()
        conn.execute(
            update(journal_table)
            .where(where)
            .values(takeovers=[*(takeovers or []), signal_record(command, side, version, self.holder, now)])
        )

    def release(self, error: str) -> None:
        """After a failed step: release the lease and record `error` on the journal row,
        which stays `intent` (the transition is interrupted)."""
        with self.journal.transaction() as conn:
            updated = conn.execute(
                update(migrations_table)
                .where(self._ours())
                .values(lease_holder=None, lease_expires_at=None, updated_at=utcnow())
            ).rowcount
            if updated != 1:
                raise self._lost(conn)
            conn.execute(
                update(journal_table)
                .where(journal_table.c.migration_id == self.migration_id, journal_table.c.seq == self.seq)
                .values(error=redact(error))
            )

    def commit(self) -> MigrationState:
        """Close the transition as `committed`: phase, percent and version move."""
        return self._close(EntryStatus.COMMITTED)

    def abort(self, *, actor: str | None = None, reason: str | None = None) -> MigrationState:
        """Close the transition as `aborted`: phase, percent and version stay. With `actor`
        and `reason`, the row says who aborted it and why (`history` shows them); the
        abort's takeover record keeps who began the transition and why."""
        return self._close(EntryStatus.ABORTED, actor=actor, reason=reason)

    def _close(
        self, status: EntryStatus, *, actor: str | None = None, reason: str | None = None
    ) -> MigrationState:
        """Close the transition as `status`, chain its hash and release the lease: a
        compare-and-set on the migration row as the close read it (ours, at the version it
        read), in one transaction with the journal row, the event and the NOTIFY."""
        if pgpath.available(self.journal.engine):
            return pgpath.close(self, status, actor=actor, reason=reason)
        now = utcnow()
        with self.journal.transaction() as conn:
            query = closing_read(self.migration_id, self.seq, self.holder)
            if self.journal.dialect == "postgresql":  # SQLite's BEGIN IMMEDIATE holds the lock already
                query = query.with_for_update(of=migrations_table)
            rows = conn.execute(query).mappings().all()
            if not rows:
                raise self._lost(conn)
            current, row, steps = closing_rows(rows)
            done = decide_close(
                current, row, steps, status, holder=self.holder, now=now, actor=actor, reason=reason
            )
            conn.execute(
                update(migrations_table)
                .where(migrations_table.c.id == self.migration_id)
                .values(**done.migration_values())
            )
            conn.execute(
                update(journal_table)
                .where(journal_table.c.migration_id == self.migration_id, journal_table.c.seq == self.seq)
                .values(**done.journal_values())
            )
            conn.execute(
                insert(events_table).values(
                    migration=current.name,
                    seq=self.seq,
                    kind=done.event["event"],
                    created_at=now,
                    event=done.event,
                )
            )
            if done.notify is not None and self.journal.dialect == "postgresql":
                conn.execute(
                    text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": NOTIFY_CHANNEL, "payload": done.notify},
                )
            return done.after


def closing_read(migration_id: int, seq: int, holder: str) -> Select[Any]:
    """The migration row (while transition `seq` is ours), its journal row and its steps, in
    one query: one row per step (one with no step columns when it has none), steps in order."""
    m, j, s = migrations_table.c, journal_table.c, steps_table.c
    steps = and_(s.migration_id == m.id, s.seq == seq)
    return (
        select(
            *[c.label(f"m_{c.name}") for c in m],
            *[c.label(f"j_{c.name}") for c in j],
            *[s[name].label(f"s_{name}") for name in ("name", "status", "attempts", "error")],
        )
        .select_from(
            migrations_table.join(journal_table, and_(j.migration_id == m.id, j.seq == seq)).outerjoin(
                steps_table, steps
            )
        )
        .where(m.id == migration_id, m.in_progress_seq == seq, m.lease_holder == holder)
        .order_by(s.position)
    )


def closing_rows(rows: Sequence[Any]) -> tuple[MigrationState, dict[str, Any], list[dict[str, Any]]]:
    """(the migration, its journal row, its steps) from the rows of `closing_read`."""
    first = rows[0]
    current = migration_from_row({k[2:]: v for k, v in first.items() if k.startswith("m_")})
    row = {k[2:]: v for k, v in first.items() if k.startswith("j_")}
    steps = [
        {name: r[f"s_{name}"] for name in ("name", "status", "attempts", "error")}
        for r in rows
        if r["s_name"] is not None
    ]
    return current, row, steps


def signal_record(command: str, side: str | None, version: int, holder: str, now: datetime) -> dict[str, Any]:
    """The `takeovers` entry of a pause or lift."""
    record: dict[str, Any] = {
        "command": command,
        "actor": holder,
        "at": now.isoformat(timespec="microseconds"),
        "version": version,
    }
    if side is not None:
        record["side"] = side
    return record


def _notify(journal: Journal, conn: Connection, after: MigrationState) -> None:
    """On PostgreSQL, NOTIFY the new state (delivered at commit): PhaseClients and WorkerGates
    apply it without a query."""
    if journal.dialect != "postgresql":
        return
    payload = notify_payload(after)
    conn.execute(
        text("SELECT pg_notify(:channel, :payload)"), {"channel": NOTIFY_CHANNEL, "payload": payload}
    )


def conflict(now: MigrationState, seen: MigrationState) -> Conflict:
    """Why a compare-and-set against `seen` failed, given the row as it is `now`."""
    if now.in_progress_seq is not None and now.lease_live():
        return lease_held_error(now)
    if now.in_progress_seq is not None:
        return TransitionInterrupted(
            f"migration '{seen.name}' has an interrupted transition #{now.in_progress_seq}:"
            " run `migration-fsm resume` or `migration-fsm abort --reason TEXT`"
        )
    return ConcurrentChange(
        f"migration '{seen.name}' changed while this command ran (version {seen.version}"
        f" -> {now.version}, phase {now.phase}): run `migration-fsm status` and decide again"
    )


def lease_held_error(migration: MigrationState) -> LeaseHeld:
    """The exit-3 error naming the lease holder and when the lease expires."""
    expires = migration.lease_expires_at
    left = "" if expires is None else f" (in {max(0, round((expires - utcnow()).total_seconds()))} s)"
    return LeaseHeld(
        f"migration '{migration.name}' transition #{migration.in_progress_seq} is held by"
        f" {migration.lease_holder} until {_iso_short(expires)}{left}: wait for it, or if that"
        " operator is gone, run `migration-fsm resume --steal` (or `abort --reason TEXT` once"
        " the lease has expired)",
        holder=migration.lease_holder,
        expires_at=expires,
    )


def lease_lost(migration: MigrationState, seq: int) -> LeaseHeld:
    """The error of a command whose lease on transition `seq` is no longer its own: another
    operator holds it, or it was released (the transition waits for `resume` or `abort`), or
    the operator who took it over has already ended the transition."""
    lost = f"the lease on transition #{seq} of migration '{migration.name}'"
    if migration.lease_holder is not None:
        what = f"{lost} was taken over by {migration.lease_holder}"
    elif migration.in_progress_seq == seq:
        what = f"{lost} is no longer held (the transition waits for `resume` or `abort`)"
    else:
        what = f"{lost} was taken over, and the transition has ended since (see `migration-fsm history`)"
    return LeaseHeld(
        f"{what}: this command stops here",
        holder=migration.lease_holder,
        expires_at=migration.lease_expires_at,
    )


def _iso_short(value: datetime | None) -> str:
    return "?" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
