"""Every table and index of the migration database, as SQLAlchemy `Table` objects.

The Alembic revisions in `migrations/` create them (never `create_all`); `tests/unit/test_schema.py`
checks that these objects and the head revision agree, index for index.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    false,
)

from .db import UTCDateTime

metadata = MetaData()

migrations_table = Table(
    "mfsm_migrations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("phase", String(32), nullable=False),
    Column("percent", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_seq", Integer, nullable=False),
    Column("head_hash", String(64), nullable=True),
    Column("in_progress_seq", Integer, nullable=True),
    Column("lease_holder", String(400), nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("phase_entered_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # Revision 0004: the side whose consumers are paused by the transition in progress
    # (`Lease.pause`), or NULL. Publishing or lifting a pause bumps `version`.
    Column("paused_side", String(8), nullable=True),
)

journal_table = Table(
    "mfsm_journal",
    metadata,
    Column("migration_id", Integer, ForeignKey("mfsm_migrations.id"), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("source", String(32), nullable=True),
    Column("dest", String(32), nullable=False),
    Column("percent", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("reason", Text, nullable=True),
    Column("forced", Boolean, nullable=False),
    Column("guards", JSON, nullable=False),
    Column("takeovers", JSON, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("error", Text, nullable=True),
    Column("prev_hash", String(64), nullable=True),
    Column("hash", String(64), nullable=True),
    PrimaryKeyConstraint("migration_id", "seq"),
)

steps_table = Table(
    "mfsm_steps",
    metadata,
    Column("migration_id", Integer, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("position", Integer, nullable=False),
    Column("name", String(400), nullable=False),
    Column("undo", String(400), nullable=True),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("checkpoint", JSON, nullable=True),
    Column("error", Text, nullable=True),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    PrimaryKeyConstraint("migration_id", "seq", "position"),
)

#: Revision 0002: the dual-write repair log.
repair_log_table = Table(
    "mfsm_repair_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("migration", String(200), nullable=False),
    Column("key", String(400), nullable=False),
    Column("side", String(8), nullable=False),
    Column("error", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False),
    Column("resolved_at", UTCDateTime, nullable=True),
    Index("ix_mfsm_repair_log_open", "migration", "status", "id"),
)

#: Revision 0003: one row per `validate` run (the data tools' `runs` module reads and writes it).
validation_runs_table = Table(
    "mfsm_validation_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("migration", String(200), nullable=False),
    Column("phase", String(32), nullable=True),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=False),
    Column("ok", Boolean, nullable=False),
    Column("summary", JSON, nullable=False),
    # Revision 0007: `journal.chain.row_digest("validation_run", ...)`, checked by `verify`
    # and by `checksums_match` before it trusts the run.
    Column("digest", String(80), nullable=True),
    Index("ix_mfsm_validation_runs_latest", "migration", "id"),
)

#: Revision 0003: the progress of each migration's last backfill.
backfill_table = Table(
    "mfsm_backfill",
    metadata,
    Column("migration", String(200), primary_key=True),
    Column("cursor", Text, nullable=True),
    Column("copied", BigInteger, nullable=False),
    Column("done", Boolean, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # Revision 0007: `journal.chain.row_digest("backfill", ...)`, checked by `verify` and by
    # `backfill_complete` before it trusts the checkpoint.
    Column("digest", String(80), nullable=True),
)

#: Revision 0004: one row per worker (a `WorkerGate`) of each side: its registration, heartbeat
#: and the last routing version it has applied (`journal/workers.py`).
workers_table = Table(
    "mfsm_workers",
    metadata,
    Column("migration", String(200), nullable=False),
    Column("side", String(8), nullable=False),
    Column("worker_id", String(200), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("seen_version", Integer, nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
    # Revision 0005: the worker batches its finishes (its running claims are never taken over).
    Column("defers_finishes", Boolean, nullable=False, server_default=false()),
    PrimaryKeyConstraint("migration", "side", "worker_id"),
)

#: Revision 0004: the live claim of each key, across both sides (`journal/ledger.py` says why
#: it is a table of its own rather than a partial unique index on `mfsm_executions`).
execution_claims_table = Table(
    "mfsm_execution_claims",
    metadata,
    Column("migration", String(200), nullable=False),
    Column("key", String(400), nullable=False),
    Column("side", String(8), nullable=False),
    Column("worker_id", String(200), nullable=True),
    Column("attempt", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("migration", "key"),
)

#: Revision 0004: every execution of a task (one row per attempt), as it really went.
executions_table = Table(
    "mfsm_executions",
    metadata,
    Column("migration", String(200), nullable=False),
    Column("key", String(400), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("side", String(8), nullable=False),
    Column("worker_id", String(200), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("outcome", String(16), nullable=False),
    PrimaryKeyConstraint("migration", "key", "attempt"),
)

#: Revision 0004: how many executions the ledger refused, per migration and side.
execution_refusals_table = Table(
    "mfsm_execution_refusals",
    metadata,
    Column("migration", String(200), nullable=False),
    Column("side", String(8), nullable=False),
    Column("refused", BigInteger, nullable=False),
    PrimaryKeyConstraint("migration", "side"),
)

#: Revision 0006: every `import` of an archive into a side, journaled when it starts and
#: updated when it ends (`tools/runs.py`): the archive's summary (its digest and SHA-256), what
#: was loaded, and why it stopped when it did not finish.
imports_table = Table(
    "mfsm_imports",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("migration", String(200), nullable=False),
    Column("side", String(8), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("path", Text, nullable=False),
    Column("archive", JSON, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("loaded", BigInteger, nullable=False),
    Column("error", Text, nullable=True),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    Index("ix_mfsm_imports_latest", "migration", "id"),
)

#: Revision 0008: the transactional outbox of events (`journal/outbox.py`). Each row is written
#: in the same transaction as the journal change it reports, so an event exists if and only if
#: its change committed; `id` grows in commit order within a migration (the writing transaction
#: holds the migration row's lock). `event` is the event as JSON (docs/OBSERVABILITY.md).
events_table = Table(
    "mfsm_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("migration", String(200), nullable=False),
    Column("seq", Integer, nullable=True),
    Column("kind", String(32), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("event", JSON, nullable=False),
    Index("ix_mfsm_events_migration", "migration", "id"),
)

#: Revision 0008: each `[[notify]]` target's delivery state per migration: the last event id it
#: received (`cursor`), its consecutive failures and last error.
notify_targets_table = Table(
    "mfsm_notify_targets",
    metadata,
    Column("migration", String(200), nullable=False),
    Column("target", String(200), nullable=False),
    Column("cursor", Integer, nullable=False),
    Column("failures", Integer, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("last_attempt_at", UTCDateTime, nullable=True),
    Column("last_delivered_at", UTCDateTime, nullable=True),
    PrimaryKeyConstraint("migration", "target"),
)

#: PostgreSQL channel every committed transition (and every pause or lift) NOTIFYs; the payload
#: is a JSON object with the migration's name and its new phase, percent, version and
#: `paused` side (null when none).
NOTIFY_CHANNEL: Final = "migration_fsm"
