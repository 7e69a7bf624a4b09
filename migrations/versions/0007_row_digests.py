"""Digests of the rows outside the hash chain that guards trust: `digest` on
`mfsm_validation_runs` (`checksums_match` reads the latest run) and on `mfsm_backfill`
(`backfill_complete` reads the checkpoint).

The digest is `journal.chain.row_digest` (format `v1`). Rows written before this revision
are digested here, as they are: `verify` then treats a row without a digest, or whose digest
does not match, as corruption, and the guards refuse to trust it. What a digest cannot
detect is in docs/VERIFY.md.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

from migration_fsm.journal.chain import row_digest
from migration_fsm.journal.db import UTCDateTime

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The two tables as revision 0003 made them, read through the package's own types (UTC
#: timestamps, JSON) so the digests are those the package computes.
_runs = sa.table(
    "mfsm_validation_runs",
    sa.column("id", sa.Integer),
    sa.column("migration", sa.String),
    sa.column("phase", sa.String),
    sa.column("started_at", UTCDateTime),
    sa.column("finished_at", UTCDateTime),
    sa.column("ok", sa.Boolean),
    sa.column("summary", sa.JSON),
    sa.column("digest", sa.String),
)
_backfill = sa.table(
    "mfsm_backfill",
    sa.column("migration", sa.String),
    sa.column("cursor", sa.Text),
    sa.column("copied", sa.BigInteger),
    sa.column("done", sa.Boolean),
    sa.column("started_at", UTCDateTime),
    sa.column("updated_at", UTCDateTime),
    sa.column("digest", sa.String),
)


def upgrade() -> None:
    for name in ("mfsm_validation_runs", "mfsm_backfill"):
        with op.batch_alter_table(name) as batch:
            batch.add_column(sa.Column("digest", sa.String(80), nullable=True))
    conn = op.get_bind()
    for row in conn.execute(sa.select(_runs)).mappings().all():
        fields = {
            key: row[key]
            for key in ("id", "migration", "phase", "started_at", "finished_at", "ok", "summary")
        }
        fields["ok"] = bool(fields["ok"])
        conn.execute(
            sa.update(_runs)
            .where(_runs.c.id == row["id"])
            .values(digest=row_digest("validation_run", fields))
        )
    for row in conn.execute(sa.select(_backfill)).mappings().all():
        fields = {
            key: row[key] for key in ("migration", "cursor", "copied", "done", "started_at", "updated_at")
        }
        fields["copied"], fields["done"] = int(fields["copied"]), bool(fields["done"])
        conn.execute(
            sa.update(_backfill)
            .where(_backfill.c.migration == row["migration"])
            .values(digest=row_digest("backfill", fields))
        )


def downgrade() -> None:
    for name in ("mfsm_backfill", "mfsm_validation_runs"):
        with op.batch_alter_table(name) as batch:
            batch.drop_column("digest")
