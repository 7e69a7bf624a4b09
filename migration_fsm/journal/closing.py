"""What closing a transition writes, decided from what it read: no I/O here.

`Lease._close` (commit or abort) reads the migration row, the transition's journal row and its
steps, then writes the migration row, the journal row (closed, its hash chained), the event
and, on PostgreSQL, the NOTIFY. `decide_close` computes all of that from the rows read; the
writers are the SQLAlchemy one (`Lease._close_in_transaction`, every database) and the
psycopg one (`pgpath.close`, one statement after the read).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..fsm import EntryStatus
from .chain import chain_hash
from .outbox import event_of
from .records import JournalEntry, MigrationState, entry_from_row, replace

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime


@dataclass(frozen=True, slots=True)
class Closing:
    """The rows a close writes: the migration as it leaves it (`after`), the closed journal row
    (`entry`, hashed as `digest`), its event, and the NOTIFY payload (None: no NOTIFY)."""

    after: MigrationState
    entry: JournalEntry
    digest: str
    event: dict[str, Any]
    notify: str | None

    def journal_values(self) -> dict[str, Any]:
        """The journal row's columns the close sets."""
        entry = self.entry
        return {
            "status": str(entry.status),
            "finished_at": entry.finished_at,
            "prev_hash": entry.prev_hash,
            "hash": self.digest,
            "error": entry.error,
            "takeovers": entry.takeovers,
            "actor": entry.actor,
            "reason": entry.reason,
        }

    def migration_values(self) -> dict[str, Any]:
        """The migration row's columns the close sets."""
        after = self.after
        return {
            "phase": after.phase.value,
            "percent": after.percent,
            "version": after.version,
            "phase_entered_at": after.phase_entered_at,
            "in_progress_seq": None,
            "lease_holder": None,
            "lease_expires_at": None,
            "head_hash": self.digest,
            "updated_at": after.updated_at,
            "paused_side": None,
        }


def decide_close(
    current: MigrationState,
    row: Any,
    steps: Sequence[dict[str, Any]],
    status: EntryStatus,
    *,
    holder: str,
    now: datetime,
    actor: str | None,
    reason: str | None,
) -> Closing:
    """Close the transition of journal row `row` (with `steps`) of migration `current` as
    `status`: chain its hash, release the lease; a commit moves phase, percent and version,
    an abort lifts a pause (one more version, journaled on the row)."""
    from .lease import signal_record  # the pause/lift record; lease imports this module

    entry = entry_from_row(row, [])
    lifted = status != EntryStatus.COMMITTED and current.paused_side is not None
    if lifted:  # an abort lifts the pause: one more version, journaled on this row
        entry = replace(
            entry,
            takeovers=[*entry.takeovers, signal_record("lift", None, current.version + 1, holder, now)],
        )
    if actor is not None:
        entry = replace(entry, actor=actor)
    if reason is not None:
        entry = replace(entry, reason=reason)
    entry = replace(
        entry,
        status=status,
        finished_at=now,
        prev_hash=current.head_hash,
        error=None if status == EntryStatus.COMMITTED else row["error"],
    )
    digest = chain_hash(current.head_hash, current.name, entry)
    after = replace(
        current,
        in_progress_seq=None,
        lease_holder=None,
        lease_expires_at=None,
        head_hash=digest,
        updated_at=now,
        paused_side=None,
        version=current.version + 1 if lifted else current.version,
    )
    if status == EntryStatus.COMMITTED:
        after = replace(
            after,
            phase=entry.dest,
            percent=entry.percent,
            version=current.version + 1,
            phase_entered_at=now if entry.dest is not current.phase else current.phase_entered_at,
        )
    kind = "committed" if status == EntryStatus.COMMITTED else "aborted"
    event = event_of(kind, after, entry, steps, now, lifted=lifted)
    notify = notify_payload(after) if status == EntryStatus.COMMITTED or lifted else None
    return Closing(after, replace(entry, hash=digest), digest, event, notify)


def notify_payload(after: MigrationState) -> str:
    """The NOTIFY payload of a new state (PostgreSQL): what PhaseClients and WorkerGates apply."""
    return json.dumps(
        {
            "migration": after.name,
            "phase": after.phase.value,
            "percent": after.percent,
            "version": after.version,
            "paused": after.paused_side,
        }
    )
