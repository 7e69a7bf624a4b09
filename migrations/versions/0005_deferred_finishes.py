"""Workers that defer (batch) their finishes: `mfsm_workers.defers_finishes`.

A `WorkerGate` with `finish_batch_seconds` set writes its finishes in batches; if it
crashes, the finishes it had not flushed are lost and its claims look `running`. The
ledger does not take over a running claim of a gone worker that deferred its finishes
(the task may have succeeded): `journal/ledger.py` and docs/PERFORMANCE.md say why.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("mfsm_workers") as batch:
        batch.add_column(sa.Column("defers_finishes", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("mfsm_workers") as batch:
        batch.drop_column("defers_finishes")
