"""What the client decides, pinned: which side is written first, what an interrupt between
the two writes leaves, that a stale version never moves the snapshot back, where reads and
shadow reads go; the sync and async twins alike."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
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


def test_a_strict_writer_raises_dual_write_error_after_recording() -> None:
    """A strict writer's failed second write is recorded, then raised as DualWriteError
    (exit code 1, defined in `exceptions`)."""
    calls: list[tuple[str, str, str]] = []
    old, new = Ordered("old", calls), Ordered("new", calls)
    new.fail = ConnectionError("down")
    repair = MemoryRepairLog()
    with pytest.raises(DualWriteError, match="write of k to new failed: ConnectionError: down") as info:
        DualWriter(fixed(Phase.DUAL_WRITE), old, new, strict=True, repair=repair).write(record("k"))
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


# -- the snapshot never goes back ------------------------------------------------------


@pytest.fixture
def dual_write_client(engine: Migration, upgraded_url: str) -> Iterator[PhaseClient]:
    """A client that has seen the migration reach `dual_write`."""
    engine.advance()
    version = engine.store.get("default").version
    with PhaseClient(upgraded_url, ttl=0.05) as client:
        assert wait_for(lambda: client.snapshot().version == version)
        yield client


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_stale_poll_does_not_move_the_snapshot_back(
    dual_write_client: PhaseClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that returns an older version (it raced a newer notification) is ignored."""
    client = dual_write_client
    before = client.snapshot()
    older = ("preparation", 0, before.version - 1)
    monkeypatch.setattr(client, "_read_sqlite", lambda: older)
    refreshes = client.counters()["refreshes"]
    assert wait_for(lambda: client.counters()["refreshes"] >= refreshes + 3)
    snap = client.snapshot()
    assert (Phase.DUAL_WRITE, before.version, False) == (snap.phase, snap.version, snap.stale)
    assert before.read_at == snap.read_at


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_stale_notification_does_not_move_the_snapshot_back(engine: Migration, upgraded_url: str) -> None:
    """A NOTIFY carrying an older version (delivered late) leaves the snapshot where it is."""
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
