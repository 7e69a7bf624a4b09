"""Deprecated: moved to `migration_fsm.tasks.sides` (this path goes in 0.2.0)."""

from .._compat import moved

__getattr__, __dir__ = moved(__name__, "migration_fsm.tasks.sides", {"SideName": "Side"})
