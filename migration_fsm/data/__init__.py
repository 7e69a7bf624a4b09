"""Deprecated: `migration_fsm.data` was split into `tasks` (records and stores), `tools`
(backfill, validate, reconcile, archive) and `plugins` (guards, steps, hand-over).
Each old submodule still imports, with a `DeprecationWarning`, until 0.2.0."""

import warnings

warnings.warn(
    "migration_fsm.data was split into migration_fsm.tasks, migration_fsm.tools and"
    " migration_fsm.plugins; the old path goes in migration-fsm 0.2.0",
    DeprecationWarning,
    stacklevel=2,
)
