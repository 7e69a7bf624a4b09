"""Workers and the execution ledger (issue 12, DESIGN.md section 10): the giving side's
pause on the migration row, the workers' registrations and acknowledgements, and the
executions with their one live claim per key.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("mfsm_migrations") as batch:
        batch.add_column(sa.Column("paused_side", sa.String(8), nullable=True))
    op.create_table(
        "mfsm_workers",
        sa.Column("migration", sa.String(200), nullable=False),
        sa.Column("side", sa.String(8), nullable=False),
        sa.Column("worker_id", sa.String(200), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("seen_version", sa.Integer, nullable=False),
        sa.Column("heartbeat_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("migration", "side", "worker_id"),
    )
    op.create_table(
        "mfsm_execution_claims",
        sa.Column("migration", sa.String(200), nullable=False),
        sa.Column("key", sa.String(400), nullable=False),
        sa.Column("side", sa.String(8), nullable=False),
        sa.Column("worker_id", sa.String(200), nullable=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("migration", "key"),
    )
    op.create_table(
        "mfsm_executions",
        sa.Column("migration", sa.String(200), nullable=False),
        sa.Column("key", sa.String(400), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("side", sa.String(8), nullable=False),
        sa.Column("worker_id", sa.String(200), nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("migration", "key", "attempt"),
    )
    op.create_table(
        "mfsm_execution_refusals",
        sa.Column("migration", sa.String(200), nullable=False),
        sa.Column("side", sa.String(8), nullable=False),
        sa.Column("refused", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("migration", "side"),
    )


def downgrade() -> None:
    op.drop_table("mfsm_execution_refusals")
    op.drop_table("mfsm_executions")
    op.drop_table("mfsm_execution_claims")
    op.drop_table("mfsm_workers")
    with op.batch_alter_table("mfsm_migrations") as batch:
        batch.drop_column("paused_side")
