"""What the client decides, pinned: which side is written first, what an interrupt between
the two writes leaves, that a read made earlier never lands after a later one (a late
NOTIFY moves nothing), where reads and shadow reads go; the sync and async twins alike."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

from migration_fsm.client import (
    AsyncDualWriter,
    AsyncFallbackReader,
    DualWriteError,
    DualWriter,
    FallbackReader,
    PhaseClient,
    RepairLog,
)
from migration_fsm.client._base import shadows
from migration_fsm.exceptions import MigrationFSMError
from migration_fsm.fsm import ROUTING, Phase, Routing, routing_for
from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import TaskRecord, TaskStatus
from migration_fsm.tools.reconcile import open_entries
from tests.support.clock import FakeClock

if TYPE_CHECKING:
    from migration_fsm.journal import Journal
    from migration_fsm.migration import Migration

NOW = datetime(2026, 1, 1, tzinfo=UTC)

#: DESIGN.md section 2, written out: the sides a write reaches, authoritative first.
WRITE_ORDER: dict[tuple[Phase, int], list[str]] = {
    (Phase.PREPARATION, 0): ["old"],
    (Phase.DUAL_WRITE, 0): ["old", "new"],
    (Phase.CUTOVER, 0): ["new", "old"],
    (Phase.CUTOVER, 50): ["new", "old"],
    (Phase.CUTOVER, 100): ["new", "old"],
    (Phase.CLEANUP, 100): ["new"],
    (Phase.COMPLETE, 100): ["new"],
}


def record(key: str) -> TaskRecord:
    return TaskRecord(
        key=key,
        type="email",
        payload={"to": f"{key}@example.com"},
        status=TaskStatus.PENDING,
        created_at=NOW,
        updated_at=NOW,
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `predicate` until true or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


class FixedClient:
    """A stand-in `PhaseClient` held at one phase and percent (routing from the table)."""

    url = "sqlite://"
    migration = "default"

    def __init__(self, phase: Phase, percent: int = 0) -> None:
        self.phase = phase
        self.percent = percent

    def routing(self, key: str | None = None) -> Routing:
        return routing_for(self.phase, self.percent, key)


def fixed(phase: Phase, percent: int = 0) -> PhaseClient:
    return cast("PhaseClient", FixedClient(phase, percent))


class MemoryRepairLog(RepairLog):
    """A repair log kept in a list, for the tests that need no database."""

    def __init__(self) -> None:
        super().__init__("sqlite://", "default")
        self.entries: list[tuple[str, str, str]] = []

    def record(self, key: str, side: str, error: str) -> None:
        self.entries.append((key, side, error))


class Ordered(MemoryTaskStore):
    """A memory store that notes each call in a log shared with the other side."""

    def __init__(self, name: str, calls: list[tuple[str, str, str]]) -> None:
        super().__init__(name)
        self.calls = calls
        self.fail: BaseException | None = None
        self.fail_gets = False

    def put(self, record: TaskRecord) -> None:
        self.calls.append((self.name, "put", record.key))
        super().put(record)

    def put_forward(self, record: TaskRecord) -> bool:
        self.calls.append((self.name, "put_forward", record.key))
        if self.fail is not None:
            raise self.fail
        return super().put_forward(record)

    def get(self, key: str) -> TaskRecord | None:
        if self.fail_gets:
            raise ConnectionError(f"{self.name} is down")
        return super().get(key)


class Interrupted(BaseException):
    """A crash that no `except Exception` can swallow."""


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(("phase", "percent"), sorted(WRITE_ORDER), ids=str)
def test_the_authoritative_side_is_written_first_and_answers(
    phase: Phase, percent: int, asynchronous: bool
) -> None:
    """Each phase writes its authoritative side first (returned), then the other side if it
    writes both; a writer with the sides inverted fails here, in both twins."""
    for key in ("k1", "k2", "k3", "k4"):  # at 50 percent these keys fall on both sides of the split
        calls: list[tuple[str, str, str]] = []
        old, new = Ordered("old", calls), Ordered("new", calls)
        repair = MemoryRepairLog()
        writer: Any
        if asynchronous:
            writer = AsyncDualWriter(fixed(phase, percent), old, new, repair=repair)
            side = asyncio.run(writer.write(record(key)))
        else:
            writer = DualWriter(fixed(phase, percent), old, new, repair=repair)
            side = writer.write(record(key))
        sides = WRITE_ORDER[phase, percent]
        expected = [(s, "put_forward", key) for s in sides]
        assert (sides[0], expected, []) == (side, calls, repair.entries)
        assert (1, len(sides) - 1, 0) == (
            writer.counters()["writes"],
            writer.counters()["second_writes"],
            writer.counters()["repair_entries"],
        )
        assert routing_for(phase, percent, key).authoritative == side


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(("phase", "percent"), sorted(WRITE_ORDER), ids=str)
@pytest.mark.parametrize("reached", [TaskStatus.RUNNING, TaskStatus.COMPLETED, TaskStatus.FAILED], ids=str)
def test_a_resent_task_keeps_the_status_it_reached_on_both_sides(
    phase: Phase, percent: int, asynchronous: bool, reached: TaskStatus
) -> None:
    """An at-least-once producer re-sends a task the authoritative side already runs or ran:
    nothing changes on either side (it is not run again), the writer answers the
    authoritative side as usual and counts the re-send as kept."""
    for key in ("k1", "k2", "k3", "k4"):
        calls: list[tuple[str, str, str]] = []
        old, new = Ordered("old", calls), Ordered("new", calls)
        sides = WRITE_ORDER[phase, percent]
        authoritative = routing_for(phase, percent, key).authoritative
        ran = record(key).model_copy(update={"status": reached, "attempts": 1})
        MemoryTaskStore.put(old if authoritative == "old" else new, ran)
        writer: Any
        if asynchronous:
            writer = AsyncDualWriter(fixed(phase, percent), old, new, repair=MemoryRepairLog())
            side = asyncio.run(writer.write(record(key)))
        else:
            writer = DualWriter(fixed(phase, percent), old, new, repair=MemoryRepairLog())
            side = writer.write(record(key))
        assert (sides[0], [(sides[0], "put_forward", key)]) == (side, calls)
        mine, other = (old, new) if authoritative == "old" else (new, old)
        assert (ran, None) == (MemoryTaskStore.get(mine, key), MemoryTaskStore.get(other, key))
        assert (1, 1, 0) == (
            writer.counters()["writes"],
            writer.counters()["resends_kept"],
            writer.counters()["second_writes"],
        )


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("phase", [Phase.DUAL_WRITE, Phase.CUTOVER])
def test_a_failed_second_write_leaves_the_copy_on_the_authoritative_side(
    phase: Phase, asynchronous: bool
) -> None:
    """When the second write fails, the authoritative side holds the task and the repair
    entry names the other side."""
    calls: list[tuple[str, str, str]] = []
    stores = {"old": Ordered("old", calls), "new": Ordered("new", calls)}
    authoritative, other = ("old", "new") if phase is Phase.DUAL_WRITE else ("new", "old")
    stores[other].fail = ConnectionError("down")
    repair = MemoryRepairLog()
    if asynchronous:
        writer: Any = AsyncDualWriter(fixed(phase), stores["old"], stores["new"], repair=repair)
        side = asyncio.run(writer.write(record("k")))
    else:
        side = DualWriter(fixed(phase), stores["old"], stores["new"], repair=repair).write(record("k"))
    assert authoritative == side
    assert (record("k"), None) == (stores[authoritative].get("k"), stores[other].get("k"))
    assert [("k", other, "ConnectionError: down")] == repair.entries


@pytest.mark.parametrize("crash", [KeyboardInterrupt(), Interrupted()], ids=["KeyboardInterrupt", "crash"])
@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
def test_an_interrupt_between_the_sync_writes_leaves_a_repair_entry(
    crash: BaseException, strict: bool
) -> None:
    """A KeyboardInterrupt (or any BaseException) in the second write is recorded for
    `reconcile`, then goes on unchanged: not swallowed, not turned into DualWriteError."""
    calls: list[tuple[str, str, str]] = []
    old, new = Ordered("old", calls), Ordered("new", calls)
    new.fail = crash
    repair = MemoryRepairLog()
    writer = DualWriter(fixed(Phase.DUAL_WRITE), old, new, strict=strict, repair=repair)
    with pytest.raises(type(crash)):
        writer.write(record("k"))
    expected = (
        "interrupted between the two writes" if isinstance(crash, KeyboardInterrupt) else "Interrupted: "
    )
    assert [("k", "new", expected)] == repair.entries
    assert (1, 1, 0) == (
        writer.counters()["writes"],
        writer.counters()["repair_entries"],
        writer.counters()["second_writes"],
    )


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_strict_writer_raises_dual_write_error_after_recording(asynchronous: bool) -> None:
    """A strict writer's failed second write is recorded, then raised as DualWriteError
    (exit code 1, defined in `exceptions`)."""
    calls: list[tuple[str, str, str]] = []
    old, new = Ordered("old", calls), Ordered("new", calls)
    new.fail = ConnectionError("down")
    repair = MemoryRepairLog()
    kind: Any = AsyncDualWriter if asynchronous else DualWriter
    writer = kind(fixed(Phase.DUAL_WRITE), old, new, strict=True, repair=repair)
    with pytest.raises(DualWriteError, match="write of k to new failed: ConnectionError: down") as info:
        _write(asynchronous, writer, record("k"))
    assert isinstance(info.value, MigrationFSMError)
    assert (1, 1) == (info.value.exit_code, len(repair.entries))


def test_an_interrupt_between_the_writes_reaches_the_real_repair_log(
    engine: Migration, upgraded_url: str, store: Journal
) -> None:
    """Through the real repair log (SQLite and PostgreSQL): a KeyboardInterrupt after the
    authoritative write leaves one open entry that `reconcile` will replay."""
    engine.advance()
    calls: list[tuple[str, str, str]] = []
    old, new = Ordered("old", calls), Ordered("new", calls)
    new.fail = KeyboardInterrupt()
    with PhaseClient(upgraded_url, ttl=30) as client, DualWriter(client, old, new) as writer:
        assert Phase.DUAL_WRITE == client.phase
        with pytest.raises(KeyboardInterrupt):
            writer.write(record("k"))
    assert (record("k"), 1) == (old.get("k"), open_entries(store, "default"))


def test_the_repair_log_stores_an_open_entry_and_reopens_after_close(store: Journal) -> None:
    """A repair entry is open, has had no replay attempt yet, and keeps the first 2,000
    characters of the error; a closed log opens its engine again on the next entry."""
    from sqlalchemy import select

    from migration_fsm.journal import repair_log_table, utcnow

    before = utcnow()
    log = RepairLog(store.url, "default")
    log.record("k1", "new", "E" * 1999 + "xyz")
    log.close()
    log.close()
    log.record("k2", "old", "boom")
    log.close()
    with store.transaction(readonly=True) as conn:
        rows = conn.execute(select(repair_log_table).order_by(repair_log_table.c.id)).mappings().all()
    assert [("k1", "new", "E" * 1999 + "x", "open", 0), ("k2", "old", "boom", "open", 0)] == [
        (r["key"], r["side"], r["error"], r["status"], r["attempts"]) for r in rows
    ]
    assert all(before <= r["created_at"] <= utcnow() for r in rows)


# -- the snapshot never goes back ------------------------------------------------------


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_read_that_began_earlier_never_lands_after_a_later_one(
    engine: Migration, upgraded_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old rule's case, kept: a slow read made before a transition must not overwrite a
    read made after it. Reads are serialized, so the later read waits for the slow one and
    lands last (the slow one's older result is adopted first, then replaced)."""
    engine.advance()
    with PhaseClient(upgraded_url, ttl=3600) as client:
        assert Phase.DUAL_WRITE == client.phase
        real_read = client._read_sqlite
        reading, release = threading.Event(), threading.Event()

        def slow_read() -> tuple[Any, ...] | None:
            row = real_read()  # dual_write, read before the transition below
            monkeypatch.setattr(client, "_read_sqlite", real_read)
            reading.set()
            release.wait(10)
            return row

        monkeypatch.setattr(client, "_read_sqlite", slow_read)
        slow = threading.Thread(target=client.refresh)
        slow.start()
        assert reading.wait(10)
        engine.advance()  # cutover, after the slow read began
        later = threading.Thread(target=client.refresh)
        later.start()
        time.sleep(0.05)
        release.set()
        slow.join(10)
        later.join(10)
        assert (Phase.CUTOVER, engine.store.get("default").version) == (
            client.phase,
            client.snapshot().version,
        )
        assert 0 == client.counters()["restores"]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_stale_notification_does_not_move_the_snapshot_back(engine: Migration, upgraded_url: str) -> None:
    """A NOTIFY carrying an older version (delivered late) leaves the snapshot where it is:
    it only wakes a read of the row (which says the current version)."""
    from sqlalchemy import text

    engine.advance()
    with PhaseClient(upgraded_url, ttl=30) as client:
        version = engine.store.get("default").version
        assert (Phase.DUAL_WRITE, version) == (client.phase, client.snapshot().version)
        stale = {"migration": "default", "phase": "preparation", "percent": 0, "version": version - 1}
        with engine.store.engine.connect() as conn:
            conn.execute(text("SELECT pg_notify('migration_fsm', :p)"), {"p": json.dumps(stale)})
            conn.commit()
        assert wait_for(lambda: client.counters()["notifications"] == 1)
        snap = client.snapshot()
        assert (Phase.DUAL_WRITE, version) == (snap.phase, snap.version)
        engine.advance()  # a newer one still lands
        assert wait_for(lambda: client.phase is Phase.CUTOVER)


