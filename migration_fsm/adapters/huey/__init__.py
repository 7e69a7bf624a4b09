"""Huey (with SQLite storage) as the old side of a migration: `HueyTaskStore` over Huey's own
tables plus a registry of tasks, `store` as the config factory
(`kind = "migration_fsm.adapters.huey:store"`), `setup` for the registry
(`python -m migration_fsm.adapters.huey setup --app MODULE:HUEY`), and the consumer's gate in
`migration_fsm.adapters.huey.worker`."""

from __future__ import annotations

from typing import Any

from .store import REGISTRY, HueyTaskStore, setup

__all__ = ["REGISTRY", "HueyTaskStore", "setup", "store"]


def store(**options: Any) -> HueyTaskStore:
    """The config factory: `app` (package.module:huey) or `filename` (and `queue`), and
    optionally `type_map` (see `HueyTaskStore`)."""
    return HueyTaskStore(**options)
