"""A transition on PostgreSQL in few round trips: the operator lock, the claim and the close.

Through SQLAlchemy every statement was a round trip, and every transaction two more (`BEGIN`,
`COMMIT`): an `advance` with no guard and no step was 24 round trips and 3 commits
(docs/PERFORMANCE.md lists them). With the psycopg 3 driver, on connections of the engine's
own pool, the same work is sent in psycopg's pipeline mode:

- **the operator lock** (`lock_and_read`): `BEGIN`, the try-lock and the read of the migration
  row (with whether a hold stands) in one round trip; the read is a statement of its own,
  after the lock, so it sees every change committed before the lock was granted. The
  transaction stays open, holding the lock, as before (`locks`);
- **the claim** (`claim`): `BEGIN`, one statement, `COMMIT` in one round trip. The statement is
  a data-modifying CTE: the compare-and-set of the migration row and, only when it matched,
  the intent row, the pending steps and the `claimed` event;
- **the close** (`close`, a commit or an abort): one read of the migration row, the journal
  row and its steps, then `BEGIN`, one CTE, `COMMIT`: the compare-and-set of the migration row
  as read (ours, at the version and `updated_at` read: every write of the transition's
  journal row or of its lease changes one of them in the same transaction), the closed journal
  row, the event and the NOTIFY. When the compare-and-set misses, the lease was lost
  (`LeaseHeld`, nothing written), or the close reads again.

The conditions are those of the SQLAlchemy path (`Journal.claim`, `Lease._close`); the row
lock the compare-and-set takes is taken before the event's id is drawn, so events still grow
in commit order (`outbox`). `COMMIT` goes through SQLAlchemy's `Connection.commit` (its
`commit` event fires before it is sent, as on every other path). Other drivers and SQLite use
the SQLAlchemy path. psycopg is imported only here and only when PostgreSQL is used.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.exc import DBAPIError

from ..exceptions import ConcurrentChange
from ..fsm import EntryStatus, StepStatus
from .closing import decide_close
from .db import utcnow
from .outbox import event_of
from .records import UNDECODABLE, JournalEntry, MigrationState, migration_from_row, read_migration
from .schema import NOTIFY_CHANNEL, journal_table, migrations_table

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy import Connection, Engine

    from .journal import Journal
    from .lease import Lease

#: How many times a close reads again when its compare-and-set missed with the lease still
#: ours (nothing else writes the row while a transition holds it: this is a safety net).
CLOSE_ATTEMPTS: Final = 3

_M: Final = [c.name for c in migrations_table.c]
_J: Final = [c.name for c in journal_table.c]
_MIGRATION_COLUMNS: Final = ", ".join(f'm."{c}"' for c in _M)

#: The migration row named %(name)s and whether a hold stands on it (`Journal._standing_hold`:
#: the newest held, released or phase-changing committed row is a `held` one).
READ_MIGRATION: Final = f"""
SELECT {_MIGRATION_COLUMNS},
  (SELECT j.status = 'held' FROM mfsm_journal j
    WHERE j.migration_id = m.id
      AND (j.status IN ('held', 'released')
           OR (j.status = 'committed' AND (j.source IS NULL OR j.source <> j.dest)))
    ORDER BY j.seq DESC LIMIT 1) AS held
FROM mfsm_migrations m WHERE m.name = %(name)s
"""  # noqa: S608 - built from the table's own column names; every value is bound

CLAIM: Final = """
WITH m AS (
  UPDATE mfsm_migrations SET last_seq = %(seq)s, in_progress_seq = %(seq)s,
    lease_holder = %(holder)s, lease_expires_at = %(expires)s, updated_at = %(now)s
  WHERE id = %(id)s AND version = %(version)s AND last_seq = %(last_seq)s AND in_progress_seq IS NULL
  RETURNING id
), j AS (
  INSERT INTO mfsm_journal (migration_id, seq, "trigger", source, dest, percent, status, actor,
    reason, forced, guards, takeovers, started_at, finished_at, host, pid, error, prev_hash)
  SELECT id, %(seq)s, %(trigger)s::varchar, %(source)s::varchar, %(dest)s::varchar,
    %(percent)s::integer, %(status)s::varchar, %(actor)s::varchar, %(reason)s::text,
    %(forced)s::boolean, %(guards)s::json, %(takeovers)s::json, %(started_at)s::timestamptz,
    %(finished_at)s::timestamptz, %(host)s::varchar, %(pid)s::integer, %(error)s::text,
    %(prev_hash)s::varchar
  FROM m
), s AS (
  INSERT INTO mfsm_steps (migration_id, seq, position, name, undo, status, attempts)
  SELECT m.id, %(seq)s, x.position, x.name, x.undo, %(pending)s::varchar, 0
  FROM m, json_to_recordset(%(steps)s::json) AS x(position integer, name text, undo text)
), e AS (
  INSERT INTO mfsm_events (migration, seq, kind, created_at, event)
  SELECT %(migration)s::varchar, %(seq)s, 'claimed', %(now)s::timestamptz, %(event)s::json FROM m
)
SELECT id FROM m
"""

CLOSE_READ: Final = f"""
SELECT {", ".join(f'm."{c}" AS "m_{c}"' for c in _M)},
  {", ".join(f'j."{c}" AS "j_{c}"' for c in _J)},
  s.name AS s_name, s.status AS s_status, s.attempts AS s_attempts, s.error AS s_error
