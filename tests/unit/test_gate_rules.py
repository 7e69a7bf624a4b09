"""`WorkerGate` (`client/gate.py`), rule by rule, on SQLite: the refusals of its arguments and
their messages, its documented defaults, the heartbeat's schedule (on a test clock), the row
it registers, what each `Run` says, its counters, and what it does when the workers' table or
the ledger cannot be used: no task started, one warning per outage and one when it ends, no
finish lost (a finish the ledger refuses is kept, retried and marks the worker as deferring
its finishes, even when the gate closes first), and its threads surviving an unexpected error.

An outage is a table renamed away (every statement on it fails with SQLite's "no such
table") and put back. Threads are waited for by polling a state with a deadline; nothing
asserts wall-clock durations."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from migration_fsm.client import PhaseClient, Run, WorkerGate
from migration_fsm.client import gate as gate_module
from migration_fsm.config import Settings
from migration_fsm.journal import Journal, utcnow, workers_table
from migration_fsm.journal.ledger import ClaimState, Ledger
from migration_fsm.journal.workers import WorkerRecord, Workers
from migration_fsm.migration import Migration
from tests.support.clock import FakeClock
from tests.unit.test_client_phase import _set_row
from tests.unit.test_gate import _gate, _seen, _transition, wait_until

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

M = "default"
LOGGER = "migration_fsm.client"


@pytest.fixture
def client(upgraded_url: str, engine: Migration) -> Iterator[PhaseClient]:
    # A refresher that never fires by itself: the tests refresh explicitly.
    with PhaseClient(upgraded_url, ttl=3600, listen=False) as phase_client:
        yield phase_client


@contextmanager
def _away(store: Journal, table: str) -> Iterator[None]:
    """An outage of one table: renamed away, then put back."""
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {table} RENAME TO {table}_away")
    try:
        yield
    finally:
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER TABLE {table}_away RENAME TO {table}")


def _record(store: Journal, side: str, worker_id: str) -> WorkerRecord:
    (found,) = [w for w in Workers(store.engine).records(M, side) if w.worker_id == worker_id]
    return found


def _age(store: Journal, worker_id: str, seconds: float) -> None:
    """Make a worker's last heartbeat `seconds` old."""
    with store.transaction() as conn:
        conn.execute(
            workers_table.update()
            .where(workers_table.c.worker_id == worker_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )


def _renewed(store: Journal, worker_id: str) -> bool:
    """Whether the worker heartbeat since `_age` made its heartbeat an hour old."""
    return _record(store, "old", worker_id).heartbeat_at > utcnow() - timedelta(minutes=30)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


NO_WORKERS_TABLE = "OperationalError: (sqlite3.OperationalError) no such table: mfsm_workers"


def _ledger_down(gate: WorkerGate, table: str) -> str:
    """The warning of a ledger outage (a table of the ledger renamed away)."""
    return (
        f"migration-fsm gate {gate.worker_id} cannot reach the execution ledger, starting no task:"
        f" DatabaseUnavailable: ledger database {gate.ledger.safe_url} is unavailable: no such table: {table}"
    )


# -- arguments -------------------------------------------------------------------------------


def test_a_side_other_than_old_or_new_is_refused_by_name(client: PhaseClient, store: Journal) -> None:
    """`side` is checked before anything is registered."""
    with pytest.raises(ValueError, match=r"^side must be 'old' or 'new', not 'both'$"):
        WorkerGate(client, "both", "w", background=False)
    assert [] == Workers(store.engine).records(M)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"worker_ttl_seconds": 0},
        {"worker_ttl_seconds": -1},
        {"poll_seconds": 0},
        {"poll_seconds": -0.5},
    ],
    ids=["ttl-zero", "ttl-negative", "poll-zero", "poll-negative"],
)
def test_a_ttl_or_poll_interval_that_is_not_positive_is_refused(
    client: PhaseClient, kwargs: dict[str, float]
) -> None:
    with pytest.raises(ValueError, match=r"^worker_ttl_seconds and poll_seconds must be positive$"):
        WorkerGate(client, "old", "w", background=False, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"finish_batch_seconds": 0},
        {"finish_batch_seconds": -1},
        {"finish_batch_size": 0},
        {"finish_batch_seconds": 5, "finish_batch_size": 0},
    ],
    ids=["seconds-zero", "seconds-negative", "size-zero", "size-zero-batching"],
)
def test_batch_settings_out_of_range_are_refused(client: PhaseClient, kwargs: dict[str, float]) -> None:
    with pytest.raises(
        ValueError,
        match=r"^finish_batch_seconds must be positive \(or None\) and finish_batch_size >= 1$",
    ):
        WorkerGate(client, "old", "w", background=False, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"worker_ttl_seconds": 0.5, "poll_seconds": 0.5},
        {"finish_batch_seconds": None, "finish_batch_size": 1},
        {"finish_batch_seconds": 0.5, "finish_batch_size": 1},
    ],
    ids=["under-a-second", "no-batching-size-one", "batching-size-one"],
)
def test_small_positive_settings_are_accepted(
    client: PhaseClient, store: Journal, kwargs: dict[str, Any]
) -> None:
    """The bounds are strict: any positive time and a batch of one are valid."""
    gate = _gate(client, "old", "w", **kwargs)
    try:
        assert gate.acknowledged_version == store.get(M).version
    finally:
        gate.close()


