"""`DualWriter` and `AsyncDualWriter`: the same decisions (`_base.WriterBase`), two kinds of I/O."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from typing import TYPE_CHECKING, Any

from ._base import WriterBase, call_store

if TYPE_CHECKING:
    from ..fsm import Side
    from ..tasks.records import TaskRecord, TaskStore
    from .phase import PhaseClient
    from .repair import RepairLog


class DualWriter(WriterBase):
    """Writes each task per the phase's routing: the authoritative side first (its failure
    raises and nothing is written to the other side), then the other side when the phase
    writes both; a failed second write goes to the repair log (or raises when `strict`).

    No write moves a task back, on either side: through the store's `put_forward`, a write
    leaves alone a task the store holds as running or finished. On the authoritative side
    that is a re-send by an at-least-once producer of a task that already ran or runs: the
    write changes nothing on either side, returns the authoritative side as usual, and is
    counted as `resends_kept` (the task is not run again). On the other side it is a write
    delayed past a state transfer or a worker's claim there, counted as
    `second_writes_behind`. A store without `put_forward` gets `put` (a warning says so
    when the writer is made)."""

    def __init__(
        self,
        client: PhaseClient,
        old: TaskStore,
        new: TaskStore,
        *,
        strict: bool = False,
        repair: RepairLog | None = None,
    ) -> None:
        super().__init__(client, old, new, strict=strict, repair=repair)

    def write(self, record: TaskRecord) -> Side:
        """Write `record`; returns the authoritative side's name ("old" or "new"), also for a
        re-send that changed nothing (see `counters()["resends_kept"]`)."""
        plan = self._plan(record.key)
        try:
            wrote = getattr(plan.first, plan.first_method)(record)
        except Exception:
            self._first_failed()
            raise
        except BaseException as exc:  # an interrupt during the first write: it may have landed
            entry = self._interrupted_first(record.key, plan, exc)
            if entry is not None:
                self.repair.record(entry.key, entry.side, entry.error)
            raise
        if not self._first_done(plan, wrote):
            return plan.first_side
        try:
            wrote = getattr(plan.second, plan.second_method)(record)
        except BaseException as exc:  # an interrupt between the two writes is repaired too
            entry = self._repair_entry(record.key, plan, exc)
            self.repair.record(entry.key, entry.side, entry.error)
            if self._second_failed(entry, exc):
                return plan.first_side
            raise
        return self._second_done(plan, wrote)


async def _write_to_the_end(store: Any, method: str, record: TaskRecord) -> Any:
    """`call_store`, except that a plain store's write (in a thread, which a cancellation
    cannot stop) is waited for even when the caller is cancelled, before the cancellation
    goes on: what to repair is decided once the write has ended, not while it may still land."""
    fn = getattr(store, method)
    if inspect.iscoroutinefunction(fn):
        return await fn(record)
    future = asyncio.ensure_future(asyncio.to_thread(fn, record))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({future})
        raise


class AsyncDualWriter(WriterBase):
    """`DualWriter` for asyncio: stores may be async (`async def put`) or plain (run in a
    thread). A cancellation at any moment leaves the task on both sides, on neither, or with
    a repair entry: between the two writes, and during the first one too (a plain store's
    write is waited for; an async store's outcome is unknown, so `reconcile` looks)."""

    def __init__(
        self,
        client: PhaseClient,
        old: Any,
        new: Any,
        *,
        strict: bool = False,
        repair: RepairLog | None = None,
    ) -> None:
        super().__init__(client, old, new, strict=strict, repair=repair)

    async def write(self, record: TaskRecord) -> Side:
        """Write `record`; returns the authoritative side's name."""
        plan = self._plan(record.key)
        try:
            wrote = await _write_to_the_end(plan.first, plan.first_method, record)
        except Exception:
            self._first_failed()
            raise
        except BaseException as exc:  # a cancellation during the first write: it may have landed
            entry = self._interrupted_first(record.key, plan, exc)
            if entry is not None:
                await asyncio.shield(
                    asyncio.to_thread(self.repair.record, entry.key, entry.side, entry.error)
                )
            raise
        if not self._first_done(plan, wrote):
            return plan.first_side
        try:
            wrote = await call_store(plan.second, plan.second_method, record)
        except BaseException as exc:  # a cancellation between the two writes is repaired too
            entry = self._repair_entry(record.key, plan, exc)
            # Shielded: recording the repair must survive the cancellation that caused it.
            await asyncio.shield(asyncio.to_thread(self.repair.record, entry.key, entry.side, entry.error))
            if self._second_failed(entry, exc):
                return plan.first_side
            raise
        return self._second_done(plan, wrote)
