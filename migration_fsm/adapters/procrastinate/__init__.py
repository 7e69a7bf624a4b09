"""Procrastinate (PostgreSQL) as either side of a migration: `ProcrastinateTaskStore` over
its tables, `store` as the config factory (`kind = "migration_fsm.adapters.procrastinate:store"`),
and `setup` for the registry table (`python -m migration_fsm.adapters.procrastinate setup`).
"""

from __future__ import annotations

from typing import Any

from .store import JOB_KEY_PREFIX, REGISTRY, ProcrastinateTaskStore, setup

__all__ = ["JOB_KEY_PREFIX", "REGISTRY", "ProcrastinateTaskStore", "setup", "store"]


def store(**options: Any) -> ProcrastinateTaskStore:
    """The config factory: `[stores.new]` with `kind = "migration_fsm.adapters.procrastinate:store"`,
    `url` and optionally `queue`, `queues`, `task_names` (see `ProcrastinateTaskStore`)."""
    return ProcrastinateTaskStore(**options)
