"""What the sync and async writers and readers share: every decision, no I/O.

The base classes here decide which side is authoritative, whether and how the other side
is written, what a failed second write leaves in the repair log and what the caller then
sees, which side a read comes from, when it falls back and when it is shadowed. The twins
in `writer.py` and `reader.py` only do the I/O, blocking or awaited (as python-statemachine's
`engines/base.py` decides for `sync.py` and `async_.py`). Every rule reads the routing
table (`migration_fsm.fsm.ROUTING` through `PhaseClient.routing`), never a phase name.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..exceptions import DualWriteError
from ..tasks.capabilities import ForwardPut
from ..tasks.records import PROGRESS_FIELDS, is_behind
from . import metrics
from ._log import first_line, log
from .repair import RepairLog

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..fsm import Routing, Side
    from ..tasks.records import TaskRecord
    from .phase import PhaseClient


async def call_store(store: Any, method: str, *args: Any) -> Any:
    """Call a store method from asyncio: awaited when it is a coroutine function, else run
    in a worker thread (so a plain store never blocks the event loop)."""
    fn = getattr(store, method)
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    return await asyncio.to_thread(fn, *args)


# -- writing ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WritePlan:
    """One write as the routing decided it: the authoritative side first, then maybe the other.
    Both go through the store's `put_forward` when it has one (`put` otherwise), so neither
    moves a task back."""

    first_side: Side
    first: Any
    first_method: str
    first_answers: bool
    second_side: Side | None  # None: the phase writes only the authoritative side
    second: Any
    second_method: str  # `put_forward` (never moves a task back) when the store has it, else `put`
    second_answers: bool  # whether `second_method` returns whether it wrote


@dataclass(frozen=True, slots=True)
class RepairEntry:
    """What a failed second write leaves in the repair log."""

    key: str
    side: Side
    error: str


class WriterBase:
    """The decisions of `DualWriter` and `AsyncDualWriter`; they add only the I/O."""

    def __init__(
        self,
        client: PhaseClient,
        old: Any,
        new: Any,
        *,
        strict: bool = False,
        repair: RepairLog | None,
    ) -> None:
        self.client = client
        self.old = old
        self.new = new
        self.strict = strict
        self.repair = repair or RepairLog(client.url, client.migration)
        self._lock = threading.Lock()
        self._counters = {
            "writes": 0,
            "second_writes": 0,
            "second_writes_behind": 0,
            "repair_entries": 0,
            "failed_writes": 0,
            "resends_kept": 0,
        }
        metrics.track(self, "writer", client.migration)
        for side, store in (("old", old), ("new", new)):
            if not isinstance(store, ForwardPut):
                log.warning(
                    "the %s store has no put_forward: a re-sent task that already ran is put back "
                    "to its sent status there, and may run again",
                    side,
                    extra={"migration": client.migration, "side": side},
                )

    def _plan(self, key: str) -> WritePlan:
        """Which side gets `key` first and whether the other side is written after it."""
        route = self.client.routing(key)
        first_side = route.authoritative
        second_side: Side = "new" if first_side == "old" else "old"
        writes_second = route.write_new if second_side == "new" else route.write_old
        first, second = self._store(first_side), self._store(second_side)
        first_method, first_answers = _forward_put(first)
        method, answers = _forward_put(second)
        return WritePlan(
            first_side,
            first,
            first_method,
            first_answers,
            second_side if writes_second else None,
            second if writes_second else None,
            method,
            answers,
        )

    def _store(self, side: Side) -> Any:
        return self.old if side == "old" else self.new

    def _first_failed(self) -> None:
        """The authoritative write raised: nothing was written anywhere; the caller sees it."""
        self._count("failed_writes")

    def _first_done(self, plan: WritePlan, wrote: Any) -> bool:
        """After the authoritative write: whether the other side is written too. A re-send of
        a task the authoritative side already holds further along (running or finished)
        changes nothing there, and nothing on the other side either: it is counted as
        `resends_kept` and the task is not run again."""
        self._count("writes")
        if plan.first_answers and not wrote:
            self._count("resends_kept")
            return False
        return plan.second_side is not None

    def _second_done(self, plan: WritePlan, wrote: Any) -> Side:
        self._count("second_writes")
        if plan.second_answers and not wrote:
            self._count("second_writes_behind")  # the other side already held a later state
        return plan.first_side

    def _repair_entry(self, key: str, plan: WritePlan, exc: BaseException) -> RepairEntry:
        """The repair entry for a second write that raised `exc` (anything, interrupts too)."""
        assert plan.second_side is not None
        return RepairEntry(key, plan.second_side, _describe(exc))

    def _interrupted_first(self, key: str, plan: WritePlan, exc: BaseException) -> RepairEntry | None:
        """The repair entry for an interrupt (not an `Exception`: KeyboardInterrupt, a
        cancellation, a worker's hard timeout) *during* the authoritative write, when the
        phase writes both sides: that write may have landed, so `reconcile` must look (it
        copies the task to the other side, or finds it on neither). None when the phase
        writes one side only (the task is on it, or on neither: both are consistent)."""
        self._first_failed()
        if plan.second_side is None:
            return None
        self._count("repair_entries")
        return RepairEntry(
            key, plan.second_side, f"{_describe_first(exc)} during the write to {plan.first_side}"
        )

    def _second_failed(self, entry: RepairEntry, exc: BaseException) -> bool:
        """After the repair entry is stored: True when the write stands (the caller gets the
        authoritative side), False when the twin must re-raise `exc` (an interrupt that is
        not an `Exception`: KeyboardInterrupt, a cancellation). A strict writer raises
        `DualWriteError` for any `Exception`."""
        self._count("repair_entries")
        if not isinstance(exc, Exception):
            return False
        if self.strict:
            raise DualWriteError(
                f"write of {entry.key} to {entry.side} failed: {first_line(exc)}; the task IS stored on"
                f" the authoritative side ({'old' if entry.side == 'new' else 'new'}) and a repair"
                " entry is kept: do not re-send it, `reconcile` copies it"
            ) from exc
        return True

    def _count(self, name: str) -> None:
        with self._lock:
            self._counters[name] += 1

    def counters(self) -> dict[str, int]:
        """Plain numbers for the application's metrics system; `repair_spooled` is how many
        repair entries wait in the repair log's spool for the migration database."""
        with self._lock:
            values = dict(self._counters)
        values["repair_spooled"] = self.repair.pending()
        return values

    def close(self) -> None:
        """Close the repair log's connections (the client and stores are the caller's)."""
        metrics.untrack(self)
        self.repair.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _forward_put(store: Any) -> tuple[str, bool]:
    """The method for a write to `store`, and whether it says if it wrote: the store's
    `put_forward` when it offers `capabilities.ForwardPut` (`SqlTaskStore` and
    `MemoryTaskStore` do), else `put`."""
    return ("put_forward", True) if isinstance(store, ForwardPut) else ("put", False)


def _describe_first(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"interrupted ({first_line(exc)})"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled between the two writes"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted between the two writes"
    return first_line(exc)


# -- reading ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """One read as the routing decided it."""

    primary_side: Side
    primary: Any
    fallback: Any  # None: a miss or an error on the primary side is the answer
    shadow: Any  # None: no shadow read of the other side this time


def lags(shadow: TaskRecord, primary: TaskRecord) -> bool:
    """Whether `shadow` is `primary` at an earlier point of its run: not further along in
    status, and no more attempts."""
    if is_behind(primary.status, shadow.status):
        return False
    return shadow.attempts <= primary.attempts


def shadows(route: Routing) -> bool:
    """Whether a read may be shadowed under `route`: reads come from old, which is still
    authoritative, and new is written too (`dual_write`), so new should already agree."""
    return route.read_from == "old" and route.authoritative == "old" and route.write_new


class ReaderBase:
    """The decisions of `FallbackReader` and `AsyncFallbackReader`; they add only the I/O."""

    def __init__(self, client: PhaseClient, old: Any, new: Any, *, shadow_sample: float = 0.0) -> None:
        if not 0.0 <= shadow_sample <= 1.0:
            raise ValueError("shadow_sample must be between 0 and 1")
        self.client = client
        self.old = old
        self.new = new
        self.shadow_sample = shadow_sample
        self._random: Callable[[], float] = random.random
        self._lock = threading.Lock()
        self._counters = {
            "reads": 0,
            "fallbacks": 0,
            "new_errors": 0,
            "shadow_reads": 0,
            "shadow_mismatches": 0,
            "shadow_status_lag": 0,
        }
        metrics.track(self, "reader", client.migration)

    def _plan(self, key: str) -> ReadPlan:
        """Where `key` is read from, what backs it up, and whether new is compared."""
        route = self.client.routing(key)
        self._count("reads")
        if route.read_from != "new":
            shadow = self.new if self._should_shadow(route) else None
            return ReadPlan("old", self.old, None, shadow)
        fallback = self.old if route.read_fallback == "old" else None
        return ReadPlan("new", self.new, fallback, None)

    def _should_shadow(self, route: Routing) -> bool:
        return self.shadow_sample > 0 and shadows(route) and self._random() < self.shadow_sample

    def _primary_failed(self, plan: ReadPlan) -> bool:
        """The primary read raised: True when that counts as a miss (the fallback is read
        next), False when the caller must see the error (there is no fallback)."""
        if plan.fallback is None:
            return False
        self._count("new_errors")
        return True

    def _falls_back(self, plan: ReadPlan, record: TaskRecord | None) -> bool:
        """Whether the fallback side is read (and counted) after `record` came back."""
        if record is None and plan.fallback is not None:
            self._count("fallbacks")
            return True
        return False

    def _compare(
        self, key: str, plan: ReadPlan, primary: TaskRecord | None, shadow: TaskRecord | None
    ) -> None:
        """Count a shadow read; log (never raise) how the shadow copy differs.

        A mismatch is a copy missing on one side, a different identity (type, payload,
        created_at, ...), or a shadow copy further along than the authoritative one (the
        shadow side ran a task it does not consume). A shadow copy that is merely behind in
        status or attempts (an old worker finished it, the new copy is still pending) is the
        normal lag of dual writes: counted as `shadow_status_lag`, not logged."""
        self._count("shadow_reads")
        if primary is None and shadow is None:
            return
        other: Side = "new" if plan.primary_side == "old" else "old"
        if primary is None or shadow is None:
            fields = [f"(missing on {other if shadow is None else plan.primary_side})"]
        else:
            fields = [name for name in primary.differing_fields(shadow) if name not in PROGRESS_FIELDS]
            if not fields and primary.differing_fields(shadow):
                if lags(shadow, primary):
                    self._count("shadow_status_lag")
                    return
                fields = [name for name in PROGRESS_FIELDS if getattr(primary, name) != getattr(shadow, name)]
        if fields:
            self._count("shadow_mismatches")
            log.warning(
                "shadow read of %s differs on %s",
                key,
                ", ".join(fields),
                extra={"migration": self.client.migration, "key": key, "fields": fields},
            )

    @staticmethod
    def _shadow_failed(key: str, exc: Exception) -> None:
        log.warning("shadow read of %s failed: %s", key, first_line(exc))

    def counters(self) -> dict[str, int]:
        """Plain numbers for the application's metrics system."""
        with self._lock:
            return dict(self._counters)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counters[name] += 1