FROM mfsm_migrations m
JOIN mfsm_journal j ON j.migration_id = m.id AND j.seq = %(seq)s
LEFT JOIN mfsm_steps s ON s.migration_id = m.id AND s.seq = %(seq)s
WHERE m.id = %(id)s AND m.in_progress_seq = %(seq)s AND m.lease_holder = %(holder)s
ORDER BY s.position
"""  # noqa: S608 - built from the table's own column names; every value is bound

_CLOSE_WRITE: Final = """
WITH m AS (
  UPDATE mfsm_migrations SET phase = %(phase)s, percent = %(percent)s, version = %(version)s,
    phase_entered_at = %(phase_entered_at)s, in_progress_seq = NULL, lease_holder = NULL,
    lease_expires_at = NULL, head_hash = %(digest)s, updated_at = %(now)s, paused_side = NULL
  WHERE id = %(id)s AND in_progress_seq = %(seq)s AND lease_holder = %(holder)s
    AND version = %(seen_version)s AND updated_at = %(seen_updated_at)s
  RETURNING id
), j AS (
  UPDATE mfsm_journal SET status = %(status)s, finished_at = %(now)s, prev_hash = %(prev_hash)s,
    hash = %(digest)s, error = %(error)s, takeovers = %(takeovers)s::json, actor = %(actor)s,
    reason = %(reason)s
  WHERE migration_id = %(id)s AND seq = %(seq)s AND EXISTS (SELECT FROM m)
), e AS (
  INSERT INTO mfsm_events (migration, seq, kind, created_at, event)
  SELECT %(migration)s::varchar, %(seq)s, %(kind)s::varchar, %(now)s::timestamptz, %(event)s::json
  FROM m
)
"""
CLOSE_WRITE: Final = _CLOSE_WRITE + "SELECT id FROM m"  # noqa: S608 - constants only
CLOSE_WRITE_NOTIFY: Final = _CLOSE_WRITE + "SELECT pg_notify(%(channel)s, %(payload)s) FROM m"  # noqa: S608


def available(engine: Engine) -> bool:
    """Whether `engine` takes this path: PostgreSQL through psycopg 3."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"


def _json(value: Any) -> Any:
    from psycopg.types.json import Json

    return Json(value)


def _utc(value: Any) -> Any:
    return value.astimezone(UTC) if isinstance(value, datetime) else value


def _rows(cursor: Any) -> list[dict[str, Any]]:
    """The rows of a psycopg cursor as dicts, timestamps in UTC (as `UTCDateTime` reads them)."""
    if cursor.description is None:
        return []
    names = [d.name for d in cursor.description]
    return [{n: _utc(v) for n, v in zip(names, row, strict=True)} for row in cursor.fetchall()]


def _results(cursor: Any) -> list[list[dict[str, Any]]]:
    """The rows of each statement a multi-statement `execute` ran, in order."""
    results = [_rows(cursor)]
    while cursor.nextset():
        results.append(_rows(cursor))
    return results


def lock_and_read(
    conn: Connection, lock_sql: str, values: dict[str, Any], name: str
) -> tuple[bool, MigrationState | None, bool | None]:
    """On `conn` (in AUTOCOMMIT, idle): `BEGIN`, the try-lock `lock_sql` and the read of
    migration `name`, in one message and one round trip; the transaction stays open (the lock
    with it). (got the lock, the migration or None, whether a hold stands or None if unknown)."""
    from psycopg import ClientCursor

    raw = conn.connection.driver_connection
    assert raw is not None
    with ClientCursor(raw) as cursor:
        cursor.execute(
            f"BEGIN ISOLATION LEVEL READ COMMITTED; {lock_sql}; {READ_MIGRATION}", {**values, "name": name}
        )
        _, locked, rows = _results(cursor)
    got = bool(next(iter(locked[0].values())))
    if not got or not rows:
        return got, None, None
    held = rows[0].pop("held")
    try:
        return got, migration_from_row(rows[0]), None if held is None else bool(held)
    except UNDECODABLE:  # `Journal.get` reads it again and says what is wrong
        return got, None, None


