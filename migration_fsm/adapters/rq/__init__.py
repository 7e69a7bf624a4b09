"""RQ (Redis) as the old side of a migration: `RqTaskStore` over one queue's jobs plus a key
index, `store` as the config factory (`kind = "migration_fsm.adapters.rq:store"`), `setup`
(`python -m migration_fsm.adapters.rq setup --url URL --queue NAME`), and the gated worker in
`migration_fsm.adapters.rq.worker`."""

from __future__ import annotations

from typing import Any

from .store import RqTaskStore, setup

__all__ = ["RqTaskStore", "setup", "store"]


def store(**options: Any) -> RqTaskStore:
    """The config factory: `url`, `queue`, and optionally `type_map` (see `RqTaskStore`)."""
    return RqTaskStore(**options)
