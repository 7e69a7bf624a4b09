"""The transactional outbox: every journal change writes its event, in the same transaction,
to `mfsm_events`; `[[notify]]` targets read them in order (`plugins/notify.py`).

Each write of the journal calls `emit` or `emit_known` inside that write's transaction,
after its changes: `Journal.create`, `append_refused`, `claim` and `take_over`, and the
`Lease`'s steps, pauses, lifts and closes. The event says what the transaction leaves (read
back by `emit`; from what the caller holds, for the claim, the commit and a refusal, by
`emit_known`: one INSERT on a transition's hot path), and a crash before the commit leaves
neither. On PostgreSQL the row of the migration is locked before the event is inserted (each
of those writes changes it first; `emit` takes `FOR UPDATE` for a step's), so the ids of one
migration's events grow in commit order: a target that has received event N never has an
event < N still to come.

The event's shape is schema version 1 (docs/OBSERVABILITY.md): keys may be added, never
changed or removed; a new kind of event (watch verdicts, approvals) is a new `event` value.
`watch` writes `watch_verdict` and `watch_alert` events with no journal row (`seq` null).
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import func, insert, select, update

from ..fsm import routing_for
from .db import redact, redact_text, utcnow
from .records import JournalEntry, MigrationState, StepRecord, migration_from_row
from .schema import events_table, journal_table, migrations_table, notify_targets_table, steps_table
from .workers import upsert

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from datetime import datetime

    from sqlalchemy import Connection

#: The version of the event's JSON shape (its `schema` key).
EVENT_SCHEMA: Final = 1

#: Every kind of event the journal writes, in the order a transition usually writes them.
#: `before` is not here: it is sent to veto commands before the claim and never stored.
EVENT_KINDS: Final = (
    "init",
    "refused",
    "approved",
    "claimed",
    "takeover",
    "pause",
    "lift",
    "workers_gone",
    "step_done",
    "step_failed",
    "step_undone",
    "committed",
    "aborted",
    "held",
    "released",
    "watch_verdict",
    "watch_alert",
)
#: The kinds `watch` writes every interval: a target receives them only when its `events`
#: names them (a chat channel is not told every verdict of a 24-hour soak).
FREQUENT_KINDS: Final = ("watch_verdict",)
BEFORE: Final = "before"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="microseconds")


def state_fields(phase: str, percent: int, version: int, paused: str | None) -> dict[str, Any]:
    """The `state` object of an event: where the migration stands after it."""
    from ..fsm import Phase

    return {
        "phase": phase,
        "percent": percent,
        "version": version,
        "paused": paused,
        "routing": routing_for(Phase(phase), percent).as_dict(),
    }


def emit(
    conn: Connection,
    migration_id: int,
    kind: str,
    seq: int | None,
    *,
    step: int | None = None,
    **extra: Any,
) -> None:
    """Write one event of kind `kind` about journal row `seq` (and its step at position
    `step`) of migration `migration_id`, inside the caller's transaction, reading the rows as
    the transaction leaves them; `extra` keys are added to the event as they are (JSON
    values). On PostgreSQL the migration row is locked first (see the module's docstring)."""
    m, j, _s = migrations_table.c, journal_table.c, steps_table.c
    query = select(migrations_table).where(m.id == migration_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    state = migration_from_row(conn.execute(query).mappings().one())
    row: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = []
    if seq is not None:
        found = conn.execute(select(journal_table).where(j.migration_id == migration_id, j.seq == seq))
        row = dict(found.mappings().one())
        steps = _steps(conn, migration_id, seq)
    emit_known(conn, kind, state, row, steps, step=step, **extra)


def _steps(conn: Connection, migration_id: int, seq: int) -> list[dict[str, Any]]:
    s = steps_table.c
    rows = conn.execute(
        select(s.name, s.status, s.attempts, s.error)
        .where(s.migration_id == migration_id, s.seq == seq)
        .order_by(s.position)
    ).mappings()
    return [dict(r) for r in rows]


def emit_known(
    conn: Connection,
    kind: str,
    state: MigrationState,
    row: JournalEntry | dict[str, Any] | None,
    steps: Sequence[StepRecord | dict[str, Any]] | None,
    *,
    step: int | None = None,
    **extra: Any,
) -> None:
    """`emit` from what the caller holds already: the migration as its transaction leaves it
    (`state`, whose row the transaction has changed, so it holds the row's lock), the journal
    row (`row`) and its steps (`steps`; None: read them). One `INSERT` on the hot path of a
    transition (the claim, the commit, a refusal)."""
    if row is not None and steps is None:
        seq = row["seq"] if isinstance(row, dict) else row.seq
        steps = _steps(conn, state.id, seq)
    now = utcnow()
    event = event_of(kind, state, row, steps or [], now, step=step, **extra)
    conn.execute(
        insert(events_table).values(
            migration=state.name, seq=event["seq"], kind=kind, created_at=now, event=event
        )
    )


def event_of(
    kind: str,
    state: MigrationState,
    row: JournalEntry | dict[str, Any] | None,
    steps: Sequence[StepRecord | dict[str, Any]],
    now: datetime,
    *,
    step: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The event of kind `kind` (schema 1) about journal row `row` and its `steps`, with
    the migration as `state` (what its transaction leaves): built in Python, no I/O, so a
    caller can write it in the same statement as the change it reports."""
    event: dict[str, Any] = {
        "schema": EVENT_SCHEMA,
        "event": kind,
        "migration": state.name,
        "seq": None,
        "at": _iso(now),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    if row is not None:
        fields = row if isinstance(row, dict) else _entry_fields(row)
        event["seq"] = fields["seq"]
        event.update(_row_fields(fields, [_step_fields(x) for x in steps], step))
    event.update(extra)
    event["state"] = state_fields(state.phase.value, state.percent, state.version, state.paused_side)
    return event


def _entry_fields(entry: JournalEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "trigger": str(entry.trigger),
        "source": None if entry.source is None else str(entry.source),
        "dest": str(entry.dest),
        "status": str(entry.status),
        "actor": entry.actor,
        "reason": entry.reason,
        "forced": entry.forced,
        "error": entry.error,
        "guards": entry.guards,
    }


def _step_fields(step: StepRecord | dict[str, Any]) -> dict[str, Any]:
    if isinstance(step, dict):
        return {k: step[k] for k in ("name", "status", "attempts", "error")}
    return {"name": step.name, "status": str(step.status), "attempts": step.attempts, "error": step.error}


def _row_fields(row: dict[str, Any], steps: list[dict[str, Any]], position: int | None) -> dict[str, Any]:
    """What an event says about its journal row: the edge, who and why, the guards and steps."""
    listed = [{**st, "error": redact(st["error"])} for st in steps]
    fields: dict[str, Any] = {
        "trigger": str(row["trigger"]),
        "edge": f"{row['source']}->{row['dest']}" if row["source"] else None,
        "source": None if row["source"] is None else str(row["source"]),
        "dest": str(row["dest"]),
        "status": str(row["status"]),
        "actor": row["actor"],
        "reason": redact(row["reason"]),
        "forced": bool(row["forced"]),
        "error": redact(row["error"]),
        "guards": [
            {
                "name": g.get("name"),
                "passed": g.get("passed"),
                "detail": redact_text(g["detail"]) if isinstance(g.get("detail"), str) else g.get("detail"),
            }
            for g in row["guards"] or []
        ],
        "steps": listed,
    }
    if position is not None:
        fields["step"] = {"position": position, **listed[position]}
    return fields


# -- reads and delivery state ------------------------------------------------------------------


def last_event_id(conn: Connection, migration: str) -> int:
    """The id of the migration's newest event (0 when it has none)."""
    e = events_table.c
    return int(conn.execute(select(func.max(e.id)).where(e.migration == migration)).scalar() or 0)


def register_targets(conn: Connection, migration: str, targets: Iterable[str]) -> None:
    """Give each target that has no delivery state for `migration` one that starts after the
    newest event: a target added to the config receives what happens from now on, not the
    migration's past."""
    names = list(targets)
    if not names:
        return
    t = notify_targets_table.c
    known = set(conn.execute(select(t.target).where(t.migration == migration, t.target.in_(names))).scalars())
    fresh = [name for name in names if name not in known]
    if not fresh:
        return
    start = last_event_id(conn, migration)
    stmt = upsert(conn, notify_targets_table).values(
        [{"migration": migration, "target": name, "cursor": start, "failures": 0} for name in fresh]
    )
    conn.execute(stmt.on_conflict_do_nothing(index_elements=[t.migration, t.target]))


def target_states(conn: Connection, migration: str) -> dict[str, dict[str, Any]]:
    """Each registered target's delivery state for `migration`, by name."""
    t = notify_targets_table.c
    rows = conn.execute(select(notify_targets_table).where(t.migration == migration)).mappings().all()
    return {row["target"]: dict(row) for row in rows}


def pending_events(
    conn: Connection, migration: str, after: int, kinds: Sequence[str] | None, limit: int
) -> list[dict[str, Any]]:
    """Up to `limit` events of `migration` after id `after`, oldest first, each with its `id`;
    with `kinds`, only those kinds."""
    e = events_table.c
    query = select(e.id, e.event).where(e.migration == migration, e.id > after)
    if kinds is not None:
        query = query.where(e.kind.in_(list(kinds)))
    rows = conn.execute(query.order_by(e.id).limit(limit)).all()
    return [{**row.event, "id": row.id} for row in rows]


def pending_count(conn: Connection, migration: str, after: int, kinds: Sequence[str] | None) -> int:
    """How many events of `migration` after id `after` (of `kinds`, when given) wait."""
    e = events_table.c
    query = select(func.count()).select_from(events_table).where(e.migration == migration, e.id > after)
    if kinds is not None:
        query = query.where(e.kind.in_(list(kinds)))
    return int(conn.execute(query).scalar() or 0)


def record_delivered(conn: Connection, migration: str, target: str, cursor: int) -> None:
    """Move the target's cursor forward to `cursor` (never back) and clear its failures."""
    t = notify_targets_table.c
    now = utcnow()
    conn.execute(
        update(notify_targets_table)
        .where(t.migration == migration, t.target == target, t.cursor < cursor)
        .values(cursor=cursor, failures=0, last_error=None, last_attempt_at=now, last_delivered_at=now)
    )


def record_failure(conn: Connection, migration: str, target: str, error: str) -> None:
    """Count one more failed delivery to the target, with why."""
    t = notify_targets_table.c
    conn.execute(
        update(notify_targets_table)
        .where(t.migration == migration, t.target == target)
        .values(failures=t.failures + 1, last_error=redact_text(error)[:1000], last_attempt_at=utcnow())
    )


def watch_verdict_counts(conn: Connection, migration: str) -> dict[tuple[str, str], int]:
    """How many `watch_verdict` events of `migration` there are, by (guard, outcome): counted
    by the database (`serve`'s `mfsm_watch_verdicts_total`)."""
    e = events_table.c
    guard = e.event["guard"].as_string()
    outcome = e.event["outcome"].as_string()
    rows = conn.execute(
        select(guard, outcome, func.count())
        .where(e.migration == migration, e.kind == "watch_verdict")
        .group_by(guard, outcome)
    ).all()
    return {(str(g), str(o)): int(n) for g, o, n in rows}
