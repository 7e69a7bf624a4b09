"""`FallbackReader` and `AsyncFallbackReader`: the same decisions (`_base.ReaderBase`), two
kinds of I/O."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._base import ReaderBase, call_store

if TYPE_CHECKING:
    from ..tasks.records import TaskRecord


class FallbackReader(ReaderBase):
    """Reads per routing; in `cutover` and `cleanup` a miss or an error on new falls back to
    old (counted). With `shadow_sample`, a sampled read in `dual_write` is also done on new
    and compared; mismatches are counted and logged, never raised."""

    def get(self, key: str) -> TaskRecord | None:
        plan = self._plan(key)
        record: TaskRecord | None
        try:
            record = plan.primary.get(key)
        except Exception:
            if not self._primary_failed(plan):
                raise
            record = None
        if self._falls_back(plan, record):
            record = plan.fallback.get(key)
        if plan.shadow is not None:
            try:
                self._compare(key, plan, record, plan.shadow.get(key))
            except Exception as exc:  # noqa: BLE001 - a shadow read never fails the caller
                self._shadow_failed(key, exc)
        return record


class AsyncFallbackReader(ReaderBase):
    """`FallbackReader` for asyncio (async stores are awaited, plain ones run in a thread)."""

    async def get(self, key: str) -> TaskRecord | None:
        plan = self._plan(key)
        record: TaskRecord | None
        try:
            record = await call_store(plan.primary, "get", key)
        except Exception:
            if not self._primary_failed(plan):
                raise
            record = None
        if self._falls_back(plan, record):
            record = await call_store(plan.fallback, "get", key)
        if plan.shadow is not None:
            try:
                self._compare(key, plan, record, await call_store(plan.shadow, "get", key))
            except Exception as exc:  # noqa: BLE001 - a shadow read never fails the caller
                self._shadow_failed(key, exc)
        return record
