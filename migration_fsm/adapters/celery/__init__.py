"""Celery (Redis broker and result backend) as the old side of a migration: `CeleryTaskStore`
over one queue's messages and results plus a registry of tasks, `store` as the config factory
(`kind = "migration_fsm.adapters.celery:store"`), `setup` for the registry
(`python -m migration_fsm.adapters.celery setup --app MODULE:APP`), `register_published_tasks`
for producers, and the worker's gate in `migration_fsm.adapters.celery.worker`."""

from __future__ import annotations

from typing import Any

from .store import CeleryTaskStore, register_published_tasks, settings_problems, setup

__all__ = ["CeleryTaskStore", "register_published_tasks", "settings_problems", "setup", "store"]


def store(**options: Any) -> CeleryTaskStore:
    """The config factory: `app` (package.module:app), and optionally `queue` and `type_map`
    (see `CeleryTaskStore`)."""
    return CeleryTaskStore(**options)