def test_a_gate_made_with_defaults(client: PhaseClient, store: Journal) -> None:
    """The documented defaults: an id `host:pid:random`, the operators' default ttl (so this
    gate and `pause_consumers` judge workers alike), a heartbeat every third of it, a poll every
    50 ms, finishes written one by one (or 256 at a time when batching), and a background
    thread that is a daemon (a forgotten `close()` never keeps the process alive) named after
    the migration and side; no flusher thread."""
    gate = WorkerGate(client, "old")
    try:
        host, pid, suffix = gate.worker_id.split(":")
        assert (socket.gethostname(), str(os.getpid())) == (host, pid)
        assert re.fullmatch(r"[0-9a-f]{6}", suffix)
        with WorkerGate(client, "old", background=False) as second:
            assert second.worker_id != gate.worker_id  # random per gate, not only per process
        assert Settings.model_fields["worker_ttl_seconds"].default == gate.workers.ttl_seconds
        assert (10.0, 0.05, None, 256) == (
            gate.heartbeat_seconds,
            gate.poll_seconds,
            gate.finish_batch_seconds,
            gate.finish_batch_size,
        )
        threads = {t.name: t for t in threading.enumerate()}
        assert threads["migration-fsm-gate-default-old"].daemon
        assert "migration-fsm-gate-flush-default-old" not in threads
        assert not _record(store, "old", gate.worker_id).defers_finishes
    finally:
        gate.close()
    assert "migration-fsm-gate-default-old" not in {t.name for t in threading.enumerate()}


def test_a_batching_gate_runs_a_flusher_thread_too(client: PhaseClient, store: Journal) -> None:
    """Both threads are daemons named after the migration and side; both stop on `close()`."""
    gate = WorkerGate(client, "new", "n1", finish_batch_seconds=3600)
    try:
        threads = {t.name: t for t in threading.enumerate()}
        assert threads["migration-fsm-gate-default-new"].daemon
        assert threads["migration-fsm-gate-flush-default-new"].daemon
        assert _record(store, "new", "n1").defers_finishes  # said at the registration
    finally:
        gate.close()
    names = {t.name for t in threading.enumerate()}
    assert not names & {"migration-fsm-gate-default-new", "migration-fsm-gate-flush-default-new"}


def test_a_batching_gate_s_refresh_leaves_its_finishes_to_the_flusher(client: PhaseClient) -> None:
    """With a flusher thread, finishes are written every `finish_batch_seconds` (or when
    `finish_batch_size` wait, or on `close()`), not by the refresh every `poll_seconds`."""
    gate = WorkerGate(client, "old", "o1", finish_batch_seconds=3600)
    try:
        with gate.executing("a") as run:
            assert run.allowed
        gate.refresh()  # what the background thread runs every poll_seconds
        assert 1 == gate.counters()["pending_finishes"]
    finally:
        gate.close()
    assert 0 == gate.counters()["pending_finishes"]  # written by close()


