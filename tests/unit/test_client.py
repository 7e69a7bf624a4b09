"""The backend library: PhaseClient, DualWriter, FallbackReader, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy.engine import make_url

from migration_fsm import commands
from migration_fsm.client import (
    AsyncDualWriter,
    DualWriteError,
    DualWriter,
    FallbackReader,
    PhaseClient,
)
from migration_fsm.config import Settings
from migration_fsm.fsm import Phase, routing_for
from migration_fsm.journal import Journal
from migration_fsm.migration import Migration
from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import TaskRecord, TaskStatus
from migration_fsm.tasks.sql import SqlTaskStore
from migration_fsm.tools.reconcile import open_entries, reconcile
from tests.support.cli import ROOT, CliResult
from tests.support.datatools import create_task_table
from tests.support.proxy import TcpProxy

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def record(key: str, status: TaskStatus = TaskStatus.PENDING, **changes: Any) -> TaskRecord:
    fields: dict[str, Any] = {
        "key": key,
        "type": "email",
        "payload": {"to": f"{key}@example.com"},
        "status": status,
        "created_at": NOW,
        "updated_at": NOW,
    }
    fields.update(changes)
    return TaskRecord(**fields)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `predicate` until true or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


class FlakyStore(MemoryTaskStore):
    """A memory store whose writes or reads can be made to fail."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.fail_puts = False
        self.fail_gets = False

    def put(self, record: TaskRecord) -> None:
        if self.fail_puts:
            raise ConnectionError(f"{self.name} is down")
        super().put(record)

    def put_forward(self, record: TaskRecord) -> bool:  # DualWriter's second write
        if self.fail_puts:
            raise ConnectionError(f"{self.name} is down")
        return super().put_forward(record)

    def get(self, key: str) -> TaskRecord | None:
        if self.fail_gets:
            raise ConnectionError(f"{self.name} is down")
        return super().get(key)


@pytest.fixture
def client(engine: Migration, upgraded_url: str) -> Iterator[PhaseClient]:
    with PhaseClient(upgraded_url, ttl=0.05) as phase_client:
        yield phase_client


def move_to(engine: Migration, client: PhaseClient, phase: Phase, percent: int | None = None) -> None:
    """Advance (and ramp) the real migration, then wait until the client has seen it."""
    while engine.store.get("default").phase is not phase:
        engine.advance()
    if percent is not None:
        engine.ramp(percent)
    version = engine.store.get("default").version
    assert wait_for(lambda: client.snapshot().version == version)


def test_client_routing_follows_every_phase(engine: Migration, client: PhaseClient) -> None:
    """The client's routing equals the table for each phase the migration goes through."""
    for phase in (Phase.PREPARATION, Phase.DUAL_WRITE, Phase.CUTOVER):
        move_to(engine, client, phase)
        assert routing_for(phase, 0) == client.routing()
    move_to(engine, client, Phase.CUTOVER, 100)
    for phase in (Phase.CLEANUP, Phase.COMPLETE):
        move_to(engine, client, phase)
        assert routing_for(phase, 100) == client.routing()
    snap = client.snapshot()
    assert (Phase.COMPLETE, False) == (snap.phase, snap.stale)


def test_client_per_key_routing_in_partial_cutover(engine: Migration, client: PhaseClient) -> None:
    """At 30 percent a key reads from new exactly when its bucket is below 30; no key says split."""
    move_to(engine, client, Phase.CUTOVER, 30)
    assert "split" == client.routing().read_from
    for i in range(500):
        key = f"k{i}"
        assert routing_for(Phase.CUTOVER, 30, key) == client.routing(key)
        assert client.routing(key).read_from in ("old", "new")


