"""The dual-write repair log: second writes that failed, to be replayed by `reconcile`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "mfsm_repair_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("migration", sa.String(200), nullable=False),
        sa.Column("key", sa.String(400), nullable=False),
        sa.Column("side", sa.String(8), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("resolved_at", TIMESTAMP, nullable=True),
    )
    op.create_index("ix_mfsm_repair_log_open", "mfsm_repair_log", ["migration", "status", "id"])


def downgrade() -> None:
    op.drop_index("ix_mfsm_repair_log_open", table_name="mfsm_repair_log")
    op.drop_table("mfsm_repair_log")
