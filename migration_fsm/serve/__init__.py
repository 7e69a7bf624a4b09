"""`migration-fsm serve`: Prometheus `/metrics`, a JSON API and a live status page, read-only
(docs/OBSERVABILITY.md)."""

from .app import DEFAULT_LISTEN, StatusServer, is_loopback, parse_listen
from .metrics import METRICS, MigrationCollector, Snapshot, read_snapshot

__all__ = [
    "DEFAULT_LISTEN",
    "METRICS",
    "MigrationCollector",
    "Snapshot",
    "StatusServer",
    "is_loopback",
    "parse_listen",
    "read_snapshot",
]
