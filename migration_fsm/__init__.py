"""migration-fsm: move a running backend from an old task manager to a new task queue
through a persisted, resumable, journaled state machine.

The public names below are imported on first use (PEP 562), so that a backend importing
only the light parts (the phases, the client) does not pay for the engine, the CLI or
their dependencies.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import AsyncDualWriter as AsyncDualWriter
    from .client import AsyncFallbackReader as AsyncFallbackReader
    from .client import DualWriteError as DualWriteError
    from .client import DualWriter as DualWriter
    from .client import FallbackReader as FallbackReader
    from .client import PhaseClient as PhaseClient
    from .client import RepairLog as RepairLog
    from .client import Snapshot as Snapshot
    from .config import Settings as Settings
    from .config import StepSpec as StepSpec
    from .config import load_settings as load_settings
    from .context import Context as Context
    from .context import GuardResult as GuardResult
    from .data.memory import MemoryTaskStore as MemoryTaskStore
    from .data.records import TaskRecord as TaskRecord
    from .data.records import TaskStatus as TaskStatus
    from .data.records import TaskStore as TaskStore
    from .engine import Engine as Engine
    from .engine import Outcome as Outcome
    from .exceptions import BadInput as BadInput
    from .exceptions import ConcurrentChange as ConcurrentChange
    from .exceptions import ConfigError as ConfigError
    from .exceptions import Conflict as Conflict
    from .exceptions import DatabaseUnavailable as DatabaseUnavailable
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
    from .fsm import Phase as Phase
    from .fsm import Routing as Routing
    from .fsm import Trigger as Trigger
    from .fsm import bucket as bucket
    from .fsm import routing_for as routing_for
    from .store import JournalEntry as JournalEntry
    from .store import MigrationState as MigrationState
    from .store import Store as Store

_EXPORTS: dict[str, str] = {
    "AsyncDualWriter": "client",
    "AsyncFallbackReader": "client",
    "DualWriteError": "client",
    "DualWriter": "client",
    "FallbackReader": "client",
    "MemoryTaskStore": "data.memory",
    "PhaseClient": "client",
    "RepairLog": "client",
    "Snapshot": "client",
    "TaskRecord": "data.records",
    "TaskStatus": "data.records",
    "TaskStore": "data.records",
    "BadInput": "exceptions",
    "ConcurrentChange": "exceptions",
    "ConfigError": "exceptions",
    "Conflict": "exceptions",
    "Context": "context",
    "DatabaseUnavailable": "exceptions",
    "Engine": "engine",
    "EnvironmentProblem": "exceptions",
    "GuardResult": "context",
    "JournalCorrupt": "exceptions",
    "JournalEntry": "store",
    "LeaseHeld": "exceptions",
    "MigrationFSMError": "exceptions",
    "MigrationState": "store",
    "Outcome": "engine",
    "Phase": "fsm",
    "Refused": "exceptions",
    "Routing": "fsm",
    "SchemaNotCurrent": "exceptions",
    "Settings": "config",
    "StepFailed": "exceptions",
    "StepSpec": "config",
    "Store": "store",
    "TransitionInterrupted": "exceptions",
    "Trigger": "fsm",
    "TriggerNotAllowed": "exceptions",
    "UnknownMigration": "exceptions",
    "bucket": "fsm",
    "load_settings": "config",
    "routing_for": "fsm",
}

try:
    __version__ = version("migration-fsm")
except PackageNotFoundError:  # running from a checkout that is not installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'migration_fsm' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "AsyncDualWriter",
    "AsyncFallbackReader",
    "BadInput",
    "ConcurrentChange",
    "ConfigError",
    "Conflict",
    "Context",
    "DatabaseUnavailable",
    "DualWriteError",
    "DualWriter",
    "Engine",
    "EnvironmentProblem",
    "FallbackReader",
    "GuardResult",
    "JournalCorrupt",
    "JournalEntry",
    "LeaseHeld",
    "MemoryTaskStore",
    "MigrationFSMError",
    "MigrationState",
    "Outcome",
    "Phase",
    "PhaseClient",
    "Refused",
    "RepairLog",
    "Routing",
    "SchemaNotCurrent",
    "Settings",
    "Snapshot",
    "StepFailed",
    "StepSpec",
    "Store",
    "TaskRecord",
    "TaskStatus",
    "TaskStore",
    "TransitionInterrupted",
    "Trigger",
    "TriggerNotAllowed",
    "UnknownMigration",
    "__version__",
    "bucket",
    "load_settings",
    "routing_for",
]