def _send(journal: Journal, sql: str, params: dict[str, Any], *, transaction: bool) -> list[dict[str, Any]]:
    """`sql` (one statement) on a connection of the engine's pool, in one message and one round
    trip: with `transaction`, as `BEGIN; sql; COMMIT` (SQLAlchemy's `commit` event fires just
    before the message is sent: nothing is committed if the process dies in it). The statement's
    rows. A driver error becomes ours and the connection is not reused."""
    import psycopg

    try:
        conn = journal.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    except DBAPIError as exc:
        raise journal.driver_error(exc) from exc
    try:
        raw = conn.connection.driver_connection
        assert raw is not None
        with psycopg.ClientCursor(raw) as cursor:
            if not transaction:
                cursor.execute(sql, params)
                return _rows(cursor)
            conn.begin().commit()  # the `commit` event; nothing is sent (nothing is in progress)
            cursor.execute(f"BEGIN; {sql}; COMMIT", params)
            _, rows, _ = _results(cursor)
            return rows
    except (DBAPIError, psycopg.Error) as exc:
        conn.invalidate()
        raise journal.driver_error(exc) from exc
    except BaseException:
        conn.invalidate()
        raise
    finally:
        conn.close()


def claim(
    journal: Journal,
    seen: MigrationState,
    entry: JournalEntry,
    steps: Sequence[tuple[str, str | None]],
    *,
    holder: str,
    lease_seconds: float,
    now: datetime,
) -> bool:
    """`Journal.claim`'s writes in one statement and one round trip; False (nothing written)
    when the compare-and-set on `seen` missed."""
    params = {
        "id": seen.id,
        "version": seen.version,
        "last_seq": seen.last_seq,
        "seq": entry.seq,
        "holder": holder,
        "expires": now + timedelta(seconds=lease_seconds),
        "now": now,
        "trigger": entry.trigger.value,
        "source": None if entry.source is None else entry.source.value,
        "dest": entry.dest.value,
        "percent": entry.percent,
        "status": entry.status,
        "actor": entry.actor,
        "reason": entry.reason,
        "forced": entry.forced,
        "guards": _json(entry.guards),
        "takeovers": _json(entry.takeovers),
        "started_at": entry.started_at,
        "finished_at": entry.finished_at,
        "host": entry.host,
        "pid": entry.pid,
        "error": entry.error,
        "prev_hash": entry.prev_hash,
        "pending": StepStatus.PENDING.value,
        "steps": _json([{"position": p, "name": n, "undo": u} for p, (n, u) in enumerate(steps)]),
        "migration": seen.name,
        "event": _json(event_of("claimed", seen, entry, entry.steps, now)),
    }
    return bool(_send(journal, CLAIM, params, transaction=True))


def close(lease: Lease, status: EntryStatus, *, actor: str | None, reason: str | None) -> MigrationState:
    """`Lease._close` in two round trips: the read, then the compare-and-set with the closed
    row, the event and the NOTIFY in one statement."""
    journal = lease.journal
    key = {"id": lease.migration_id, "seq": lease.seq, "holder": lease.holder}
    for _ in range(CLOSE_ATTEMPTS):
        rows = _send(journal, CLOSE_READ, key, transaction=False)
        if not rows:
            raise lease.lost()
        from .lease import closing_rows

        current, row, steps = closing_rows(rows)
        now = utcnow()
        done = decide_close(
            current, row, steps, status, holder=lease.holder, now=now, actor=actor, reason=reason
        )
        params = {
            **key,
            **done.migration_values(),
            **done.journal_values(),
            "takeovers": _json(done.entry.takeovers),
            "digest": done.digest,
            "now": now,
            "seen_version": current.version,
            "seen_updated_at": current.updated_at,
            "migration": current.name,
            "kind": done.event["event"],
            "event": _json(done.event),
            "channel": NOTIFY_CHANNEL,
            "payload": done.notify,
        }
        if _send(
            journal, CLOSE_WRITE if done.notify is None else CLOSE_WRITE_NOTIFY, params, transaction=True
        ):
            return done.after
    with journal.transaction(readonly=True) as conn:
        now_state = read_migration(conn, lease.migration_id)
    if now_state.in_progress_seq != lease.seq or now_state.lease_holder != lease.holder:
        raise lease.lost()
    raise ConcurrentChange(
        f"migration '{now_state.name}' changed {CLOSE_ATTEMPTS} times while transition #{lease.seq}"
        " was being closed: run `migration-fsm status`, then `resume`"
    )