# -- reads --------------------------------------------------------------------------


def test_shadow_reads_follow_the_routing_table() -> None:
    """Reads are shadowed exactly where reads come from old, old is authoritative and new
    is written: `dual_write` alone, as before the rule was read off the table."""
    for phase in ROUTING:
        for percent in (0, 50, 100):
            for key in (None, "k1", "k2", "k3"):
                assert (phase is Phase.DUAL_WRITE) == shadows(routing_for(phase, percent, key))


def _write(asynchronous: bool, writer: Any, rec: TaskRecord) -> str:
    result = writer.write(rec)
    return str(asyncio.run(result) if asynchronous else result)


def _read(asynchronous: bool, reader: Any, key: str) -> TaskRecord | None:
    if asynchronous:
        return cast("TaskRecord | None", asyncio.run(reader.get(key)))
    return cast("TaskRecord | None", reader.get(key))


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(("phase", "percent"), sorted(WRITE_ORDER), ids=str)
def test_readers_read_fall_back_and_shadow_per_routing(
    phase: Phase, percent: int, asynchronous: bool
) -> None:
    """Both readers: old or new per the key's routing, a fallback to old where the routing
    has one (a miss or an error on new), and a shadow read of new only in `dual_write`."""
    calls: list[tuple[str, str, str]] = []
    old, new = Ordered("old", calls), Ordered("new", calls)
    kind = AsyncFallbackReader if asynchronous else FallbackReader
    reader = kind(fixed(phase, percent), old, new, shadow_sample=1.0)
    keys = [f"k{i}" for i in range(8)]
    for key in keys:
        old.put(record(key))
    expected_fallbacks = 0
    for key in keys:
        route = routing_for(phase, percent, key)
        got = _read(asynchronous, reader, key)
        if route.read_from == "old" or route.read_fallback == "old":
            assert record(key) == got
        else:
            assert got is None
        expected_fallbacks += route.read_from == "new" and route.read_fallback == "old"
    new.fail_gets = True
    errors = 0
    for key in keys:
        route = routing_for(phase, percent, key)
        if route.read_from == "new" and route.read_fallback is None:
            with pytest.raises(ConnectionError):
                _read(asynchronous, reader, key)
        else:
            assert record(key) == _read(asynchronous, reader, key)
            errors += route.read_from == "new"
    counters = reader.counters()
    shadowed = 2 * len(keys) if phase is Phase.DUAL_WRITE else 0
    assert (2 * len(keys), expected_fallbacks + errors, errors) == (
        counters["reads"],
        counters["fallbacks"],
        counters["new_errors"],
    )
    # the shadow reads of the second round failed on new: counted as tried, not as reads
    assert (shadowed // 2, shadowed // 2) == (counters["shadow_reads"], counters["shadow_mismatches"])


def test_per_key_routing_equals_the_table_in_every_phase(tmp_path: Path) -> None:
    """`routing(key)` (the hot path, with its own copy of the bucket rule) answers what
    `routing_for` does for every phase, percent and key; `routing()` the whole-phase row."""
    with PhaseClient(f"sqlite:///{tmp_path / 'absent.db'}", ttl=60) as client:
        version = 0
        for phase in ROUTING:
            for percent in (0, 1, 30, 99, 100):
                version += 1
                client._install(phase, percent, version)  # what a read of this state installs
                assert routing_for(phase, percent) == client.routing()
                for i in range(200):
                    assert routing_for(phase, percent, f"k{i}") == client.routing(f"k{i}")


class PlainStore:
    """A store with `put` and `get` only: no `put_forward` (the `ForwardPut` capability)."""

    def __init__(self) -> None:
        self.records: dict[str, TaskRecord] = {}

    def put(self, record: TaskRecord) -> None:
        self.records[record.key] = record

    def get(self, key: str) -> TaskRecord | None:
        return self.records.get(key)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_second_write_uses_put_forward_when_the_store_has_it_and_counts_writes_behind(
    asynchronous: bool,
) -> None:
    """The second write goes through `put_forward` where the store offers it (a write behind
    the stored state is counted, not applied), through `put` where it does not (never
    counted as behind); the writer is lenient unless asked to be strict."""
    finished = record("done").model_copy(update={"status": TaskStatus.COMPLETED})
    forward = MemoryTaskStore("new", [finished])
    plain = PlainStore()
    counters: list[dict[str, int]] = []
    for new in (forward, plain):
        repair = MemoryRepairLog()
        kind: Any = AsyncDualWriter if asynchronous else DualWriter
        writer = kind(fixed(Phase.DUAL_WRITE), MemoryTaskStore("old"), new, repair=repair)
        assert writer.strict is False
        for key in ("fresh", "done"):
            result = writer.write(record(key))
            assert "old" == (asyncio.run(result) if asynchronous else result)
        assert [] == repair.entries
        counters.append(writer.counters())
    assert (TaskStatus.COMPLETED, record("fresh")) == (forward.get("done").status, forward.get("fresh"))  # type: ignore[union-attr]
    assert {"fresh": record("fresh"), "done": record("done")} == plain.records
    assert [(2, 1), (2, 0)] == [(c["second_writes"], c["second_writes_behind"]) for c in counters]


def _shadowed(asynchronous: bool, caplog: pytest.LogCaptureFixture) -> tuple[dict[str, int], list[Any]]:
    old, new = MemoryTaskStore("old"), MemoryTaskStore("new")
    old.put(record("k1"))
    new.put(record("k1").model_copy(update={"status": TaskStatus.RUNNING}))
    old.put(record("k2"))  # not on new yet
    new.put(record("k3"))  # not on old
    old.put(record("k5"))
    new.put(record("k5"))
    kind = AsyncFallbackReader if asynchronous else FallbackReader
    reader = kind(fixed(Phase.DUAL_WRITE), old, new, shadow_sample=1.0)
    with caplog.at_level("WARNING", logger="migration_fsm.client"):
        for key in ("k1", "k2", "k3", "k4", "k5"):
            _read(asynchronous, reader, key)
    return reader.counters(), [r for r in caplog.records if r.name == "migration_fsm.client"]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_shadow_mismatch_is_logged_naming_the_key_and_what_differs(
    asynchronous: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Each mismatching shadow read logs one warning with the key and the differing fields
    (or the side the task is missing on); agreeing reads, a miss on both included, log nothing."""
    counters, records = _shadowed(asynchronous, caplog)
    assert (5, 3) == (counters["shadow_reads"], counters["shadow_mismatches"])
    assert [
        "shadow read of k1 differs on status",
        "shadow read of k2 differs on (missing on new)",
        "shadow read of k3 differs on (missing on old)",
    ] == [r.getMessage() for r in records]
    assert [("default", "k1", ["status"]), ("default", "k2", ["(missing on new)"])] == [
        (r.migration, r.key, r.fields) for r in records[:2]
    ]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_failed_shadow_read_is_logged_and_the_primary_answers(
    asynchronous: bool, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[str, str, str]] = []
    old, new = Ordered("old", calls), Ordered("new", calls)
    old.put(record("k1"))
    new.fail_gets = True
    kind = AsyncFallbackReader if asynchronous else FallbackReader
    reader = kind(fixed(Phase.DUAL_WRITE), old, new, shadow_sample=1.0)
    with caplog.at_level("WARNING", logger="migration_fsm.client"):
        assert record("k1") == _read(asynchronous, reader, "k1")
    assert ["shadow read of k1 failed: ConnectionError: new is down"] == [
        r.getMessage() for r in caplog.records if r.name == "migration_fsm.client"
    ]


def test_shadow_sample_is_a_probability_drawn_per_read() -> None:
    """`shadow_sample` p shadows a read when the draw is below p: never at 0, always at 1."""
    for bad in (-0.1, 1.01, 2.0):
        with pytest.raises(ValueError, match=r"^shadow_sample must be between 0 and 1$"):
            FallbackReader(
                fixed(Phase.DUAL_WRITE), MemoryTaskStore("old"), MemoryTaskStore("new"), shadow_sample=bad
            )
    for sample, draw, shadowed in ((0.5, 0.5, 0), (0.5, 0.4999, 1), (1.0, 0.9999, 1), (0.0, 0.0, 0)):
        reader = FallbackReader(
            fixed(Phase.DUAL_WRITE), MemoryTaskStore("old"), MemoryTaskStore("new"), shadow_sample=sample
        )
        reader._random = itertools.repeat(draw).__next__
        reader.get("k1")
        assert shadowed == reader.counters()["shadow_reads"], (sample, draw)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_hit_on_new_does_not_fall_back(asynchronous: bool) -> None:
    """Once reads come from new, a task new holds is its answer: old is read only on a miss."""
    old, new = MemoryTaskStore("old"), MemoryTaskStore("new")
    old.put(record("k1"))
    newer = record("k1").model_copy(update={"status": TaskStatus.COMPLETED})
    new.put(newer)
    kind = AsyncFallbackReader if asynchronous else FallbackReader
    reader = kind(fixed(Phase.CUTOVER, 100), old, new)
    assert newer == _read(asynchronous, reader, "k1")
    assert _read(asynchronous, reader, "k2") is None  # a miss on both: old is read, and misses too
    assert (2, 1) == (reader.counters()["reads"], reader.counters()["fallbacks"])


def test_outages_their_stale_time_and_one_warning_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Stale seconds add up over outages (and stop while the client is fresh); each outage
    warns once when it starts and once when a read recovers it, a read of the same version
    included; a client that never read anything does not say it recovered."""
    from migration_fsm.client import phase as phase_module

    clock = FakeClock(100.0)
    monkeypatch.setattr(phase_module, "time", clock)
    with (
        caplog.at_level("WARNING", logger="migration_fsm.client"),
        PhaseClient(f"sqlite:///{tmp_path / 'absent.db'}", ttl=3600) as client,
    ):
        clock.now = 102.0
        assert (1, 0, 2.0, 1.0, 0.0) == _outage_counters(client)
        clock.now = 103.0
        client._install(Phase.DUAL_WRITE, 0, 3)  # the first good read: not a recovery
        clock.now = 110.0
        assert (1, 0, 3.0, 0.0, 3.0) == _outage_counters(client)
        client._failed(OSError("disk gone"))
        clock.now = 111.0
        client._failed(OSError("still gone"))
        assert client.snapshot().stale
        clock.now = 115.0
        assert (3, 1, 8.0, 1.0, 3.0) == _outage_counters(client)
        client._install(Phase.DUAL_WRITE, 0, 3)  # the same version again ends the outage
        assert not client.snapshot().stale
        clock.now = 120.0
        assert (3, 1, 8.0, 0.0, 3.0) == _outage_counters(client)
    messages = [r.getMessage() for r in caplog.records if r.name == "migration_fsm.client"]
    assert 3 == len(messages), messages
    assert messages[0].startswith(
        "migration-fsm client cannot read default, keeping phase preparation (stale): "
    )
    assert messages[1:] == [
        "migration-fsm client cannot read default, keeping phase dual_write (stale): OSError: disk gone",
        "migration-fsm client recovered: default is dual_write at 0%",
    ]
    recovered = [r for r in caplog.records if r.name == "migration_fsm.client"][-1]
    assert ("default", "dual_write", 3) == tuple(
        vars(recovered)[k] for k in ("migration", "phase", "version")
    )


def _outage_counters(client: PhaseClient) -> tuple[float, ...]:
    counters = client.counters()
    return tuple(counters[k] for k in ("refresh_errors", "outages", "stale_seconds", "stale", "version"))


def test_the_client_takes_sqlite_and_pg_urls_and_a_positive_ttl(tmp_path: Path) -> None:
    """No server needed (nothing listens on port 1): named without the word "postgresql", so
    that `make mutate`'s selection (`-k "not postgresql"`) runs it."""
    for ttl in (0, -1.0):
        with pytest.raises(ValueError, match=r"^ttl must be positive$"):
            PhaseClient(f"sqlite:///{tmp_path / 'absent.db'}", ttl=ttl)
    with pytest.raises(ValueError, match=r"supports SQLite and PostgreSQL URLs, not mysql"):
        PhaseClient("mysql://u@127.0.0.1:1/x")
    # Nothing listens on port 1: the client starts stale on its default phase.
    with PhaseClient("postgresql+psycopg://u@127.0.0.1:1/x", ttl=3600, connect_timeout=1) as client:
        assert (Phase.PREPARATION, True) == (client.phase, client.snapshot().stale)


def test_a_cancellation_between_the_async_writes_is_described_in_the_repair_entry() -> None:
    class Cancelled(MemoryTaskStore):
        async def put_forward(self, rec: TaskRecord) -> bool:  # type: ignore[override]
            raise asyncio.CancelledError

    repair = MemoryRepairLog()
    writer = AsyncDualWriter(fixed(Phase.DUAL_WRITE), MemoryTaskStore("old"), Cancelled("new"), repair=repair)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(writer.write(record("k")))
    assert [("k", "new", "cancelled between the two writes")] == repair.entries