def test_client_answers_default_phase_before_any_read(tmp_path: Path) -> None:
    """With no database to read, the client answers default_phase, stale, and never creates a file."""
    path = tmp_path / "absent.db"
    with PhaseClient(f"sqlite:///{path}", ttl=0.05, default_phase=Phase.DUAL_WRITE) as phase_client:
        snap = phase_client.snapshot()
        assert (Phase.DUAL_WRITE, True, None) == (snap.phase, snap.stale, snap.read_at)
        assert wait_for(lambda: phase_client.counters()["refresh_errors"] >= 3)  # it did try
    assert not path.exists()


def test_client_never_reports_an_unknown_migration(engine: Migration, upgraded_url: str) -> None:
    """A migration name that is not in the database keeps the default, stale."""
    with PhaseClient(upgraded_url, migration="nope", ttl=0.05) as phase_client:
        assert (Phase.PREPARATION, True) == (phase_client.phase, phase_client.snapshot().stale)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_postgres_outage_keeps_last_phase_and_recovers(
    engine: Migration, upgraded_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Through a cut proxy the client keeps its phase (stale), logs once, and catches up after."""
    parsed = make_url(upgraded_url)
    proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
    url = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    try:
        with PhaseClient(url, ttl=0.1, connect_timeout=1) as phase_client:
            engine.advance()
            assert wait_for(lambda: phase_client.phase is Phase.DUAL_WRITE)
            proxy.cut()
            assert wait_for(lambda: phase_client.snapshot().stale)
            engine.advance()  # made during the outage, directly on the database
            for _ in range(20):  # callers keep getting answers, from memory
                assert routing_for(Phase.DUAL_WRITE, 0) == phase_client.routing("k")
                time.sleep(0.02)
            assert Phase.DUAL_WRITE == phase_client.phase
            proxy.restore()
            assert wait_for(lambda: phase_client.phase is Phase.CUTOVER and not phase_client.snapshot().stale)
            counters = phase_client.counters()
            assert counters["stale_seconds"] > 0
            assert 1 == counters["outages"]
    finally:
        proxy.close()
    warnings = [r for r in caplog.records if "cannot read" in r.getMessage()]
    assert 1 == len(warnings)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_file_gone_keeps_last_phase_and_recovers(engine: Migration, upgraded_url: str) -> None:
    """When the SQLite file cannot be opened the client stays on its phase, then recovers."""
    path = Path(make_url(upgraded_url).database or "")
    with PhaseClient(upgraded_url, ttl=0.05) as phase_client:
        engine.advance()
        assert wait_for(lambda: phase_client.phase is Phase.DUAL_WRITE)
        engine.advance()  # commit, then hide the file before the client reads it
        aside = path.with_suffix(".aside")
        engine.store.close()
        path.rename(aside)
        try:
            assert wait_for(lambda: phase_client.snapshot().stale)
            assert phase_client.phase in (Phase.DUAL_WRITE, Phase.CUTOVER)
        finally:
            aside.rename(path)
        assert wait_for(lambda: phase_client.phase is Phase.CUTOVER and not phase_client.snapshot().stale)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_cli_transition_reaches_a_listening_postgres_client_before_its_ttl(
    engine: Migration, upgraded_url: str, cli: Callable[..., CliResult]
) -> None:
    """With ttl=30 a PostgreSQL client sees a CLI commit by NOTIFY: the notification wakes
    one read of the row (its payload is not applied), long before any poll."""
    with PhaseClient(upgraded_url, ttl=30) as phase_client:
        refreshes = phase_client.counters()["refreshes"]
        result = cli("advance", "--db", upgraded_url)
        committed = time.monotonic()
        assert 0 == result.code, result.stderr
        assert wait_for(lambda: phase_client.phase is Phase.DUAL_WRITE, timeout=10)
        seen = time.monotonic() - committed
        counters = phase_client.counters()
        assert (refreshes + 1, 1) == (counters["refreshes"], counters["notifications"])
        print(f"seen {seen * 1000:.1f} ms after the CLI exited")  # measured, not asserted


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_transition_reaches_a_sqlite_client_by_polling(
    engine: Migration, upgraded_url: str, cli: Callable[..., CliResult]
) -> None:
    """A SQLite client sees a CLI commit by its next poll."""
    with PhaseClient(upgraded_url, ttl=0.2) as phase_client:
        before = phase_client.counters()["refreshes"]
        assert 0 == cli("advance", "--db", upgraded_url).code
        assert wait_for(lambda: phase_client.phase is Phase.DUAL_WRITE, timeout=10)
        assert phase_client.counters()["refreshes"] > before


def test_dual_writer_failure_points(engine: Migration, client: PhaseClient, store: Journal) -> None:
    """Authoritative failure raises and writes nothing; second-side failure is repaired later."""
    old, new = FlakyStore("old"), FlakyStore("new")
    writer = DualWriter(client, old, new)
    strict = DualWriter(client, old, new, strict=True)
    move_to(engine, client, Phase.DUAL_WRITE)

    old.fail_puts = True
    with pytest.raises(ConnectionError):
        writer.write(record("a"))
    assert (None, None, 0) == (old.get("a"), new.get("a"), open_entries(store, "default"))
    old.fail_puts = False

    new.fail_puts = True
    assert "old" == writer.write(record("b"))
    assert (True, None, 1) == (old.get("b") is not None, new.get("b"), open_entries(store, "default"))
    with pytest.raises(DualWriteError):
        strict.write(record("c"))
    assert 2 == open_entries(store, "default")
    new.fail_puts = False

    done = reconcile(store, "default", old, new)
    assert (2, 0, 0) == (done.replayed, done.failed, done.open)
    assert old.scan(None, 10) == new.scan(None, 10)
    again = reconcile(store, "default", old, new)
    assert (0, 0) == (again.replayed, again.open)
    assert {
        "writes": 1,
        "second_writes": 0,
        "second_writes_behind": 0,
        "repair_entries": 1,
        "failed_writes": 1,
        "resends_kept": 0,
        "repair_spooled": 0,
    } == writer.counters()
    writer.close()
    strict.close()


def test_a_late_second_write_does_not_hand_a_finished_task_back(
    engine: Migration, client: PhaseClient, upgraded_url: str
) -> None:
    """The race behind "no task runs twice": in `dual_write` the old side takes a task and an
    old worker finishes it while the write to the new side is held up; the cutover's state
    transfer copies the finished task to new; then the held-up write lands. It must not put
    the task back to pending on new (where new workers would run it again). Real SQL stores."""
    create_task_table(upgraded_url, "old_tasks")
    create_task_table(upgraded_url, "new_tasks")
    entered, release = threading.Event(), threading.Event()

    class HeldUp(SqlTaskStore):
        def put_forward(self, record: TaskRecord) -> bool:
            entered.set()
            assert release.wait(timeout=30)
            return super().put_forward(record)

    old = SqlTaskStore(upgraded_url, "old_tasks", name="old")
    new = HeldUp(upgraded_url, "new_tasks", name="new")
    move_to(engine, client, Phase.DUAL_WRITE)
    with DualWriter(client, old, new) as writer:
        late = threading.Thread(target=writer.write, args=(record("k1"),))
        late.start()
        assert entered.wait(timeout=30)
        finished = record("k1", TaskStatus.COMPLETED, attempts=1)
        old.put(finished)  # an old worker ran it
        SqlTaskStore.put(new, finished)  # transfer_state copied it across
        release.set()
        late.join(timeout=30)
        assert (finished, finished) == (old.get("k1"), new.get("k1"))
        writer.write(record("k2"))  # an ordinary write still lands on both sides
        assert record("k2") == new.get("k2")
        assert (2, 1) == (writer.counters()["second_writes"], writer.counters()["second_writes_behind"])
    old.close()
    new.close()


def test_reconcile_does_not_overwrite_a_newer_copy(
    engine: Migration, client: PhaseClient, store: Journal
) -> None:
    """A repair entry whose key was written again since is closed without regressing it."""
    old, new = FlakyStore("old"), FlakyStore("new")
    move_to(engine, client, Phase.DUAL_WRITE)
    with DualWriter(client, old, new) as writer:
        new.fail_puts = True
        writer.write(record("x"))
        new.fail_puts = False
    newer = record("x", TaskStatus.COMPLETED, updated_at=datetime(2026, 2, 1, tzinfo=UTC))
    new.put(newer)
    done = reconcile(store, "default", old, new)
    assert (0, 1) == (done.replayed, done.already_current)
    assert newer == new.get("x")


def test_async_cancel_between_writes_leaves_a_repair_entry(
    engine: Migration, client: PhaseClient, store: Journal
) -> None:
    """Cancelling a write after its authoritative half leaves a repair entry."""
    move_to(engine, client, Phase.DUAL_WRITE)
    written, second_started = asyncio.Event(), asyncio.Event()

    class Old(MemoryTaskStore):
        async def put_forward(self, rec: TaskRecord) -> bool:  # type: ignore[override]
            wrote = MemoryTaskStore.put_forward(self, rec)
            written.set()
            return wrote

    class Never(MemoryTaskStore):
        async def put_forward(self, rec: TaskRecord) -> bool:  # type: ignore[override]
            second_started.set()
            await asyncio.sleep(3600)
            return True

    async def scenario() -> None:
        with AsyncDualWriter(client, Old("old"), Never("new")) as writer:
            task = asyncio.create_task(writer.write(record("z")))
            await written.wait()
            await second_started.wait()  # cancelled in the second write, not before it
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
    assert 1 == open_entries(store, "default")


def test_async_writes_land_on_the_side_their_phase_made_authoritative(
    engine: Migration, client: PhaseClient
) -> None:
    """1,000 concurrent writes while dual_write becomes cutover: each lands first on the side
    its phase makes authoritative (old in dual_write, new in cutover), and is kept there."""
    move_to(engine, client, Phase.DUAL_WRITE)
    rng = random.Random(3)

    first_write: dict[str, str] = {}  # key -> the side whose write of it finished first

    class Slow(MemoryTaskStore):
        async def put(self, rec: TaskRecord) -> None:  # type: ignore[override]
            await asyncio.sleep(rng.random() * 0.02)
            MemoryTaskStore.put(self, rec)
            first_write.setdefault(rec.key, self.name)

        async def put_forward(self, rec: TaskRecord) -> bool:  # type: ignore[override]
            await asyncio.sleep(rng.random() * 0.02)
            first_write.setdefault(rec.key, self.name)
            return MemoryTaskStore.put_forward(self, rec)

    old, new = Slow("old"), Slow("new")
    writer = AsyncDualWriter(client, old, new)

    phase_seen: dict[str, Phase] = {}  # key -> the phase before and after its write, if one

    async def scenario() -> list[tuple[str, str]]:
        # Even keys start at once; the flip starts when 100 of them are written, while the
        # rest are in flight; odd keys start once the client has seen cutover. So both sides
        # are authoritative for some writes, whatever the machine's speed.
        written = 0
        some_written, flipped = asyncio.Event(), asyncio.Event()

        async def one(i: int) -> tuple[str, str]:
            nonlocal written
            if i % 2:
                await flipped.wait()
            await asyncio.sleep(rng.random() * 0.5)
            key = f"t{i:04d}"
            before = client.phase
            side = await writer.write(record(key))
            if client.phase is before:
                phase_seen[key] = before
            written += 1
            if written == 100:
                some_written.set()
            return key, side

        def advance_and_wait() -> None:
            engine.advance()
            version = engine.store.get("default").version
            assert wait_for(lambda: client.snapshot().version == version)

        async def flip() -> None:
            await some_written.wait()
            await asyncio.get_running_loop().run_in_executor(None, advance_and_wait)
            flipped.set()

        flipping = asyncio.create_task(flip())
        results = await asyncio.gather(*(one(i) for i in range(1000)))
        await flipping
        return list(results)

    results = asyncio.run(scenario())
    writer.close()
    sides = {"old": old, "new": new}
    assert {"old", "new"} == {side for _, side in results}  # the phase did move mid-run
    authoritative = {Phase.DUAL_WRITE: "old", Phase.CUTOVER: "new"}
    assert {Phase.DUAL_WRITE, Phase.CUTOVER} == set(phase_seen.values())
    for key, side in results:
        assert sides[side].get(key) is not None
        assert side == first_write[key]
        if key in phase_seen:
            assert authoritative[phase_seen[key]] == side


def test_fallback_reader(engine: Migration, client: PhaseClient) -> None:
    """In cutover and cleanup a miss or error on new falls back to old, counted."""
    old, new = FlakyStore("old"), FlakyStore("new")
    old.put(record("only-old"))
    reader = FallbackReader(client, old, new)
    move_to(engine, client, Phase.CUTOVER, 100)
    assert record("only-old") == reader.get("only-old")
    new.fail_gets = True
    assert record("only-old") == reader.get("only-old")
    move_to(engine, client, Phase.CLEANUP)
    assert record("only-old") == reader.get("only-old")
    assert {
        "reads": 3,
        "fallbacks": 3,
        "new_errors": 2,
        "shadow_reads": 0,
        "shadow_mismatches": 0,
        "shadow_status_lag": 0,
    } == reader.counters()


def test_shadow_reads_count_mismatches_and_never_raise(
    engine: Migration, client: PhaseClient, caplog: pytest.LogCaptureFixture
) -> None:
    """In dual_write a sampled shadow read on new is compared; differences are logged, not raised."""
    move_to(engine, client, Phase.DUAL_WRITE)
    old, new = FlakyStore("old"), FlakyStore("new")
    old.put(record("same"))
    new.put(record("same"))
    old.put(record("diff"))
    new.put(record("diff", payload={"to": "someone-else"}))
    reader = FallbackReader(client, old, new, shadow_sample=1.0)
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    assert record("same") == reader.get("same")
    assert record("diff") == reader.get("diff")
    new.fail_gets = True
    assert record("same") == reader.get("same")
    counters = reader.counters()
    shadow = [counters[name] for name in ("shadow_reads", "shadow_mismatches", "shadow_status_lag")]
    assert [2, 1, 0] == shadow
    assert any("payload" in r.getMessage() for r in caplog.records)


class PutOnlyStore:
    """A store with `put` and `get` only (no `put_forward`)."""

    def __init__(self) -> None:
        self.records: dict[str, TaskRecord] = {}

    def put(self, rec: TaskRecord) -> None:
        self.records[rec.key] = rec

    def get(self, key: str) -> TaskRecord | None:
        return self.records.get(key)


def test_a_store_without_put_forward_is_warned_about_and_never_counted_behind(
    engine: Migration, client: PhaseClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A store without `put_forward` gets `put`: the writer says so once per such side when it
    is made, and its writes (which cannot say whether they wrote) are never counted as
    `second_writes_behind`; a `put_forward` store's are when it kept a later state."""
    move_to(engine, client, Phase.DUAL_WRITE)
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    warning = (
        "the {} store has no put_forward: a re-sent task that already ran is put back to its sent"
        " status there, and may run again"
    )
    plain: Any = PutOnlyStore()  # not a `TaskStore`: no `put_forward`
    with DualWriter(client, MemoryTaskStore("old"), plain) as writer:
        assert [(warning.format("new"), "default", "new")] == [
            (r.getMessage(), getattr(r, "migration", None), getattr(r, "side", None)) for r in caplog.records
        ]
        plain.put(record("k1", TaskStatus.COMPLETED, attempts=1))
        writer.write(record("k1"))
        counters = writer.counters()
        assert (1, 1, 0) == (counters["writes"], counters["second_writes"], counters["second_writes_behind"])
    caplog.clear()
    bare: Any = PutOnlyStore()
    DualWriter(client, bare, MemoryTaskStore("new")).close()
    assert [warning.format("old")] == [r.getMessage() for r in caplog.records]
    new = MemoryTaskStore("new")
    new.put(record("ran", TaskStatus.COMPLETED, attempts=1))
    with DualWriter(client, MemoryTaskStore("old"), new) as writer:
        for key in ("a", "ran", "b"):
            writer.write(record(key))
        counters = writer.counters()
        assert (3, 1) == (counters["second_writes"], counters["second_writes_behind"])


def test_a_reader_makes_no_shadow_read_unless_asked(
    engine: Migration, client: PhaseClient, caplog: pytest.LogCaptureFixture
) -> None:
    """`shadow_sample` is 0 by default: in dual_write a read goes to old alone, and a new copy
    that differs is neither read nor reported."""
    move_to(engine, client, Phase.DUAL_WRITE)
    old, new = FlakyStore("old"), FlakyStore("new")
    old.put(record("diff"))
    new.put(record("diff", payload={"to": "someone-else"}))
    reader = FallbackReader(client, old, new)
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    assert record("diff") == reader.get("diff")
    counters = reader.counters()
    shadow = [counters[name] for name in ("reads", "shadow_reads", "shadow_mismatches")]
    assert ([1, 0, 0], []) == (shadow, [r.getMessage() for r in caplog.records])


def test_shadow_reads_count_status_lag_apart_and_quietly(
    engine: Migration, client: PhaseClient, caplog: pytest.LogCaptureFixture
) -> None:
    """In dual_write an old worker finishes a task whose new copy is still pending: that is
    the normal lag of dual writes, counted as `shadow_status_lag` and not logged. A new copy
    further along than old (new ran a task it does not consume) is a mismatch."""
    move_to(engine, client, Phase.DUAL_WRITE)
    old, new = FlakyStore("old"), FlakyStore("new")
    done = record("lagging").model_copy(update={"status": TaskStatus.COMPLETED, "attempts": 1})
    old.put(done)
    new.put(record("lagging"))
    old.put(record("ahead"))
    new.put(record("ahead").model_copy(update={"status": TaskStatus.RUNNING, "attempts": 1}))
    reader = FallbackReader(client, old, new, shadow_sample=1.0)
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    assert done == reader.get("lagging")
    assert [] == [r.getMessage() for r in caplog.records]
    assert record("ahead") == reader.get("ahead")
    counters = reader.counters()
    shadow = [counters[name] for name in ("shadow_reads", "shadow_mismatches", "shadow_status_lag")]
    assert [2, 1, 1] == shadow
    assert ["shadow read of ahead differs on status, attempts"] == [r.getMessage() for r in caplog.records]


def test_a_shadow_copy_behind_in_status_with_as_many_attempts_is_lag(
    engine: Migration, client: PhaseClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The new copy still pending after as many attempts as the old one, which finished it:
    lag (an attempt count written to both sides, the run on old only), not a mismatch."""
    move_to(engine, client, Phase.DUAL_WRITE)
    old, new = FlakyStore("old"), FlakyStore("new")
    done = record("retried").model_copy(update={"status": TaskStatus.COMPLETED, "attempts": 2})
    old.put(done)
    new.put(record("retried").model_copy(update={"attempts": 2}))
    reader = FallbackReader(client, old, new, shadow_sample=1.0)
    caplog.set_level(logging.WARNING, logger="migration_fsm.client")
    assert done == reader.get("retried")
    counters = reader.counters()
    shadow = [counters[name] for name in ("shadow_reads", "shadow_mismatches", "shadow_status_lag")]
    assert ([1, 0, 1], []) == (shadow, [r.getMessage() for r in caplog.records])


def test_client_import_is_light() -> None:
    """Importing migration_fsm.client pulls in neither click, rich nor alembic."""
    code = (
        "import sys, migration_fsm.client;"
        "print(sorted(m for m in ('click', 'rich', 'alembic') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=dict(os.environ),
    ).stdout
    assert "[]" == out.strip()


def test_client_is_safe_from_many_threads(engine: Migration, client: PhaseClient) -> None:
    """Concurrent routing calls during transitions never raise and only see real phases."""
    seen: set[Phase] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                client.routing("key")
                seen.add(client.phase)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    move_to(engine, client, Phase.CUTOVER)
    stop.set()
    for thread in threads:
        thread.join()
    assert [] == errors
    assert seen <= {Phase.PREPARATION, Phase.DUAL_WRITE, Phase.CUTOVER}


def settings_unused(_: Settings) -> None:  # keeps the Settings import honest for mypy
    return None


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_malformed_notifications_do_not_stop_the_client(engine: Migration, upgraded_url: str) -> None:
    """Junk on the NOTIFY channel routes nothing and stops nothing: a payload that names no
    migration of this client is ignored, one that names it (whatever else it holds) only
    wakes a read of the row; the client keeps following real commits."""
    from sqlalchemy import text

    with PhaseClient(upgraded_url, ttl=30) as phase_client:
        with engine.store.engine.connect() as conn:
            for payload in (
                "1",
                "not json",
                '{"migration": "default", "phase": "canary"}',
                '{"migration": "default"}',
            ):
                conn.execute(text("SELECT pg_notify('migration_fsm', :p)"), {"p": payload})
            conn.commit()
        engine.advance()
        assert wait_for(lambda: phase_client.phase is Phase.DUAL_WRITE, timeout=10)
        assert 3 == phase_client.counters()["notifications"]  # two junk wake-ups, the commit's


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_client_started_before_init_keeps_one_connection(upgraded_url: str, store: Journal) -> None:
    """A client waiting for `init` stays stale without reconnecting on every poll, then follows."""
    with PhaseClient(upgraded_url, migration="later", ttl=0.05) as phase_client:
        assert wait_for(lambda: phase_client.counters()["refreshes"] >= 3)  # polled, found nothing
        assert (Phase.PREPARATION, True) == (phase_client.phase, phase_client.snapshot().stale)
        from sqlalchemy import text

        with store.engine.connect() as conn:
            sessions = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'migration-fsm client'"
                    " AND datname = current_database()"
                )
            ).scalar()
        assert 1 == sessions
        store.create("later", "tester")
        assert wait_for(lambda: not phase_client.snapshot().stale)


@pytest.mark.parametrize("name", ["a#b", "a?b", "100%", "x#y?z%20w"])
def test_a_sqlite_path_with_uri_characters_is_read_and_never_created(tmp_path: Path, name: str) -> None:
    """'#', '?' and '%' in the path (percent-encoded in the URL, as SQLAlchemy reads it): the
    client reads that file, creates no other, and a missing file stays missing."""
    folder = tmp_path / name
    folder.mkdir()
    url = f"sqlite:///{quote(str(folder / 'journal.db'))}"
    settings = Settings(database_url=url, actor="test")
    commands.db_upgrade(settings)
    commands.init(settings, "default")
    commands.advance(settings, "default")

    def files() -> set[Path]:
        return {p for p in tmp_path.rglob("*") if not p.name.endswith(("-wal", "-shm"))}

    before = files()
    with PhaseClient(url, ttl=30) as client:
        assert (Phase.DUAL_WRITE, False) == (client.phase, client.snapshot().stale)
    missing = f"sqlite:///{quote(str(folder / 'nothing.db'))}"
    with PhaseClient(missing, ttl=30) as client:
        assert client.snapshot().stale
    assert before == files()