# -- registration and heartbeat --------------------------------------------------------------------


def test_the_registration_row_names_host_pid_version_and_no_deferral(
    client: PhaseClient, store: Journal
) -> None:
    gate = _gate(client, "old", "o1")
    try:
        record = _record(store, "old", "o1")
        assert (socket.gethostname(), os.getpid(), store.get(M).version, False) == (
            record.host,
            record.pid,
            record.seen_version,
            record.defers_finishes,
        )
    finally:
        gate.close()


@pytest.mark.parametrize(
    ("kwargs", "interval"),
    [({}, 10.0), ({"worker_ttl_seconds": 90.0}, 30.0), ({"heartbeat_seconds": 2.5}, 2.5)],
    ids=["default", "a-third-of-the-ttl", "explicit"],
)
def test_the_heartbeat_is_written_every_heartbeat_seconds(
    client: PhaseClient,
    store: Journal,
    monkeypatch: pytest.MonkeyPatch,
    kwargs: dict[str, float],
    interval: float,
) -> None:
    """A refresh renews the heartbeat once `heartbeat_seconds` (a third of the ttl unless
    given) have passed since the last one, not before (on a test clock)."""
    clock = FakeClock(1000.0)
    monkeypatch.setattr(gate_module, "time", clock)
    gate = _gate(client, "old", "o1", **kwargs)
    try:
        _age(store, "o1", 3600)
        clock.now = 1000.0 + interval - 0.001
        gate.refresh()
        assert not _renewed(store, "o1")
        clock.now = 1000.0 + interval
        gate.refresh()
        assert _renewed(store, "o1")
    finally:
        gate.close()


def test_a_restored_database_is_acknowledged_at_its_lower_version(
    client: PhaseClient, store: Journal, engine: Migration
) -> None:
    """After a restore the gate acknowledges exactly what it applied, lower than before: a
    higher `seen_version` left in the row would count as acknowledging versions (a pause among
    them) this worker never applied."""
    gate = _gate(client, "old", "o1")
    try:
        engine.advance()
        engine.advance()
        client.refresh()
        high = gate.refresh()
        assert high == _seen(store, "old", "o1")
        _set_row(engine, version=high - 1, phase="dual_write")
        client.refresh()
        assert high - 1 == gate.refresh()
        assert high - 1 == _seen(store, "old", "o1")
    finally:
        gate.close()


