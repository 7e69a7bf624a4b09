"""Once the authoritative write succeeded, a dual write never loses its repair entry and never
makes the caller wait on the migration database: the entry is spooled (in memory, and in a
file when asked) and sent when the database is back. And an interrupt or a cancellation at
any moment of a dual write leaves the task on both sides, on neither, or with a repair entry
for the side that lacks it (sync and async)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from migration_fsm.client import AsyncDualWriter, DualWriter, PhaseClient
from migration_fsm.client.repair import RepairLog, RepairNotRecorded
from migration_fsm.exceptions import DualWriteError
from migration_fsm.fsm import Phase, Routing, routing_for
from migration_fsm.journal import Journal, make_engine, repair_log_table
from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import TaskRecord, TaskStatus
from tests.support.proxy import TcpProxy

AT = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def record(key: str) -> TaskRecord:
    return TaskRecord(
        key=key, type="send", payload={}, status=TaskStatus.PENDING, created_at=AT, updated_at=AT
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Client:
    """A stand-in PhaseClient held in one phase: dual_write by default (old authoritative,
    both written); cutover at 100% makes new authoritative, old still written."""

    migration = "default"

    def __init__(self, url: str, phase: Phase = Phase.DUAL_WRITE, percent: int = 0) -> None:
        self.url = url
        self.phase, self.percent = phase, percent

    def routing(self, key: str | None = None) -> Routing:
        return routing_for(self.phase, self.percent, key)


class Down(MemoryTaskStore):
    """A store whose writes fail (the second side, here)."""

    def put_forward(self, rec: TaskRecord) -> bool:
        raise ConnectionError(f"{self.name} is down")


def open_entries(url: str) -> list[tuple[str, str]]:
    with Journal.open(url) as journal, journal.transaction(readonly=True) as conn:
        rows = conn.execute(
            select(repair_log_table.c.key, repair_log_table.c.side).order_by(repair_log_table.c.id)
        )
        return [(row.key, row.side) for row in rows]


# -- the spool ---------------------------------------------------------------------------------


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_locked_migration_database_neither_blocks_nor_loses_the_entry(upgraded_url: str) -> None:
    """SQLite locked by another writer: `write` returns (while the lock is still held, so it
    did not wait for it), the entry is spooled, counted, and sent once the lock is gone."""
    holder = make_engine(upgraded_url)
    locked, release = threading.Event(), threading.Event()
    still_held = []

    def hold() -> None:
        with holder.begin() as conn:
            conn.exec_driver_sql("UPDATE mfsm_migrations SET name = name")  # take the write lock
            locked.set()
            # True: the test released us, so write() returned while we held the lock; False:
            # we gave up first, so the writer was stuck waiting for the lock.
            still_held.append(release.wait(20))

    thread = threading.Thread(target=hold)
    thread.start()
    assert locked.wait(10)
    repair = RepairLog(upgraded_url, "default", timeout_seconds=0.2, retry_seconds=0.05)
    writer = DualWriter(
        cast("PhaseClient", Client(upgraded_url)), MemoryTaskStore("old"), Down("new"), repair=repair
    )
    try:
        assert "old" == writer.write(record("k1"))  # not an exception: the task is stored on old
        assert "old" == writer.write(record("k2"))  # behind the first, in order
        assert (2, 2) == (repair.pending(), writer.counters()["repair_spooled"])
        release.set()
        thread.join(30)
        assert [True] == still_held  # write() returned while the lock was held
        assert wait_for(lambda: repair.pending() == 0)
        assert [("k1", "new"), ("k2", "new")] == open_entries(upgraded_url)
    finally:
        release.set()
        writer.close()
        holder.dispose()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_unreachable_postgresql_spools_and_sends_when_it_is_back(upgraded_url: str) -> None:
    """The migration database behind a proxy that is cut, then restored."""
    parsed = make_url(upgraded_url)
    proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
    via_proxy = parsed.set(port=proxy.port).render_as_string(hide_password=False)
    repair = RepairLog(via_proxy, "default", timeout_seconds=1, retry_seconds=0.05)
    writer = DualWriter(
        cast("PhaseClient", Client(via_proxy)), MemoryTaskStore("old"), Down("new"), repair=repair
    )
    try:
        writer.write(record("before"))
        assert [("before", "new")] == open_entries(upgraded_url)
        proxy.cut()
        assert "old" == writer.write(record("during-1"))
        assert "old" == writer.write(record("during-2"))
        assert 2 == repair.pending()
        proxy.restore()
        assert wait_for(lambda: repair.pending() == 0)
        assert ["before", "during-1", "during-2"] == [key for key, _ in open_entries(upgraded_url)]
    finally:
        proxy.cut()
        writer.close()


def test_a_file_spool_survives_a_restart(upgraded_url: str, tmp_path: Path) -> None:
    """Entries spooled to a file by a process that could not reach the database are sent by
    the next repair log on that file."""
    spool = tmp_path / "repair.spool"
    unreachable = f"sqlite:///{tmp_path / 'no-such.db'}"  # make_engine refuses a missing file
    first = RepairLog(unreachable, "default", spool_path=spool, retry_seconds=3600)
    first.record("a", "new", "ConnectionError: down")
    first.record("b", "old", "ConnectionError: down")
    assert 2 == first.pending()
    first.close()  # the process ends: the entries stay in the file
    assert 2 == len(spool.read_text(encoding="utf-8").splitlines())
    second = RepairLog(upgraded_url, "default", spool_path=spool, retry_seconds=0.05)
    try:
        assert wait_for(lambda: second.pending() == 0)
        assert [("a", "new"), ("b", "old")] == open_entries(upgraded_url)
        assert not spool.exists()
    finally:
        second.close()


def test_a_full_memory_spool_says_the_task_is_stored(tmp_path: Path) -> None:
    repair = RepairLog(f"sqlite:///{tmp_path / 'no-such.db'}", "default", max_spooled=2, retry_seconds=3600)
    writer = DualWriter(
        cast("PhaseClient", Client(repair.url)), MemoryTaskStore("old"), Down("new"), repair=repair
    )
    writer.write(record("a"))
    writer.write(record("b"))
    with pytest.raises(RepairNotRecorded, match="the task IS stored on the authoritative side") as caught:
        writer.write(record("c"))
    assert isinstance(caught.value, DualWriteError)
    assert writer.old.get("c") is not None
    repair.close()


@pytest.mark.parametrize(
    ("phase", "percent", "authoritative"), [(Phase.DUAL_WRITE, 0, "old"), (Phase.CUTOVER, 100, "new")]
)
def test_a_strict_writer_says_the_task_is_stored(
    upgraded_url: str, phase: Phase, percent: int, authoritative: str
) -> None:
    """The strict writer's error names the side that missed the write and the authoritative
    side that has the task, and says what to do, in full."""
    missed = "new" if authoritative == "old" else "old"
    stores = {authoritative: MemoryTaskStore(authoritative), missed: Down(missed)}
    client = cast("PhaseClient", Client(upgraded_url, phase, percent))
    writer = DualWriter(client, stores["old"], stores["new"], strict=True)
    with pytest.raises(DualWriteError) as raised:
        writer.write(record("k"))
    writer.close()
    assert (
        f"write of k to {missed} failed: ConnectionError: {missed} is down; the task IS stored on the"
        f" authoritative side ({authoritative}) and a repair entry is kept: do not re-send it, `reconcile`"
        " copies it"
    ) == str(raised.value)
    assert stores[authoritative].get("k") is not None
    assert [("k", missed)] == open_entries(upgraded_url)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_entry_recorded_while_others_wait_goes_behind_them(
    upgraded_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """When the database takes entries again while earlier ones still wait in the spool, a new
    entry is not written ahead of them: it joins the spool (waking the sender), and the spool
    goes in order. The outage is logged once, with the database's own error; the wait for a
    locked database is `timeout_seconds`."""
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    holder = make_engine(upgraded_url)
    repair = RepairLog(upgraded_url, "default", timeout_seconds=0.2, retry_seconds=3600)
    try:
        engine = repair._get_engine()  # its busy timeout bounds record()'s wait
        with engine.connect() as conn:
            assert 200 == conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()
        with holder.begin() as conn:
            conn.exec_driver_sql("UPDATE mfsm_migrations SET name = name")  # the write lock
            repair.record("k1", "new", "new is down")
            assert 1 == repair.pending()
        # The lock is gone; the sender sleeps (retried an hour from now) until an entry wakes it.
        repair.record("k2", "new", "new is down")
        assert wait_for(lambda: repair.pending() == 0, timeout=10)
        assert [("k1", "new"), ("k2", "new")] == open_entries(upgraded_url)
        outages = [r.getMessage() for r in caplog.records if "does not take entries" in r.getMessage()]
        assert 1 == len(outages), outages
        assert "database is locked); 1 spooled" in outages[0]
    finally:
        repair.close()
        holder.dispose()


# -- an interrupt or a cancellation at every moment ---------------------------------------------


class Interrupted(BaseException):
    """A crash no `except Exception` swallows (a worker's hard timeout, say)."""


class Tripwire(MemoryTaskStore):
    """A store that raises `crash` before or after its write lands, or blocks there until
    released (for a cancellation)."""

    def __init__(self, name: str, when: str | None = None, crash: BaseException | None = None) -> None:
        super().__init__(name)
        self.when, self.crash = when, crash
        self.reached, self.release = threading.Event(), threading.Event()

    def _trip(self, moment: str) -> None:
        if self.when != moment:
            return
        self.reached.set()
        if self.crash is not None:
            raise self.crash
        self.release.wait(10)

    def put_forward(self, rec: TaskRecord) -> bool:
        self._trip("before")
        wrote = super().put_forward(rec)
        self._trip("after")
        return wrote


class AsyncTripwire(Tripwire):
    """The same, as an async store (its own coroutine is what a cancellation cuts)."""

    async def put_forward(self, rec: TaskRecord) -> bool:  # type: ignore[override]
        if self.when == "before":
            self.reached.set()
            await asyncio.sleep(10)
        wrote = MemoryTaskStore.put_forward(self, rec)
        if self.when == "after":
            self.reached.set()
            await asyncio.sleep(10)
        return wrote


class ListRepair(RepairLog):
    def __init__(self) -> None:
        super().__init__("sqlite://", "default")
        self.entries: list[tuple[str, str]] = []

    def record(self, key: str, side: str, error: str) -> None:
        self.entries.append((key, side))


def consistent(old: MemoryTaskStore, new: MemoryTaskStore, repair: ListRepair) -> bool:
    """On both sides, on neither, or a repair entry names the side that lacks it (which
    `reconcile` fills from the other, or finds absent on both)."""
    on_old, on_new = old.get("k") is not None, new.get("k") is not None
    if on_old == on_new:
        return True
    return ("k", "new" if on_old else "old") in repair.entries


MOMENTS = [("old", "before"), ("old", "after"), ("new", "before"), ("new", "after")]


@pytest.mark.parametrize(("side", "moment"), MOMENTS, ids=[f"{s}-{m}" for s, m in MOMENTS])
@pytest.mark.parametrize("crash", [KeyboardInterrupt(), Interrupted()], ids=["KeyboardInterrupt", "crash"])
def test_a_sync_interrupt_at_any_moment_leaves_a_consistent_task(
    side: str, moment: str, crash: BaseException
) -> None:
    old = Tripwire("old", moment if side == "old" else None, crash)
    new = Tripwire("new", moment if side == "new" else None, crash)
    repair = ListRepair()
    writer = DualWriter(cast("PhaseClient", Client("sqlite://")), old, new, repair=repair)
    with pytest.raises(type(crash)):
        writer.write(record("k"))
    assert consistent(old, new, repair), (old.get("k"), new.get("k"), repair.entries)


class ErrorRepair(ListRepair):
    """`ListRepair` that keeps each entry's error too."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[tuple[str, str, str]] = []

    def record(self, key: str, side: str, error: str) -> None:
        self.errors.append((key, side, error))


@pytest.mark.parametrize(
    ("crash", "said"),
    [
        (KeyboardInterrupt(), "interrupted"),
        (Interrupted("hard timeout\nat line 3"), "interrupted (Interrupted: hard timeout)"),
    ],
    ids=["KeyboardInterrupt", "crash"],
)
def test_an_interrupt_during_the_first_write_is_described_in_the_repair_entry(
    crash: BaseException, said: str
) -> None:
    """The authoritative write may have landed: the entry names the other side, and says
    what cut the write and where."""
    old, new = Tripwire("old", "after", crash), Tripwire("new")
    repair = ErrorRepair()
    writer = DualWriter(cast("PhaseClient", Client("sqlite://")), old, new, repair=repair)
    with pytest.raises(type(crash)):
        writer.write(record("k"))
    assert [("k", "new", f"{said} during the write to old")] == repair.errors


@pytest.mark.parametrize("kind", ["thread", "async"])
def test_a_cancellation_during_the_first_async_write_is_described_in_the_repair_entry(kind: str) -> None:
    make: Any = Tripwire if kind == "thread" else AsyncTripwire
    old, new = make("old", "after"), make("new")
    repair = ErrorRepair()
    writer = AsyncDualWriter(cast("PhaseClient", Client("sqlite://")), old, new, repair=repair)

    async def scenario() -> None:
        task = asyncio.ensure_future(writer.write(record("k")))
        while not old.reached.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        old.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert [("k", "new", "cancelled during the write to old")] == repair.errors


def test_a_second_cancellation_while_a_plain_store_s_write_is_waited_for_is_absorbed() -> None:
    """The writer waits for a plain store's write (in a thread) to end even when cancelled
    again meanwhile: the task ends cancelled, with the repair entry, once the write ended."""
    old, new = Tripwire("old", "before"), Tripwire("new")
    repair = ErrorRepair()
    writer = AsyncDualWriter(cast("PhaseClient", Client("sqlite://")), old, new, repair=repair)

    async def scenario() -> None:
        task = asyncio.ensure_future(writer.write(record("k")))
        while not old.reached.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        await asyncio.sleep(0)  # the task takes the cancellation and waits for the write
        task.cancel()
        await asyncio.sleep(0)
        assert not task.done()  # still waiting for the write, which has not landed
        assert old.get("k") is None
        old.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert old.get("k") is not None

    asyncio.run(scenario())
    assert [("k", "new", "cancelled during the write to old")] == repair.errors


@pytest.mark.parametrize(("side", "moment"), MOMENTS, ids=[f"{s}-{m}" for s, m in MOMENTS])
@pytest.mark.parametrize("kind", ["thread", "async"])
def test_an_async_cancellation_at_any_moment_leaves_a_consistent_task(
    side: str, moment: str, kind: str
) -> None:
    """The writer's task is cancelled while a store is at `moment` of its write: a plain
    store (its write runs on in a thread) or an async one (its coroutine is cut)."""
    make: Any = Tripwire if kind == "thread" else AsyncTripwire
    old = make("old", moment if side == "old" else None)
    new = make("new", moment if side == "new" else None)
    repair = ListRepair()
    writer = AsyncDualWriter(cast("PhaseClient", Client("sqlite://")), old, new, repair=repair)
    stuck = old if side == "old" else new

    async def scenario() -> None:
        task = asyncio.ensure_future(writer.write(record("k")))
        while not stuck.reached.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        stuck.release.set()  # a thread store's write goes on to its end
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert consistent(old, new, repair), (old.get("k"), new.get("k"), repair.entries)
