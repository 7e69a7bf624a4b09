"""What `serve` reads from the migration database, and the Prometheus metrics made of it.

Every scrape reads afresh (one `Snapshot`, in a few read-only transactions): nothing is
cached between scrapes and nothing is written. The metrics and their labels are listed in
`METRICS` (and in docs/OBSERVABILITY.md); `tests/unit/test_serve.py` checks that a scrape
carries every one of them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import commands
from ..exceptions import MigrationFSMError
from ..fsm import PHASES
from ..journal import redact_text, utcnow
from ..log import get_logger
from ..tools.reconcile import open_entries
from ..tools.runs import backfill_progress, latest_validation

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from prometheus_client.metrics_core import Metric

    from ..config import Settings
    from ..journal import Journal
    from ..tools.runs import BackfillProgress, ValidationRun

log = get_logger()

#: The figures of a stored `validate` run that `mfsm_validate_tasks` carries, as its `kind`.
VALIDATE_KINDS: Final = ("old_count", "new_count", "missing", "mismatched", "extra", "status_differs")
#: The ledger's task states that `mfsm_ledger_tasks` carries, as its `state`.
LEDGER_STATES: Final = ("running", "succeeded", "failed", "handed_over")
#: Worker states of `mfsm_workers`.
WORKER_STATES: Final = ("live", "acknowledged", "gone")

#: name -> (type, labels besides `migration`, help). The contract of `/metrics`.
METRICS: Final[dict[str, tuple[str, tuple[str, ...], str]]] = {
    "mfsm_up": ("gauge", (), "1 when the last scrape read the migration database, else 0"),
    "mfsm_phase": ("gauge", ("phase",), "1 for the current phase, 0 for the others"),
    "mfsm_percent": ("gauge", (), "The cutover percent"),
    "mfsm_version": ("gauge", (), "The migration's version (bumped by every transition and pause)"),
    "mfsm_phase_seconds": ("gauge", (), "Seconds since the current phase was entered"),
    "mfsm_transition_in_progress": ("gauge", (), "1 while a transition is claimed and not finished"),
    "mfsm_paused": ("gauge", ("side",), "1 while that side's consumers are paused by a transition"),
    "mfsm_lease_held": ("gauge", ("holder",), "1 while an operator holds a live lease (holder: who)"),
    "mfsm_transitions_total": (
        "counter",
        ("trigger", "edge", "status"),
        "Journaled transitions by trigger, edge (source->dest) and status (committed, refused, ...)",
    ),
    "mfsm_backfill_copied": ("gauge", (), "Tasks the last backfill copied"),
    "mfsm_backfill_done": ("gauge", (), "1 when the last backfill ran to the end"),
    "mfsm_backfill_rate": ("gauge", (), "Tasks per second of the last backfill, start to last checkpoint"),
    "mfsm_validate_ok": ("gauge", (), "1 when the last validate found the two sides equal"),
    "mfsm_validate_tasks": ("gauge", ("kind",), "The last validate's counts by kind"),
    "mfsm_validate_timestamp_seconds": ("gauge", (), "When the last validate finished (Unix time)"),
    "mfsm_repair_log_open": ("gauge", (), "Open entries of the dual-write repair log"),
    "mfsm_workers": ("gauge", ("side", "state"), "Workers by side and state (live, acknowledged, gone)"),
    "mfsm_ledger_tasks": ("gauge", ("state",), "Tasks of the execution ledger by state"),
    "mfsm_ledger_refusals_total": ("counter", ("side",), "Executions the ledger refused, by side"),
    "mfsm_ledger_executed_twice": ("gauge", (), "Tasks the ledger saw executed twice (must stay 0)"),
    "mfsm_watch_verdicts_total": (
        "counter",
        ("guard", "outcome"),
        "Verdicts of migration-fsm watch by guard and outcome (passed, failed, inconclusive)",
    ),
    "mfsm_watch_held": ("gauge", (), "1 while a hold of watch stands (advance and ramp up refused)"),
    "mfsm_notify_pending": ("gauge", ("target",), "Events a [[notify]] target has still to receive"),
    "mfsm_notify_failures": ("gauge", ("target",), "Failed deliveries in a row of a [[notify]] target"),
}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One read of everything `serve` shows."""

    status: commands.Status
    transitions: Counter[tuple[str, str, str]]
    backfill: BackfillProgress | None
    validation: ValidationRun | None
    repair_open: int
    #: (guard, outcome) -> how many `watch_verdict` events.
    watch_verdicts: dict[tuple[str, str], int] = field(default_factory=dict)
    #: The seq of the hold of `watch` that stands, or None.
    held_seq: int | None = None

    def details(self) -> dict[str, Any]:
        """What the status page shows besides `status --json` and `history --json`."""
        state = self.status.state
        backfill = self.backfill
        validation = self.validation
        return {
            "phase_entered_at": state.phase_entered_at.isoformat(),
            "last_seq": state.last_seq,
            "lease_holder": state.lease_holder if state.lease_live() else None,
            "repair_log_open": self.repair_open,
            "backfill": None
            if backfill is None
            else {
                "copied": backfill.copied,
                "done": backfill.done,
                "started_at": backfill.started_at.isoformat(),
                "updated_at": backfill.updated_at.isoformat(),
                "rate": backfill_rate(backfill),
            },
            "validate": None
            if validation is None
            else {
                "ok": validation.ok,
                "phase": validation.phase,
                "finished_at": validation.finished_at.isoformat(),
                **{kind: validation.summary.get(kind) for kind in VALIDATE_KINDS},
            },
            "ledger_error": self.status.ledger_error,
            "watch_held_seq": self.held_seq,
        }