def test_a_gate_that_cannot_register_starts_no_task_until_it_does(
    client: PhaseClient, store: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    """The workers' table cannot be written when the gate is made: no task is started
    (`not_registered`, counted as unavailable), one warning however many refreshes fail, and
    the first refresh that can write registers the gate."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with _away(store, "mfsm_workers"):
        gate = _gate(client, "old", "o1")
        assert [None] == [gate.acknowledged_version]  # (not `is None`: mypy would keep it None)
        gate.refresh()
        with gate.executing("k") as run:
            assert Run("k", False, "not_registered") == run
    try:
        assert [f"migration-fsm gate o1 cannot heartbeat: {NO_WORKERS_TABLE}"] == _warnings(caplog)
        warning = next(r for r in caplog.records if r.name == LOGGER)
        assert (M, "old") == (vars(warning)["migration"], vars(warning)["side"])
        assert 1 == gate.counters()["unavailable"]
        version = store.get(M).version
        assert version == gate.refresh()
        assert version == gate.acknowledged_version == _seen(store, "old", "o1")
        with gate.executing("k") as run:
            assert (True, "claimed") == (run.allowed, run.reason)
    finally:
        gate.close()


def test_a_heartbeat_outage_warns_once_and_the_next_refresh_heartbeats(
    client: PhaseClient, store: Journal, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Once registered, a heartbeat that cannot be written is retried at every refresh (not
    at the next interval), with one warning per outage; tasks still run meanwhile."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    clock = FakeClock(1000.0)
    monkeypatch.setattr(gate_module, "time", clock)
    gate = _gate(client, "old", "o1")
    try:
        clock.now = 1010.0
        with _away(store, "mfsm_workers"):
            gate.refresh()
            gate.refresh()
            with gate.executing("k") as run:
                assert run.allowed
        assert [f"migration-fsm gate o1 cannot heartbeat: {NO_WORKERS_TABLE}"] == _warnings(caplog)
        _age(store, "o1", 3600)
        gate.refresh()  # the same instant: the heartbeat is due since it failed
        assert _renewed(store, "o1")
        clock.now = 1020.0
        with _away(store, "mfsm_workers"):
            gate.refresh()  # a second outage: warned again
        assert 2 == len(_warnings(caplog))
    finally:
        gate.close()


def test_an_explicit_ttl_decides_when_this_gate_takes_a_claim_over(
    client: PhaseClient, store: Journal
) -> None:
    """The gate's ledger judges another worker gone after the gate's `worker_ttl_seconds`."""
    gate = _gate(client, "old", "o1", worker_ttl_seconds=1000)
    try:
        Workers(store.engine).heartbeat(M, "old", "ghost", seen_version=0)
        assert gate.ledger.claim(M, "k", "old", "ghost").allowed
        _age(store, "ghost", 500)
        with gate.executing("k") as run:
            assert (False, "running") == (run.allowed, run.reason)
        _age(store, "ghost", 2000)
        with gate.executing("k") as run:
            assert (True, "taken_over") == (run.allowed, run.reason)
    finally:
        gate.close()


# -- claims, runs and counters ----------------------------------------------------------------


def test_each_run_says_its_key_and_why_and_the_claim_is_this_worker_s(
    client: PhaseClient, store: Journal
) -> None:
    old, new = _gate(client, "old", "o1"), _gate(client, "new", "n1")
    try:
        with old.executing("a") as run:
            assert (run.key, run.allowed, run.reason, run.outcome) == ("a", True, "claimed", None)
            assert run.claim is not None
            assert (M, "a", "old", "o1", 1) == (
                run.claim.migration,
                run.claim.key,
                run.claim.side,
                run.claim.worker_id,
                run.claim.attempt,
            )
        assert "succeeded" == run.outcome
        assert ClaimState("old", "o1", 1, "succeeded") == old.ledger.claim_of(M, "a")
        with new.executing("a") as refused:
            assert Run("a", False, "succeeded") == refused
        with _away(store, "mfsm_execution_claims"), old.executing("b") as unavailable:
            assert Run("b", False, "ledger_unavailable") == unavailable
    finally:
        old.close()
        new.close()


def test_counters_count_what_the_gate_did(client: PhaseClient, store: Journal) -> None:
    """`counters()`: claims allowed, refused and not attempted, outcomes, finishes waiting,
    the applied version and whether the worker may consume (1.0 or 0.0)."""
    gate = _gate(client, "old", "o1", finish_batch_seconds=3600)
    other = _gate(client, "new", "n1")
    version = float(store.get(M).version)
    try:
        assert {
            "claimed": 0,
            "refused": 0,
            "unavailable": 0,
            "succeeded": 0,
            "failed": 0,
            "pending_finishes": 0,
            "applied_version": version,
            "may_consume": 1.0,
        } == gate.counters()
        with gate.executing("a"):
            pass
        with suppress(RuntimeError), gate.executing("b"):
            raise RuntimeError
        with other.executing("c"):
            pass
        with gate.executing("c") as refused:
            assert not refused.allowed
        with _away(store, "mfsm_execution_claims"), gate.executing("d") as unavailable:
            assert not unavailable.allowed
        assert {
            "claimed": 2,
            "refused": 1,
            "unavailable": 1,
            "succeeded": 1,
            "failed": 1,
            "pending_finishes": 2,
            "applied_version": version,
            "may_consume": 1.0,
        } == gate.counters()
        assert 0.0 == other.counters()["may_consume"]  # preparation consumes from old only
    finally:
        gate.close()
        other.close()


# -- the ledger's outages and finishes ------------------------------------------------------------


def test_a_ledger_outage_warns_once_and_its_end_once(
    client: PhaseClient, store: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing is logged while the ledger answers; an outage warns once (with the migration
    and side as log fields) however many claims fail, its end once, and the next outage again."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    gate = _gate(client, "old", "o1")
    try:
        with gate.executing("a") as run:
            assert run.allowed
        assert [] == _warnings(caplog)
        with _away(store, "mfsm_execution_claims"):
            for key in ("b", "c"):
                with gate.executing(key) as run:
                    assert not run.allowed
        for key in ("b", "c"):
            with gate.executing(key) as run:
                assert run.allowed
        with _away(store, "mfsm_execution_claims"), gate.executing("d") as run:
            assert not run.allowed
        down = _ledger_down(gate, "mfsm_execution_claims")
        assert [down, "migration-fsm gate o1 reaches the execution ledger again", down] == _warnings(caplog)
        first = next(r for r in caplog.records if r.name == LOGGER)
        assert (M, "old") == (vars(first)["migration"], vars(first)["side"])
    finally:
        gate.close()


def test_a_finish_the_ledger_refuses_is_kept_retried_and_marks_the_worker(
    client: PhaseClient, store: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    """A finish that cannot be written is kept (the task is not run again elsewhere: the
    claim stays running, and the worker's row now says it defers finishes, so a crash from
    here is never taken over) and written by a later refresh."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    gate = _gate(client, "old", "o1")
    other = _gate(client, "old", "o2")
    try:
        with ExitStack() as outage:
            with gate.executing("k") as run:
                assert run.allowed
                outage.enter_context(_away(store, "mfsm_executions"))  # after the claim
            assert "succeeded" == run.outcome
            assert (1, 1) == (gate.counters()["succeeded"], gate.counters()["pending_finishes"])
            gate.refresh()  # heartbeats at once to say so; the retry fails again
            assert _record(store, "old", "o1").defers_finishes
            assert 1 == gate.counters()["pending_finishes"]
        with other.executing("k") as meanwhile:
            assert (False, "running") == (meanwhile.allowed, meanwhile.reason)
        gate.refresh()
        assert 0 == gate.counters()["pending_finishes"]
        assert ClaimState("old", "o1", 1, "succeeded") == gate.ledger.claim_of(M, "k")
        assert [
            _ledger_down(gate, "mfsm_executions"),
            "migration-fsm gate o1 reaches the execution ledger again",
        ] == _warnings(caplog)
    finally:
        gate.close()
        other.close()
    assert [] == Workers(store.engine).records(M)  # every finish written: deregistered


def test_a_gate_closed_with_a_finish_unwritten_is_never_taken_over(
    client: PhaseClient, store: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    """A gate closed right after a finish failed (no refresh in between) still leaves a row
    that says it deferred a finish: once it is gone, its running claim (of a task that ran) is
    refused, not taken over and run a second time."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    gate = _gate(client, "old", "o1")
    with ExitStack() as outage:
        with gate.executing("ran") as run:
            assert run.allowed
            outage.enter_context(_away(store, "mfsm_executions"))  # after the claim
        gate.close()
    closes = "migration-fsm gate o1 closes with 1 finishes not written: its claims stay running"
    assert closes == _warnings(caplog)[-1]
    closing = [r for r in caplog.records if r.name == LOGGER][-1]
    assert (M, "old") == (vars(closing)["migration"], vars(closing)["side"])
    assert _record(store, "old", "o1").defers_finishes
    _age(store, "o1", 3600)
    heir = _gate(client, "old", "heir")
    try:
        with heir.executing("ran") as again:
            assert (False, "running") == (again.allowed, again.reason)
    finally:
        heir.close()


def test_a_finish_failing_during_a_heartbeat_is_said_at_the_next_refresh(
    client: PhaseClient, store: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finish fails (on a worker's thread) while a heartbeat is being written (on the
    gate's thread) with the row's old "no deferred finish": the next refresh writes the
    deferral at once, not a heartbeat interval later (a crash in between would let the claim
    of the task that ran be taken over). On a test clock."""
    clock = FakeClock(1000.0)
    monkeypatch.setattr(gate_module, "time", clock)
    gate = _gate(client, "old", "o1")
    real = gate.workers.heartbeat
    with ExitStack() as outage:

        def meanwhile(*args: Any, **kwargs: Any) -> None:
            monkeypatch.setattr(gate.workers, "heartbeat", real)
            with gate.executing("k") as run:
                assert run.allowed
                outage.enter_context(_away(store, "mfsm_executions"))  # its finish fails
            real(*args, **kwargs)

        monkeypatch.setattr(gate.workers, "heartbeat", meanwhile)
        try:
            clock.now = 1010.0  # the heartbeat is due
            gate.refresh()
            assert not _record(store, "old", "o1").defers_finishes  # written as it was read
            gate.refresh()  # the same instant
            assert _record(store, "old", "o1").defers_finishes
        finally:
            outage.close()
            gate.close()


def test_a_finish_ending_while_a_failing_flush_is_in_flight_is_kept(
    client: PhaseClient, store: Journal, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Batched finishes: a task that finishes while a batch is being written, the write then
    failing, is kept with the batch (none lost), and the next flush writes all of them. The
    failed flush starts an outage, warned once, and the good one ends it."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    gate = _gate(client, "old", "o1", finish_batch_seconds=3600, finish_batch_size=2)
    real = gate.ledger.finish_many

    def in_flight(batch: list[Any]) -> int:
        monkeypatch.setattr(gate.ledger, "finish_many", real)
        with gate.executing("late") as late:  # pending alone: not a full batch
            assert late.allowed
        with _away(store, "mfsm_executions"):
            return real(batch)

    monkeypatch.setattr(gate.ledger, "finish_many", in_flight)
    try:
        for key in ("a", "b"):  # the second fills the batch: written at once, and fails
            with gate.executing(key):
                pass
        assert 3 == gate.counters()["pending_finishes"]
        assert gate.flush()
        claims = gate.ledger.claims_of(M, ["a", "b", "late"])
        assert {"a": "succeeded", "b": "succeeded", "late": "succeeded"} == {
            key: claim.state for key, claim in claims.items()
        }
        assert [
            _ledger_down(gate, "mfsm_executions"),
            "migration-fsm gate o1 reaches the execution ledger again",
        ] == _warnings(caplog)
    finally:
        gate.close()


class Interrupt(BaseException):
    """Ctrl-C (or any interruption no `except Exception` catches) while a finish is written."""


@pytest.mark.parametrize("batching", [False, True], ids=["one-by-one", "batched"])
def test_an_interrupted_finish_is_kept_and_written_by_close(
    client: PhaseClient, store: Journal, monkeypatch: pytest.MonkeyPatch, batching: bool
) -> None:
    """A finish whose write is interrupted is not dropped: `close()` writes it before it
    deregisters, so the task that ran is refused to every other worker, not taken over."""
    kwargs: dict[str, Any] = {"finish_batch_seconds": 3600, "finish_batch_size": 1} if batching else {}
    gate = _gate(client, "old", "o1", **kwargs)
    real = gate.ledger.finish_many

    def interrupted(batch: list[Any]) -> int:
        monkeypatch.setattr(gate.ledger, "finish_many", real)
        raise Interrupt

    monkeypatch.setattr(gate.ledger, "finish_many", interrupted)
    with pytest.raises(Interrupt), gate.executing("ran") as run:
        assert run.allowed
    assert 1 == gate.counters()["pending_finishes"]
    gate.close()
    assert [] == Workers(store.engine).records(M)
    heir = _gate(client, "old", "heir")
    try:
        with heir.executing("ran") as again:
            assert Run("ran", False, "succeeded") == again
    finally:
        heir.close()


# -- the background threads -------------------------------------------------------------------


def test_the_flusher_writes_a_full_batch_at_once_and_the_rest_on_time(
    client: PhaseClient, store: Journal
) -> None:
    """With a flusher thread, a full batch is written as soon as it is full (not at the next
    `finish_batch_seconds`); with a short `finish_batch_seconds`, a lone finish is written too.
    (The gates' other thread, which also flushes at each refresh, polls once an hour here.)"""
    full = WorkerGate(
        client, "old", "full", poll_seconds=3600, finish_batch_seconds=3600, finish_batch_size=2
    )
    timed = WorkerGate(client, "old", "timed", poll_seconds=3600, finish_batch_seconds=0.01)
    try:
        for key in ("a", "b"):
            with full.executing(key):
                pass
        with timed.executing("c"):
            pass
        wait_until(lambda: full.ledger.counts(M).succeeded == 3, "both flushers write")
        assert 0 == full.counters()["pending_finishes"] == timed.counters()["pending_finishes"]
    finally:
        full.close()
        timed.close()


def test_the_background_thread_survives_an_unexpected_error(
    upgraded_url: str,
    engine: Migration,
    store: Journal,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An error the gate does not expect (here from the client) is logged with the worker's id
    and the next round goes on applying and acknowledging."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with PhaseClient(upgraded_url, ttl=3600, listen=False) as phase_client:
        real = phase_client.snapshot
        failed = threading.Event()

        def snapshot_once_broken() -> Any:
            if threading.current_thread().name.startswith("migration-fsm-gate") and not failed.is_set():
                failed.set()
                raise RuntimeError("boom\nsecond line")
            return real()

        with WorkerGate(phase_client, "old", "bg", poll_seconds=0.01) as gate:
            monkeypatch.setattr(phase_client, "snapshot", snapshot_once_broken)
            wait_until(failed.is_set, "the background thread meets the error")
            paused = _transition(store).pause("old")
            phase_client.refresh()
            wait_until(lambda: gate.acknowledged_version == paused, "the thread goes on")
    assert ["migration-fsm gate bg: RuntimeError: boom"] == _warnings(caplog)


def test_the_flusher_survives_an_unexpected_error_and_loses_no_finish(
    client: PhaseClient, store: Journal, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    gate = WorkerGate(client, "old", "o1", poll_seconds=3600, finish_batch_seconds=0.01)  # the flusher writes
    real = gate.ledger.finish_many

    def broken_once(batch: list[Any]) -> int:
        monkeypatch.setattr(gate.ledger, "finish_many", real)
        raise RuntimeError("boom")

    try:
        monkeypatch.setattr(gate.ledger, "finish_many", broken_once)
        with gate.executing("k"):
            pass
        wait_until(lambda: gate.ledger.counts(M).succeeded == 1, "the next round writes the finish")
    finally:
        gate.close()
    assert ["migration-fsm gate o1: RuntimeError: boom"] == _warnings(caplog)


# -- where the ledger is ------------------------------------------------------------------------


def test_a_ledger_url_keeps_the_claims_in_its_own_database(
    client: PhaseClient, store: Journal, tmp_path: Path, head_schema: dict[str, Any]
) -> None:
    """With `ledger_url` the claims and executions are written there; the workers' table
    stays in the client's database."""
    shutil.copy(head_schema["sqlite"], tmp_path / "ledger.db")
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    gate = _gate(client, "old", "o1", ledger_url=ledger_url)
    try:
        with gate.executing("k") as run:
            assert run.allowed
        with Ledger(ledger_url) as own, Ledger(store.url) as main:
            assert ClaimState("old", "o1", 1, "succeeded") == own.claim_of(M, "k")
            assert main.claim_of(M, "k") is None
        assert "o1" == _record(store, "old", "o1").worker_id
    finally:
        gate.close()
