"""Every `import` of an archive, journaled: `mfsm_imports`.

An import writes tasks into a side outside any transition; the row says who loaded which
archive (its summary, with the digest and SHA-256 that were verified), into which side, how
many tasks, and why it stopped when it did not finish.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "mfsm_imports",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("migration", sa.String(200), nullable=False),
        sa.Column("side", sa.String(8), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("archive", sa.JSON, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("loaded", sa.BigInteger, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
    )
    op.create_index("ix_mfsm_imports_latest", "mfsm_imports", ["migration", "id"])


def downgrade() -> None:
    op.drop_index("ix_mfsm_imports_latest", table_name="mfsm_imports")
    op.drop_table("mfsm_imports")
