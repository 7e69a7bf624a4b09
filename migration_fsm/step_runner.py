"""Running the steps of a claimed transition: each step marked through the lease, its
checkpoint saved, the lease renewed in the background, and the undo of done steps for `abort`.

`Migration` (in `migration`) decides which edge to take and when to commit; this module only
runs what the journal says the transition planned.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from .exceptions import StepFailed
from .fsm import Edge, StepStatus, edge_for
from .journal.db import redact_text
from .plugins.context import Context, StepFn
from .plugins.registry import resolve_step

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .config import Settings
    from .journal import Journal, JournalEntry, Lease, MigrationState, StepRecord


def edge_of(entry: JournalEntry) -> Edge:
    """The machine's edge (with its rules) that a journal entry took."""
    assert entry.source is not None
    return edge_for(entry.source, entry.trigger, entry.dest)


class StepRunner:
    """Runs the planned steps of one migration's transitions for one operator."""

    def __init__(self, store: Journal, settings: Settings, migration: str, log: Any) -> None:
        self.store = store
        self.settings = settings
        self.migration = migration
        self.log = log

    def resolve(self, entry: JournalEntry) -> list[StepFn]:
        """The function of each planned step of `entry` (a missing one is a config error)."""
        where = f'steps."{entry.source}->{entry.dest}"'
        return [resolve_step(step.name, where) for step in entry.steps]

    def run(self, state: MigrationState, lease: Lease, entry: JournalEntry) -> None:
        """Run every step of `entry` that is not done yet, in order, the lease renewed meanwhile."""
        edge = edge_of(entry)
        fns = self.resolve(entry)
        pending = any(step.status != StepStatus.DONE for step in entry.steps)
        with self.heartbeat(lease) if pending else nullcontext():
            for step, fn in zip(entry.steps, fns, strict=True):
                if step.status == StepStatus.DONE:
                    continue
                ctx = self.context(state, edge, entry.percent, lease, step)
                self._run_one(lease, entry, step, fn, ctx, undo=False)

    def undo(
        self,
        state: MigrationState,
        lease: Lease,
        entry: JournalEntry,
        undos: dict[int, StepFn],
    ) -> None:
        """Run the undo of each step in `undos` (by position), last step first."""
        edge = edge_of(entry)
        with self.heartbeat(lease):
            for step in reversed(entry.steps):
                if step.position not in undos:
                    continue
                ctx = self.context(state, edge, entry.percent, lease, step)
                self._run_one(lease, entry, step, undos[step.position], ctx, undo=True)

    def _run_one(
        self,
        lease: Lease,
        entry: JournalEntry,
        step: StepRecord,
        fn: StepFn,
        ctx: Context,
        *,
        undo: bool,
    ) -> None:
        seq = entry.seq
        label = f"undo of {step.name}" if undo else step.name
        if not undo:
            lease.start_step(step.position)
        began = time.perf_counter()
        try:
            fn(ctx)
        except (Exception, KeyboardInterrupt) as exc:
            error = (
                "interrupted (Ctrl-C)"
                if isinstance(exc, KeyboardInterrupt)
                else redact_text(f"{type(exc).__name__}: {exc}")
            )
            ms = round((time.perf_counter() - began) * 1000)
            self.log.error(
                "step",
                seq=seq,
                step=label,
                status=StepStatus.FAILED,
                error=error,
                duration_ms=ms,
                exc_info=exc,
            )
            lease.mark_step(
                step.position,
                StepStatus.DONE if undo else StepStatus.FAILED,
                f"{label}: {error}",
                undo_failed=undo,
            )
            lease.release(f"step {label} failed: {error}")
            next_move = (
                "`migration-fsm abort --reason TEXT` again"
                if undo
                else ("`migration-fsm resume` or `migration-fsm abort --reason TEXT`")
            )
            raise StepFailed(
                f"transition #{seq} ({entry.trigger} {entry.source}->{entry.dest}) stopped: step"
                f" {label} failed: {error}; fix the cause, then run {next_move}"
            ) from exc
        ms = round((time.perf_counter() - began) * 1000)
        lease.mark_step(step.position, StepStatus.UNDONE if undo else StepStatus.DONE)
        self.log.info(
            "step",
            seq=seq,
            step=label,
            status=StepStatus.UNDONE if undo else StepStatus.DONE,
            duration_ms=ms,
        )

    def context(
        self,
        state: MigrationState,
        edge: Edge,
        percent: int,
        lease: Lease | None,
        step: StepRecord | None,
    ) -> Context:
        """The `ctx` a guard (no lease, no step) or a step receives."""
        save = beat = pause = lift = gone = None
        seq = None if lease is None else lease.seq
        if lease is not None and step is not None:
            position = step.position

            def save(checkpoint: dict[str, Any]) -> None:
                lease.save_checkpoint(position, checkpoint)

            def beat() -> None:
                lease.heartbeat()

            pause, lift = lease.pause, lease.lift

            def gone(checkpoint: dict[str, Any], side: str, workers: list[str]) -> None:
                lease.workers_gone(position, checkpoint, side, workers)

        return Context(
            migration=self.migration,
            seq=seq,
            source=edge.source,
            dest=edge.dest,
            settings=self.settings,
            log=self.log.bind(seq=seq, step=None if step is None else step.name),
            state=state,
            store=self.store,
            percent=percent,
            checkpoint=None if step is None else step.checkpoint,
            _save=save,
            _beat=beat,
            _pause=pause,
            _lift=lift,
            _gone=gone,
        )

    @contextmanager
    def heartbeat(self, lease: Lease) -> Iterator[None]:
        """Renew the lease in the background while steps run (they may forget to)."""
        stop = threading.Event()
        seq = lease.seq

        def renew() -> None:
            while not stop.wait(self.settings.heartbeat_interval):
                try:
                    if not lease.heartbeat():
                        self.log.warning("lease_lost", seq=seq)
                        return
                except Exception as exc:  # noqa: BLE001 - keep trying: the database may come back
                    self.log.warning("heartbeat_failed", seq=seq, error=redact_text(str(exc)))

        thread = threading.Thread(target=renew, name=f"migration-fsm-lease-{seq}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
