"""migration-fsm: move a running backend from an old task manager to a new task queue
through a persisted, resumable, journaled state machine.

The public names below are imported on first use (PEP 562), so that a backend importing
only the light parts (the phases, the client) does not pay for the migration runner, the
CLI or their dependencies. `_EXPORTS` is the one table of public names: `__all__`, the
lazy imports and the `TYPE_CHECKING` block below all follow it (a test checks they agree).
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from .client import AsyncDualWriter as AsyncDualWriter
    from .client import AsyncFallbackReader as AsyncFallbackReader
    from .client import DualWriter as DualWriter
    from .client import FallbackReader as FallbackReader
    from .client import PhaseClient as PhaseClient
    from .client import RepairLog as RepairLog
    from .client import Snapshot as Snapshot
    from .client import WorkerGate as WorkerGate
    from .config import Settings as Settings
    from .config import StepSpec as StepSpec
    from .config import load_settings as load_settings
    from .exceptions import BadInput as BadInput
    from .exceptions import ConcurrentChange as ConcurrentChange
    from .exceptions import ConfigError as ConfigError
    from .exceptions import Conflict as Conflict
    from .exceptions import DatabaseUnavailable as DatabaseUnavailable
    from .exceptions import DataError as DataError
    from .exceptions import DualWriteError as DualWriteError
    from .exceptions import EnvironmentProblem as EnvironmentProblem
    from .exceptions import JournalCorrupt as JournalCorrupt
    from .exceptions import LeaseHeld as LeaseHeld
    from .exceptions import MigrationFSMError as MigrationFSMError
    from .exceptions import Refused as Refused
    from .exceptions import SchemaNotCurrent as SchemaNotCurrent
    from .exceptions import StepFailed as StepFailed
    from .exceptions import TransitionInterrupted as TransitionInterrupted
    from .exceptions import TriggerNotAllowed as TriggerNotAllowed
    from .exceptions import UnknownMigration as UnknownMigration
    from .fsm import EntryStatus as EntryStatus
    from .fsm import Phase as Phase
    from .fsm import RepairStatus as RepairStatus
    from .fsm import Routing as Routing
    from .fsm import StepStatus as StepStatus
    from .fsm import Trigger as Trigger
    from .fsm import bucket as bucket
    from .fsm import routing_for as routing_for
    from .journal import Journal as Journal
    from .journal import JournalEntry as JournalEntry
    from .journal import Lease as Lease
    from .journal import MigrationState as MigrationState
    from .migration import GuardRecord as GuardRecord
    from .migration import Migration as Migration
    from .migration import TransitionResult as TransitionResult
    from .plugins.context import Context as Context
    from .plugins.context import GuardVerdict as GuardVerdict
    from .tasks.factory import build_store as build_store
    from .tasks.memory import MemoryTaskStore as MemoryTaskStore
    from .tasks.records import TaskRecord as TaskRecord
    from .tasks.records import TaskStatus as TaskStatus
    from .tasks.records import TaskStore as TaskStore
    from .tasks.sql import SqlTaskStore as SqlTaskStore

# public name -> the module (below migration_fsm) that defines it
_EXPORTS: Final[dict[str, str]] = {
    "AsyncDualWriter": "client",
    "AsyncFallbackReader": "client",
    "BadInput": "exceptions",
    "ConcurrentChange": "exceptions",
    "ConfigError": "exceptions",
    "Conflict": "exceptions",
    "Context": "plugins.context",
    "DataError": "exceptions",
    "DatabaseUnavailable": "exceptions",
    "DualWriteError": "exceptions",
    "DualWriter": "client",
    "EntryStatus": "fsm",
    "EnvironmentProblem": "exceptions",
    "FallbackReader": "client",
    "GuardRecord": "migration",
    "GuardVerdict": "plugins.context",
    "Journal": "journal",
    "JournalCorrupt": "exceptions",
    "JournalEntry": "journal",
    "Lease": "journal",
    "LeaseHeld": "exceptions",
    "MemoryTaskStore": "tasks.memory",
    "Migration": "migration",
    "MigrationFSMError": "exceptions",
    "MigrationState": "journal",
    "Phase": "fsm",
    "PhaseClient": "client",
    "Refused": "exceptions",
    "RepairLog": "client",
    "RepairStatus": "fsm",
    "Routing": "fsm",
    "SchemaNotCurrent": "exceptions",
    "Settings": "config",
    "Snapshot": "client",
    "SqlTaskStore": "tasks.sql",
    "StepFailed": "exceptions",
    "StepSpec": "config",
    "StepStatus": "fsm",
    "TaskRecord": "tasks.records",
    "TaskStatus": "tasks.records",
    "TaskStore": "tasks.records",
    "TransitionInterrupted": "exceptions",
    "TransitionResult": "migration",
    "Trigger": "fsm",
    "TriggerNotAllowed": "exceptions",
    "UnknownMigration": "exceptions",
    "WorkerGate": "client",
    "bucket": "fsm",
    "build_store": "tasks.factory",
    "load_settings": "config",
    "routing_for": "fsm",
}

# old public name -> its new name; each still works, with a DeprecationWarning, until 0.2.0
_RENAMED: Final[dict[str, str]] = {
    "Engine": "Migration",
    "GuardResult": "GuardVerdict",
    "Outcome": "TransitionResult",
    "Store": "Journal",
}

try:
    __version__ = version("migration-fsm")
except PackageNotFoundError:  # running from a checkout that is not installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(
            f"migration_fsm.{name} is now migration_fsm.{new}; the old name goes in 0.2.0",
            DeprecationWarning,
            stacklevel=2,
        )
        return __getattr__(new)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'migration_fsm' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted([*_EXPORTS, "__version__"])  # noqa: PLE0605 (built from the one table)
