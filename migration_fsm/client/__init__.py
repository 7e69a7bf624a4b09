"""What a backend imports to follow the migration: `PhaseClient`, `DualWriter`,
`FallbackReader` and their asyncio twins (DESIGN.md sections 6 and 7).

- `phase`: `PhaseClient` and its `Snapshot` (cached, refreshed off the caller's path,
  LISTEN/NOTIFY on PostgreSQL);
- `_base`: every decision the sync and async twins share (which side is authoritative,
  what is written second, what the repair log gets, where a read comes from, when it falls
  back or is shadowed), all read off the routing table;
- `writer`, `reader`: the twins, which only do the I/O; `repair`: the repair log;
- `gate`: `WorkerGate`, run by each worker of either queue: may it consume (the routing and
  the pause it has applied and acknowledged), and the execution ledger's claim around a task.

This package imports neither click, rich nor alembic; it logs through the standard
`logging` module (logger `migration_fsm.client`) so that it fits whatever the application
uses.
"""

from __future__ import annotations

from ..exceptions import DualWriteError as DualWriteError
from .gate import Run as Run
from .gate import WorkerGate as WorkerGate
from .phase import PhaseClient as PhaseClient
from .phase import Snapshot as Snapshot
from .reader import AsyncFallbackReader as AsyncFallbackReader
from .reader import FallbackReader as FallbackReader
from .repair import RepairLog as RepairLog
from .writer import AsyncDualWriter as AsyncDualWriter
from .writer import DualWriter as DualWriter

__all__ = [
    "AsyncDualWriter",
    "AsyncFallbackReader",
    "DualWriteError",
    "DualWriter",
    "FallbackReader",
    "PhaseClient",
    "RepairLog",
    "Run",
    "Snapshot",
    "WorkerGate",
]
