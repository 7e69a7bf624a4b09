"""Alembic environment for migration-fsm's own tables.

migration-fsm runs these revisions itself (`migration-fsm db upgrade`), handing over its
connection in `config.attributes["connection"]`. Run by hand with the `alembic` tool, the
URL comes from `sqlalchemy.url` or the MIGRATION_FSM_DATABASE_URL environment variable.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

config = context.config


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.get_main_option("sqlalchemy.url") or os.environ.get(
        "MIGRATION_FSM_DATABASE_URL", "sqlite:///migration_fsm.db"
    )
    engine = create_engine(url)
    with engine.begin() as conn:
        context.configure(connection=conn, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("migration-fsm's schema is applied online only: run `migration-fsm db upgrade`")
run_migrations()
