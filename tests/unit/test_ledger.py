"""The execution ledger (`journal/ledger.py`) on SQLite and on PostgreSQL: one live claim per
key across both sides, decided by a single statement under the claims' primary key; refusals
counted; a failed attempt retried by its own side only; a gone worker's running claim taken
over; hand-over to the receiving side; the counts `validate` and `status` show."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import event, update

from migration_fsm.exceptions import DatabaseUnavailable
from migration_fsm.journal import Journal, make_engine, utcnow
from migration_fsm.journal.ledger import Claim, Ledger
from migration_fsm.journal.schema import workers_table
from migration_fsm.journal.workers import Workers
from tests.support.pgtrace import pg_trace

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

M = "default"


@pytest.fixture
def workers(store: Journal) -> Workers:
    return Workers(store.engine, ttl_seconds=30)


@pytest.fixture
def ledger(upgraded_url: str, workers: Workers) -> Iterator[Ledger]:
    with Ledger(upgraded_url, workers=workers) as opened:
        yield opened


def _age(store: Journal, side: str, worker_id: str, seconds: float) -> None:
    """Make a worker's last heartbeat `seconds` old."""
    c = workers_table.c
    with store.transaction() as conn:
        conn.execute(
            update(workers_table)
            .where(c.side == side, c.worker_id == worker_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )


def test_a_new_key_is_claimed_then_a_second_claim_is_refused_and_counted(
    ledger: Ledger, workers: Workers
) -> None:
    workers.register(M, "old", "w1")
    first = ledger.claim(M, "k1", "old", "w1")
    assert first.allowed
    assert first.claim == Claim(M, "k1", "old", "w1", 1)
    running = ledger.claim(M, "k1", "new", "w2")
    assert not running.allowed
    assert running.reason == "running"
    assert running.holder == ("old", "w1")
    assert ledger.finish(first.claim, "succeeded")
    again = ledger.claim(M, "k1", "old", "w3")
    assert not again.allowed
    assert again.reason == "succeeded"
    counts = ledger.counts(M)
    assert counts.refused_executions == 2
    assert counts.refused_by_side == {"old": 1, "new": 1}
    assert (counts.succeeded, counts.running, counts.executed_twice) == (1, 0, 0)
    assert [e.outcome for e in ledger.executions(M, "k1")] == ["succeeded"]


def test_a_failed_attempt_is_retried_by_its_own_side_only(ledger: Ledger) -> None:
    first = ledger.claim(M, "k", "old", "w1")
    assert first.claim is not None
    ledger.finish(first.claim, "failed")
    other = ledger.claim(M, "k", "new", "n1")
    assert not other.allowed
    assert other.reason == "failed"
    retry = ledger.claim(M, "k", "old", "w2")
    assert retry.allowed
    assert retry.claim is not None
    assert retry.claim.attempt == 2
    ledger.finish(retry.claim, "succeeded")
    assert [(e.attempt, e.outcome) for e in ledger.executions(M, "k")] == [(1, "failed"), (2, "succeeded")]
    assert ledger.succeeded_keys(M, "old") == ["k"]
    assert ledger.succeeded_keys(M, "new") == []


def test_a_running_claim_of_a_gone_worker_is_taken_over(
    ledger: Ledger, workers: Workers, store: Journal
) -> None:
    workers.register(M, "old", "dead")
    workers.register(M, "old", "alive")
    dead = ledger.claim(M, "k", "old", "dead")
    assert dead.claim is not None
    assert not ledger.claim(M, "k", "new", "n1").allowed  # the holder is live: refused
    _age(store, "old", "dead", 31)
    taken = ledger.claim(M, "k", "new", "n1")
    assert taken.allowed
    assert taken.reason == "taken_over"
    assert taken.holder == ("old", "dead")
    assert taken.claim is not None
    assert taken.claim.attempt == 2
    # The gone worker comes back and finishes: recorded as it went, but the claim is not its.
    assert not ledger.finish(dead.claim, "failed")
    assert ledger.finish(taken.claim, "succeeded")
    assert [(e.side, e.outcome) for e in ledger.executions(M, "k")] == [
        ("old", "failed"),
        ("new", "succeeded"),
    ]


def test_a_running_claim_of_a_live_worker_is_never_taken_over(ledger: Ledger, workers: Workers) -> None:
    workers.register(M, "old", "alive")
    assert ledger.claim(M, "k", "old", "alive").allowed
    assert not ledger.claim(M, "k", "old", "other").allowed
    assert ledger.counts(M).running == 1


def test_a_late_success_after_a_take_over_is_counted_as_executed_twice(
    ledger: Ledger, workers: Workers, store: Journal
) -> None:
    """`executed_twice` is counted from what really ran, not assumed to be 0."""
    workers.register(M, "old", "slow")
    slow = ledger.claim(M, "k", "old", "slow")
    _age(store, "old", "slow", 60)
    taken = ledger.claim(M, "k", "new", "n1")
    assert slow.claim is not None
    assert taken.claim is not None
    ledger.finish(taken.claim, "succeeded")
    ledger.finish(slow.claim, "succeeded")
    assert ledger.counts(M).executed_twice == 1


def test_hand_over_gives_the_key_to_the_receiving_side_only(ledger: Ledger) -> None:
    running = ledger.claim(M, "k", "old", "w1")
    assert running.claim is not None
    assert ledger.hand_over(M, "k", "old", "new")
    assert ledger.hand_over(M, "k", "old", "new")  # idempotent: a drain run again
    assert not ledger.claim(M, "k", "old", "w2").allowed
    received = ledger.claim(M, "k", "new", "n1")
    assert received.allowed
    assert received.claim is not None
    assert received.claim.attempt == 2
    assert [e.outcome for e in ledger.executions(M, "k")] == ["handed_over", "running"]
    assert ledger.counts(M).handed_over == 1
    assert not ledger.hand_over(M, "k", "old", "new")  # now running on new: nothing to re-queue


def test_hand_over_of_a_key_never_claimed_keeps_the_giving_side_out(ledger: Ledger) -> None:
    assert ledger.hand_over(M, "never", "old", "new")
    assert not ledger.claim(M, "never", "old", "w").allowed
    claimed = ledger.claim(M, "never", "new", "n")
    assert claimed.allowed
    assert claimed.claim is not None
    assert claimed.claim.attempt == 1


def test_hand_over_of_a_succeeded_key_is_refused(ledger: Ledger) -> None:
    done = ledger.claim(M, "k", "old", "w")
    assert done.claim is not None
    ledger.finish(done.claim, "succeeded")
    assert not ledger.hand_over(M, "k", "old", "new")


def test_a_late_success_after_a_hand_over_nobody_claimed_closes_the_key(ledger: Ledger) -> None:
    slow = ledger.claim(M, "k", "old", "w")
    assert slow.claim is not None
    ledger.hand_over(M, "k", "old", "new")
    assert ledger.finish(slow.claim, "succeeded")
    refused = ledger.claim(M, "k", "new", "n")
    assert not refused.allowed
    assert refused.reason == "succeeded"
    assert ledger.counts(M).executed_twice == 0


def test_finish_many_is_one_batch(ledger: Ledger) -> None:
    claims = [ledger.claim(M, f"k{i}", "new", "n").claim for i in range(5)]
    assert ledger.finish_many([(c, "succeeded") for c in claims if c is not None]) == 5
    assert ledger.counts(M).succeeded == 5
    assert ledger.succeeded_keys(M, "new", after="k1", limit=2) == ["k2", "k3"]
    with pytest.raises(ValueError, match="succeeded or failed"):
        ledger.finish_many([(Claim(M, "k0", "new", "n", 1), "running")])


def test_claims_raced_from_many_threads_have_exactly_one_winner(ledger: Ledger, workers: Workers) -> None:
    """16 workers of both sides claim the same keys at once: one winner per key."""
    threads, keys = 16, 20
    for i in range(threads):
        workers.register(M, "old" if i % 2 else "new", f"w{i}")
    barrier = threading.Barrier(threads)
    wins: Counter[str] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            for k in range(keys):
                result = ledger.claim(M, f"key-{k}", "old" if i % 2 else "new", f"w{i}")
                if result.allowed:
                    with lock:
                        wins[f"key-{k}"] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert errors == []
    assert wins == Counter({f"key-{k}": 1 for k in range(keys)})
    counts = ledger.counts(M)
    assert (counts.running, counts.refused_executions) == (keys, keys * (threads - 1))


def test_claim_is_one_statement_under_the_constraint(upgraded_url: str) -> None:
    """No read before the write: a claim that wins runs the upsert and the history insert."""
    engine = make_engine(upgraded_url)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2].split()[0].upper()))
    with Ledger(upgraded_url, engine=engine) as ledger:
        if ledger.dialect == "postgresql":
            # One data-modifying CTE in one round trip, committed by itself, on the thread's
            # raw connection (not through the engine): see test_ledger_connections.py.
            with pg_trace(ledger) as trace:
                assert ledger.claim(M, "k", "old", "w").allowed
            assert trace.statements == ["WITH"]
            assert trace.round_trips == 1
            assert statements == []
        else:
            statements.clear()
            assert ledger.claim(M, "k", "old", "w").allowed
            # SQLite: the upsert, then the history row, in one BEGIN IMMEDIATE transaction.
            assert [s for s in statements if s not in ("BEGIN",)] == ["INSERT", "INSERT"]
    engine.dispose()  # the ledger leaves an engine it was given alone


def test_an_unreachable_ledger_raises_database_unavailable(tmp_path: object) -> None:
    ledger = Ledger("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(DatabaseUnavailable, match="ledger database"):
        ledger.claim(M, "k", "old", "w")
    ledger.close()


def test_sqlite_has_no_raw_connections(tmp_path: Path) -> None:
    """The raw psycopg hot path is PostgreSQL's (test_ledger_connections.py); SQLite's ledger
    goes through the engine alone."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    journal = Journal(url, engine=make_engine(url, create=True))
    journal.upgrade()
    journal.close()
    with Ledger(url) as ledger:
        assert ledger.claim("m", "k", "new", "w").allowed
        assert ledger._pg is None
