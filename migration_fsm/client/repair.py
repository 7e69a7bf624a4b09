"""The dual-write repair log, as the writers fill it: one open row per failed second write."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

from ..fsm import RepairStatus


class RepairLog:
    """The dual-write repair log in the migration database: failed second writes."""

    def __init__(self, url: str, migration: str) -> None:
        self.url = url
        self.migration = migration
        self._engine: Any = None
        self._lock = threading.Lock()

    def _get_engine(self) -> Any:
        with self._lock:
            if self._engine is None:
                from ..journal import make_engine

                self._engine = make_engine(self.url)
            return self._engine

    def record(self, key: str, side: str, error: str) -> None:
        """Add an open entry: `side` missed the write of `key`."""
        from sqlalchemy import insert

        from ..journal import repair_log_table

        with self._get_engine().begin() as conn:
            conn.execute(
                insert(repair_log_table).values(
                    migration=self.migration,
                    key=key,
                    side=side,
                    error=error[:2000],
                    status=RepairStatus.OPEN,
                    attempts=0,
                    created_at=datetime.now(UTC),
                )
            )

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None
