"""Events out: the transactional outbox `mfsm_events` and each notify target's delivery
state `mfsm_notify_targets` (docs/OBSERVABILITY.md).

Every journal change (claim, refusal, step done or failed, commit, abort, takeover, pause,
lift, workers gone) writes its event in the same transaction; `[[notify]]` targets receive
them in order and the cursor of each target says how far it got.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "mfsm_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("migration", sa.String(200), nullable=False),
        sa.Column("seq", sa.Integer, nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("event", sa.JSON, nullable=False),
    )
    op.create_index("ix_mfsm_events_migration", "mfsm_events", ["migration", "id"])
    op.create_table(
        "mfsm_notify_targets",
        sa.Column("migration", sa.String(200), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("cursor", sa.Integer, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("last_attempt_at", TIMESTAMP, nullable=True),
        sa.Column("last_delivered_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("migration", "target"),
    )


def downgrade() -> None:
    op.drop_table("mfsm_notify_targets")
    op.drop_index("ix_mfsm_events_migration", table_name="mfsm_events")
    op.drop_table("mfsm_events")
