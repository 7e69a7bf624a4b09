"""The client's counters in Prometheus, when the application has `prometheus_client`.

Every `PhaseClient`, `DualWriter`, `FallbackReader` (and their asyncio twins) and
`WorkerGate` is tracked here when it is made; the first one registers `ClientCollector` in
`prometheus_client`'s default registry, so an application that already serves `/metrics`
gets the migration's figures with no code of its own. The collector reads each object's
`counters()` at scrape time: nothing is added to a write, a read or a dequeue. Without
`prometheus_client` nothing is imported and nothing is tracked.

Metric names are `mfsm_client_<part>_<counter>` (parts: `phase`, `writer`, `reader`,
`gate`), `_total` for the counts, with the labels `migration` and `side` (the gate's side;
empty for the others). Objects of one part, migration and side are added up (a count) or
taken at their highest (a version, `stale`) or lowest (`may_consume`). An object stops being
counted when it is closed or collected, so a count can go down with it: Prometheus reads
that as a counter reset, as after a restart.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Final, Protocol

from ._log import log

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from prometheus_client.metrics_core import Metric


class Counted(Protocol):
    def counters(self) -> dict[str, Any]: ...


#: Figures that are a state, not a count: (how objects of one label set are combined).
GAUGES: Final[dict[str, Callable[[list[float]], float]]] = {
    "version": max,
    "applied_version": max,
    "stale": max,
    "may_consume": min,
    "pending_finishes": sum,
    "repair_spooled": sum,
}

_lock = threading.Lock()
#: object -> (part, migration, side), for as long as the object lives and is not closed.
_tracked: weakref.WeakKeyDictionary[Any, tuple[str, str, str]] = weakref.WeakKeyDictionary()
_collector: ClientCollector | None = None


def track(obj: Counted, part: str, migration: str, side: str = "") -> None:
    """Count `obj` under `part` in the client metrics (a no-op without `prometheus_client`)."""
    global _collector  # noqa: PLW0603 - one collector per process, registered once
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    with _lock:
        _tracked[obj] = (part, migration, side)
        if _collector is None:
            _collector = ClientCollector()
            REGISTRY.register(_collector)


def untrack(obj: object) -> None:
    """Stop counting `obj` (its `close()` calls this)."""
    with _lock:
        _tracked.pop(obj, None)


def metric_name(part: str, counter: str) -> str:
    return f"mfsm_client_{part}_{counter}"


class ClientCollector:
    """Reads the tracked objects' `counters()` at each scrape."""

    def describe(self) -> list[Metric]:
        return []  # the names depend on what is tracked: no checks at registration

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with _lock:
            tracked = list(_tracked.items())
        values: dict[tuple[str, str], dict[tuple[str, str], list[float]]] = {}
        for obj, (part, migration, side) in tracked:
            try:
                counters = obj.counters()
            except Exception as exc:  # noqa: BLE001 - one broken object must not break the scrape
                log.warning("migration-fsm %s counters could not be read: %s", part, exc)
                continue
            for counter, value in counters.items():
                values.setdefault((part, counter), {}).setdefault((migration, side), []).append(float(value))
        for (part, counter), by_labels in sorted(values.items()):
            name = metric_name(part, counter)
            combine = GAUGES.get(counter)
            family: GaugeMetricFamily | CounterMetricFamily
            if combine is None:
                family = CounterMetricFamily(
                    name, f"migration-fsm {part} {counter}", labels=["migration", "side"]
                )
            else:
                family = GaugeMetricFamily(
                    name, f"migration-fsm {part} {counter}", labels=["migration", "side"]
                )
            for labels, each in sorted(by_labels.items()):
                family.add_metric(list(labels), (combine or sum)(each))
            yield family