def edge_label(source: object, dest: object) -> str:
    return f"{'' if source is None else source}->{dest}"


def read_snapshot(settings: Settings, migration: str, store: Journal) -> Snapshot:
    """Everything the metrics and the page show, read now."""
    status = commands.status(settings, migration, store)
    transitions: Counter[tuple[str, str, str]] = Counter(
        (str(e.trigger), edge_label(e.source, e.dest), e.status)
        for e in store.journal(status.state, with_steps=False)
    )
    return Snapshot(
        status=status,
        transitions=transitions,
        backfill=backfill_progress(store, migration),
        validation=latest_validation(store, migration),
        repair_open=open_entries(store, migration),
        watch_verdicts=_watch_verdicts(store, migration),
        held_seq=None if (held := store.standing_hold(status.state)) is None else held.seq,
    )


def _watch_verdicts(store: Journal, migration: str) -> dict[tuple[str, str], int]:
    from ..journal.outbox import watch_verdict_counts

    with store.transaction(readonly=True) as conn:
        return watch_verdict_counts(conn, migration)


def backfill_rate(progress: BackfillProgress) -> float:
    seconds = (progress.updated_at - progress.started_at).total_seconds()
    return round(progress.copied / seconds, 1) if seconds > 0 else 0.0


class MigrationCollector(Collector):
    """The `METRICS` of one migration, read by `read` at each scrape. A read that fails (the
    database is down, the migration is gone) gives `mfsm_up 0` alone, and is logged."""

    def __init__(self, migration: str, read: Callable[[], Snapshot]) -> None:
        self.migration = migration
        self._read = read

    def _family(self, name: str) -> GaugeMetricFamily | CounterMetricFamily:
        kind, labels, text = METRICS[name]
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        return cls(name.removesuffix("_total"), text, labels=["migration", *labels])

    def _one(self, name: str, value: float, *labels: str) -> Metric:
        family = self._family(name)
        family.add_metric([self.migration, *labels], value)
        return family

    def collect(self) -> Iterator[Metric]:
        try:
            snapshot = self._read()
        except MigrationFSMError as exc:
            log.warning("serve_read_failed", migration=self.migration, error=redact_text(str(exc)))
            yield self._one("mfsm_up", 0)
            return
        yield self._one("mfsm_up", 1)
        yield from self._state(snapshot)
        yield from self._data(snapshot)
        yield from self._workers(snapshot)
        yield from self._watch(snapshot)

    def _state(self, snapshot: Snapshot) -> Iterator[Metric]:
        state = snapshot.status.state
        phase = self._family("mfsm_phase")
        for each in PHASES:
            phase.add_metric([self.migration, str(each)], 1 if each is state.phase else 0)
        yield phase
        yield self._one("mfsm_percent", state.percent)
        yield self._one("mfsm_version", state.version)
        yield self._one("mfsm_phase_seconds", (utcnow() - state.phase_entered_at).total_seconds())
        yield self._one("mfsm_transition_in_progress", int(state.in_progress_seq is not None))
        paused = self._family("mfsm_paused")
        for side in ("old", "new"):
            paused.add_metric([self.migration, side], int(state.paused_side == side))
        yield paused
        live = state.lease_live()
        yield self._one("mfsm_lease_held", int(live), (state.lease_holder or "") if live else "")
        transitions = self._family("mfsm_transitions_total")
        for (trigger, edge, status), count in sorted(snapshot.transitions.items()):
            transitions.add_metric([self.migration, trigger, edge, status], count)
        yield transitions

    def _data(self, snapshot: Snapshot) -> Iterator[Metric]:
        backfill = snapshot.backfill
        yield self._one("mfsm_backfill_copied", 0 if backfill is None else backfill.copied)
        yield self._one("mfsm_backfill_done", int(backfill is not None and backfill.done))
        yield self._one("mfsm_backfill_rate", 0 if backfill is None else backfill_rate(backfill))
        validation = snapshot.validation
        yield self._one("mfsm_validate_ok", int(validation is not None and validation.ok))
        kinds = self._family("mfsm_validate_tasks")
        for kind in VALIDATE_KINDS:
            value = 0 if validation is None else validation.summary.get(kind) or 0
            kinds.add_metric([self.migration, kind], float(value))
        yield kinds
        yield self._one(
            "mfsm_validate_timestamp_seconds",
            0 if validation is None else validation.finished_at.timestamp(),
        )
        yield self._one("mfsm_repair_log_open", snapshot.repair_open)

    def _workers(self, snapshot: Snapshot) -> Iterator[Metric]:
        workers = self._family("mfsm_workers")
        for side, judged in sorted((snapshot.status.workers or {}).items()):
            counts = {"live": judged.live, "acknowledged": judged.acknowledged, "gone": judged.gone}
            for state in WORKER_STATES:
                workers.add_metric([self.migration, side, state], len(counts[state]))
        yield workers
        ledger = snapshot.status.ledger
        tasks = self._family("mfsm_ledger_tasks")
        refusals = self._family("mfsm_ledger_refusals_total")
        if ledger is not None:
            for state in LEDGER_STATES:
                tasks.add_metric([self.migration, state], getattr(ledger, state))
            for side in ("old", "new"):
                refusals.add_metric([self.migration, side], ledger.refused_by_side.get(side, 0))
        yield tasks
        yield refusals
        yield self._one("mfsm_ledger_executed_twice", 0 if ledger is None else ledger.executed_twice)

    def _watch(self, snapshot: Snapshot) -> Iterator[Metric]:
        verdicts = self._family("mfsm_watch_verdicts_total")
        for (guard, outcome), count in sorted(snapshot.watch_verdicts.items()):
            verdicts.add_metric([self.migration, guard, outcome], count)
        yield verdicts
        yield self._one("mfsm_watch_held", int(snapshot.held_seq is not None))
        pending = self._family("mfsm_notify_pending")
        failures = self._family("mfsm_notify_failures")
        for target in snapshot.status.notify:
            pending.add_metric([self.migration, target.name], target.pending)
            failures.add_metric([self.migration, target.name], target.failures)
        yield pending
        yield failures
