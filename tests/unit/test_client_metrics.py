"""The client's counters reach `prometheus_client`'s default registry by themselves: a
scrape of the application's own `/metrics` (here `generate_latest`, read back with
Prometheus' parser) carries every counter of every live client object, labelled with its
migration and side, and drops an object once it is closed."""

from __future__ import annotations

import gc
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from migration_fsm import commands
from migration_fsm.client import DualWriter, FallbackReader, PhaseClient, WorkerGate, metrics
from migration_fsm.client.metrics import GAUGES, metric_name
from migration_fsm.config import Settings
from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import TaskRecord, TaskStatus

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def scrape(migration: str) -> dict[tuple[str, str], float]:
    """(sample name, side) -> value, for `migration`'s client samples."""
    found = {}
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for sample in family.samples:
            if sample.name.startswith("mfsm_client_") and sample.labels.get("migration") == migration:
                found[(sample.name, sample.labels["side"])] = sample.value
    return found


def task(key: str) -> TaskRecord:
    return TaskRecord(
        key=key, type="email", payload={}, status=TaskStatus.PENDING, created_at=NOW, updated_at=NOW
    )


def sample_name(part: str, counter: str) -> str:
    name = metric_name(part, counter)
    return name if counter in GAUGES else f"{name}_total"


def test_every_counter_of_every_client_object_is_scraped(make_settings: Callable[..., Settings]) -> None:
    gc.collect()  # objects other tests left behind do not count here anyway: another migration
    settings = make_settings()
    migration = f"metrics-{uuid.uuid4().hex[:8]}"
    commands.init(settings, migration)
    commands.advance(settings, migration)  # dual_write: both sides written
    client = PhaseClient(settings.database_url, migration=migration, ttl=0.05)
    old, new = MemoryTaskStore(), MemoryTaskStore()
    writer = DualWriter(client, old, new)
    reader = FallbackReader(client, old, new)
    gate = WorkerGate(client, "old", "metrics-worker", background=False)
    try:
        client.refresh()
        for i in range(3):
            writer.write(task(f"k{i}"))
        reader.get("k0")
        with gate.dequeuing():
            assert gate.may_consume()

        found = scrape(migration)
        for part, obj, side in (
            ("phase", client, ""),
            ("writer", writer, ""),
            ("reader", reader, ""),
            ("gate", gate, "old"),
        ):
            for counter, value in obj.counters().items():
                assert (sample_name(part, counter), side) in found, (part, counter)
                if counter not in {"stale_seconds", "refreshes", "version", "applied_version"}:
                    assert value == found[(sample_name(part, counter), side)], (part, counter)
        assert 3 == found[("mfsm_client_writer_writes_total", "")]
        assert 3 == found[("mfsm_client_writer_second_writes_total", "")]
        assert 1 == found[("mfsm_client_reader_reads_total", "")]
        assert 1 == found[("mfsm_client_gate_may_consume", "old")]

        second = DualWriter(client, old, new)  # two writers of one migration are added up
        second.write(task("k9"))
        assert 4 == scrape(migration)[("mfsm_client_writer_writes_total", "")]
        second.close()
        writer.close()
        assert ("mfsm_client_writer_writes_total", "") not in scrape(migration)
    finally:
        gate.close()
        writer.close()
        client.close()
    assert not any(
        name.startswith(("mfsm_client_gate", "mfsm_client_phase")) for name, _ in scrape(migration)
    )


class _Counted:
    """A tracked object whose `counters()` answers `values`, or raises them."""

    def __init__(self, values: dict[str, int] | Exception) -> None:
        self.values = values

    def counters(self) -> dict[str, int]:
        if isinstance(self.values, Exception):
            raise self.values
        return self.values


def test_an_object_whose_counters_fail_is_left_out_with_a_warning_and_the_rest_scraped(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    migration = f"broken-{uuid.uuid4().hex[:8]}"
    broken = _Counted(RuntimeError("store closed"))
    good = _Counted({"writes": 3})
    metrics.track(broken, "writer", migration, "old")  # scraped before `good`
    metrics.track(good, "writer", migration, "new")
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    try:
        assert {(sample_name("writer", "writes"), "new"): 3.0} == scrape(migration)
    finally:
        metrics.untrack(broken)
        metrics.untrack(good)
    assert ["migration-fsm writer counters could not be read: store closed"] == [
        r.getMessage() for r in caplog.records if "store closed" in r.getMessage()
    ]
