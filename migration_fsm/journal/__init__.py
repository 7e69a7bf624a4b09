"""The journal layer: the migration database, its tables, hash chain, lease and Alembic glue.

Other layers import from here (or from one submodule):

- `db`: `make_engine`, `utcnow`, `UTCDateTime`, `safe_url`, `scrub`, `redact`, `redact_text`
- `schema`: `metadata` and every table (`migrations_table`, `journal_table`, ...)
- `revisions`: `migrations_dir`, `alembic_config`, `head_revisions`
- `records`: `MigrationState`, `StepRecord`, `JournalEntry`
- `chain`: `chain_hash`
- `locks`: `lease_holder_name` and the PostgreSQL advisory lock
- `lease`: `Lease` and the errors naming a lease's holder
- `journal`: `Journal`
- `workers`: `Workers` (`mfsm_workers`: registrations, heartbeats, acknowledgements)
- `ledger`: `Ledger`, `Claim`, `ClaimResult`, `LedgerCounts` (the execution ledger)
"""

from .chain import chain_hash
from .db import SQLITE_BUSY_TIMEOUT_MS, UTCDateTime, make_engine, redact, redact_text, safe_url, scrub, utcnow
from .journal import Journal
from .lease import Lease, lease_held_error, lease_lost
from .ledger import Claim, ClaimResult, Ledger, LedgerCounts
from .locks import lease_holder_name
from .records import JournalEntry, MigrationState, StepRecord
from .revisions import alembic_config, head_revisions, migrations_dir
from .schema import (
    NOTIFY_CHANNEL,
    backfill_table,
    execution_claims_table,
    execution_refusals_table,
    executions_table,
    journal_table,
    metadata,
    migrations_table,
    repair_log_table,
    steps_table,
    validation_runs_table,
    workers_table,
)
from .workers import SideWorkers, WorkerRecord, Workers

__all__ = [
    "NOTIFY_CHANNEL",
    "SQLITE_BUSY_TIMEOUT_MS",
    "Claim",
    "ClaimResult",
    "Journal",
    "JournalEntry",
    "Lease",
    "Ledger",
    "LedgerCounts",
    "MigrationState",
    "SideWorkers",
    "StepRecord",
    "UTCDateTime",
    "WorkerRecord",
    "Workers",
    "alembic_config",
    "backfill_table",
    "chain_hash",
    "execution_claims_table",
    "execution_refusals_table",
    "executions_table",
    "head_revisions",
    "journal_table",
    "lease_held_error",
    "lease_holder_name",
    "lease_lost",
    "make_engine",
    "metadata",
    "migrations_dir",
    "migrations_table",
    "redact",
    "redact_text",
    "repair_log_table",
    "safe_url",
    "scrub",
    "steps_table",
    "utcnow",
    "validation_runs_table",
    "workers_table",
]
