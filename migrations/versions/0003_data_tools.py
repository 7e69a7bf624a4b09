"""The data tools' records: validation runs and the progress of `migration-fsm backfill`.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "mfsm_validation_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("migration", sa.String(200), nullable=False),
        sa.Column("phase", sa.String(32), nullable=True),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=False),
        sa.Column("ok", sa.Boolean, nullable=False),
        sa.Column("summary", sa.JSON, nullable=False),
    )
    op.create_index("ix_mfsm_validation_runs_latest", "mfsm_validation_runs", ["migration", "id"])
    op.create_table(
        "mfsm_backfill",
        sa.Column("migration", sa.String(200), primary_key=True),
        sa.Column("cursor", sa.Text, nullable=True),
        sa.Column("copied", sa.BigInteger, nullable=False),
        sa.Column("done", sa.Boolean, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("mfsm_backfill")
    op.drop_index("ix_mfsm_validation_runs_latest", table_name="mfsm_validation_runs")
    op.drop_table("mfsm_validation_runs")
