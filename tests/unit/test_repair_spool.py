"""Once the authoritative write succeeded, a dual write never loses its repair entry and never
makes the caller wait on the migration database: the entry is spooled (in memory, and in a
file when asked) and sent when the database is back. And an interrupt or a cancellation at
any moment of a dual write leaves the task on both sides, on neither, or with a repair entry
for the side that lacks it (sync and async)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import event, select
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


def test_two_sends_at_once_send_each_entry_once(upgraded_url: str, tmp_path: Path) -> None:
    """A caller's `flush()` while another send is under way (the sender thread's, `close`'s)
    waits for it, then finds nothing left to send: each spooled entry reaches the log once.
    (Two sends at once both sent it, so the log held it twice, and the one that finished last
    failed with an `IndexError` on the spool the other had emptied.)"""
    spool = tmp_path / "repair.spool"
    entry = {"key": "k1", "side": "new", "error": "new is down", "created_at": AT.isoformat()}
    spool.write_text(json.dumps(entry) + "\n")  # spooled by an earlier process
    repair = RepairLog(upgraded_url, "default", timeout_seconds=2, retry_seconds=3600, spool_path=spool)
    inserting, go_on = threading.Event(), threading.Event()
    calls: list[str] = []

    def hold_first_insert(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO MFSM_REPAIR_LOG"):
            calls.append(threading.current_thread().name)
            if len(calls) == 1:
                inserting.set()
                assert go_on.wait(30)

    results: list[bool | BaseException] = []

    def send() -> None:
        try:
            results.append(repair.flush())
        except BaseException as exc:  # noqa: BLE001 -- reported by the test
            results.append(exc)

    event.listen(repair._get_engine(), "before_cursor_execute", hold_first_insert)
    try:
        first = threading.Thread(target=send, name="first")
        first.start()
        assert inserting.wait(10)
        second = threading.Thread(target=send, name="second")
        second.start()
        second.join(2)  # before the fix, the second send was done by now; now it waits
        go_on.set()
        first.join(30)
        second.join(30)
        assert ([True, True], 0, ["first"]) == (results, repair.pending(), calls)
        assert [("k1", "new")] == open_entries(upgraded_url)
        assert not spool.exists()
    finally:
        go_on.set()
        repair.close()


# -- settings, what the log says, and what close() leaves ----------------------------------------


def logged(caplog: pytest.LogCaptureFixture, level: int) -> list[tuple[str, str | None]]:
    """The repair log's lines at `level`: (message, the `migration` they name)."""
    return [
        (r.getMessage(), getattr(r, "migration", None))
        for r in caplog.records
        if r.levelno == level and "repair log" in r.getMessage()
    ]


def test_settings_out_of_range_are_refused_and_the_defaults_are_documented(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'no-such.db'}"
    message = "timeout_seconds and retry_seconds must be positive, max_spooled >= 1"
    for bad in ({"timeout_seconds": 0}, {"retry_seconds": 0}, {"max_spooled": 0}):
        with pytest.raises(ValueError, match="must be positive") as caught:
            RepairLog(url, "default", **bad)  # type: ignore[arg-type]
        assert message == str(caught.value), bad
    smallest = RepairLog(url, "default", timeout_seconds=0.001, retry_seconds=0.001, max_spooled=1)
    assert (0.001, 0.001, 1) == (smallest.timeout_seconds, smallest.retry_seconds, smallest.max_spooled)
    default = RepairLog(url, "default")
    assert (2.0, 1.0, 100_000) == (default.timeout_seconds, default.retry_seconds, default.max_spooled)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_outage_and_each_recovery_are_said_once_naming_the_migration(
    upgraded_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Entries an earlier process spooled are announced with their file; a send refused by the
    database says why (once per outage), a send after it says the database is back and how
    many went; a second outage is said again. `flush` answers whether none is left waiting."""
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    spool = tmp_path / "repair.spool"
    entries = [
        {"key": key, "side": "new", "error": "new is down", "created_at": AT.isoformat()}
        for key in ("k1", "k2")
    ]
    spool.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    holder = make_engine(upgraded_url)
    repair = RepairLog(upgraded_url, "default", timeout_seconds=0.2, retry_seconds=3600, spool_path=spool)
    try:
        assert [
            (
                f"migration-fsm repair log: 2 entries spooled in {spool} by an earlier process are sent now",
                "default",
            )
        ] == logged(caplog, logging.WARNING)
        caplog.clear()
        for outage in (1, 2):
            with holder.begin() as conn:
                conn.exec_driver_sql("UPDATE mfsm_migrations SET name = name")  # the write lock
                if outage == 2:
                    repair.record("k3", "old", "old is down")
                assert repair.flush() is False
            assert repair.flush() is True
            sent = 2 if outage == 1 else 1
            said = logged(caplog, logging.WARNING)
            assert 2 == len(said), said
            (down, down_names), back = said
            assert "default" == down_names
            assert down.startswith("migration-fsm repair log: the migration database does not take entries (")
            assert down.endswith(f"database is locked); {sent} spooled, retried every 3600 s"), down
            assert (
                f"migration-fsm repair log: the migration database takes entries again ({sent} sent)",
                "default",
            ) == back
            caplog.clear()
        assert repair.flush() is True  # nothing waits
        assert [("k1", "new"), ("k2", "new"), ("k3", "old")] == open_entries(upgraded_url)
        assert not spool.exists()
    finally:
        repair.close()
        holder.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("file_spool", [False, True])
def test_close_says_what_it_leaves_and_where(
    upgraded_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, file_spool: bool
) -> None:
    """A log closed while the database still refuses its entries says how many it leaves: lost
    with the process (an error saying what to run) or kept in the spool file (a warning naming
    it). A log that sent everything closes without a word."""
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    spool = tmp_path / "repair.spool" if file_spool else None
    holder = make_engine(upgraded_url)
    repair = RepairLog(upgraded_url, "default", timeout_seconds=0.2, retry_seconds=3600, spool_path=spool)
    try:
        repair.record("quiet", "new", "new is down")
        repair.close()  # sent: nothing to say
        assert [] == logged(caplog, logging.ERROR)
        assert [] == [m for m, _ in logged(caplog, logging.WARNING) if "closes" in m]
        with holder.begin() as conn:
            conn.exec_driver_sql("UPDATE mfsm_migrations SET name = name")  # the write lock
            repair.record("k1", "new", "new is down")
            repair.record("k2", "new", "new is down")
            caplog.clear()
            repair.close()
    finally:
        holder.dispose()
    if spool is None:
        assert [
            (
                "migration-fsm repair log closes with 2 entries the migration database never took: run"
                " `migration-fsm reconcile`, and `validate` to find the tasks (set a spool_path to keep them"
                " across a restart)",
                "default",
            )
        ] == logged(caplog, logging.ERROR)
    else:
        assert [] == logged(caplog, logging.ERROR)
        assert [
            (f"migration-fsm repair log closes with 2 entries kept in {spool} for the next start", "default")
        ] == [line for line in logged(caplog, logging.WARNING) if "closes" in line[0]]
        assert 2 == len(spool.read_text(encoding="utf-8").splitlines())
    assert [("quiet", "new")] == open_entries(upgraded_url)


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
