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

from migration_fsm.exceptions import DatabaseUnavailable, SchemaNotCurrent
from migration_fsm.journal import Journal, make_engine, utcnow
from migration_fsm.journal.ledger import Claim, ClaimResult, ClaimState, Ledger, LedgerCounts
from migration_fsm.journal.schema import execution_claims_table, workers_table
from migration_fsm.journal.workers import Workers
from tests.support.pgtrace import pg_trace

if TYPE_CHECKING:
    from collections.abc import Iterator
    from datetime import datetime
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


def test_an_unreachable_ledger_raises_database_unavailable(tmp_path: Path) -> None:
    """The error names the ledger's database by its URL, with its password masked (the raw
    connections of the hot path and the engine's alike)."""
    ledger = Ledger("postgresql+psycopg://postgres:S3cretPlanted@127.0.0.1:1/nowhere")
    with pytest.raises(DatabaseUnavailable, match="ledger database") as info:
        ledger.claim(M, "k", "old", "w")
    ledger.close()
    assert str(info.value).startswith(
        "ledger database postgresql+psycopg://postgres:***@127.0.0.1:1/nowhere is unavailable: "
    ), info.value
    assert "S3cretPlanted" not in str(info.value)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    journal = Journal(url, engine=make_engine(url, create=True))
    journal.upgrade()
    journal.close()
    with Ledger(url) as ledger:
        with ledger.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE mfsm_execution_claims RENAME TO elsewhere")
        with pytest.raises(DatabaseUnavailable) as info:
            ledger.claim_of(M, "k")
    assert f"ledger database {url} is unavailable: no such table: mfsm_execution_claims" == str(info.value)


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


# -- the rest of the ledger's contract (each assertion fails on a mutation of ledger.py) -----


def test_a_claim_names_a_side(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match=r"^side must be 'old' or 'new', not 'both'$"):
        ledger.claim(M, "k", "both", "w")
    assert ledger.claim_of(M, "k") is None


@pytest.mark.parametrize(("from_side", "to_side"), [("old", "old"), ("old", "both")])
def test_a_hand_over_goes_from_one_side_to_the_other(ledger: Ledger, from_side: str, to_side: str) -> None:
    with pytest.raises(ValueError, match="a hand-over goes from one side") as info:
        ledger.hand_over(M, "k", from_side, to_side)
    assert f"a hand-over goes from one side to the other, not {from_side!r} -> {to_side!r}" == str(info.value)
    assert ledger.claim_of(M, "k") is None


def test_the_history_and_the_claim_read_back_as_they_went(ledger: Ledger) -> None:
    before = utcnow()
    first = ledger.claim(M, "k", "old", "w1")
    assert first.claim is not None
    assert ClaimState("old", "w1", 1, "running") == ledger.claim_of(M, "k")
    (running,) = ledger.executions(M, "k")
    assert (M, "k", 1, "old", "w1", None, "running") == (
        running.migration,
        running.key,
        running.attempt,
        running.side,
        running.worker_id,
        running.finished_at,
        running.outcome,
    )
    assert before <= running.started_at <= utcnow()
    assert ledger.finish(first.claim, "failed")
    assert ClaimState("old", "w1", 1, "failed") == ledger.claim_of(M, "k")
    (failed,) = ledger.executions(M, "k")
    assert failed.finished_at is not None
    assert running.started_at <= failed.finished_at <= utcnow()
    again = ledger.claim(M, "k", "old", "w2")
    assert again.claim == Claim(M, "k", "old", "w2", 2)
    assert ClaimState("old", "w2", 2, "running") == ledger.claim_of(M, "k")
    assert [(1, "w1", "failed"), (2, "w2", "running")] == [
        (e.attempt, e.worker_id, e.outcome) for e in ledger.executions(M, "k")
    ]


def test_one_migration_s_claims_leave_another_s_alone(ledger: Ledger, workers: Workers) -> None:
    """Every statement is scoped to its migration: the same key of another one is another claim."""
    workers.register("other", "old", "w1")
    mine = ledger.claim(M, "k", "old", "w1")
    theirs = ledger.claim("other", "k", "old", "w1")
    assert mine.allowed
    assert theirs.allowed
    assert mine.claim is not None
    assert ledger.finish(mine.claim, "failed")
    assert ledger.hand_over(M, "k", "old", "new")
    assert ledger.claim_of("other", "k") == ClaimState("old", "w1", 1, "running")
    assert not ledger.claim("other", "k", "new", "w2").allowed
    assert ledger.claims_of("other", ["k"]) == {"k": ClaimState("old", "w1", 1, "running")}
    assert [1] == [e.attempt for e in ledger.executions("other", "k")]
    assert (1, 0, 0) == (
        ledger.counts("other").running,
        ledger.counts(M).running,
        ledger.counts(M).refused_executions,
    )
    assert {"old": 0, "new": 1} == ledger.counts("other").refused_by_side


def test_claims_of_reads_many_keys_at_once(ledger: Ledger) -> None:
    assert {} == ledger.claims_of(M, [])
    ledger.claim(M, "a", "old", "w1")
    ledger.hand_over(M, "b", "old", "new")
    assert {
        "a": ClaimState("old", "w1", 1, "running"),
        "b": ClaimState("new", None, 0, "handed_over"),
    } == ledger.claims_of(M, iter(["a", "b", "c"]))


def test_claims_of_reads_the_keys_asked_of_one_migration_only(ledger: Ledger) -> None:
    ledger.claim(M, "a", "old", "w1")
    ledger.claim(M, "d", "old", "w1")  # not asked for
    ledger.claim("other", "a", "new", "n1")  # the same key in another migration
    ledger.claim("other", "c", "new", "n1")
    assert {"a": ClaimState("old", "w1", 1, "running")} == ledger.claims_of(M, ["a", "c"])


def test_owned_keys_pages_between_bounds(ledger: Ledger) -> None:
    for key in ("a", "b", "c", "d", "e"):
        ledger.hand_over(M, key, "old", "new")
    ledger.claim(M, "c", "new", "n1")
    ledger.hand_over(M, "z", "new", "old")
    handed = ("handed_over",)
    assert ["a", "b", "d", "e"] == ledger.owned_keys(M, "new", handed)
    assert ["b", "d"] == ledger.owned_keys(M, "new", handed, after="a", upto="d")
    assert ["b"] == ledger.owned_keys(M, "new", handed, after="a", limit=1)
    assert ["a", "b"] == ledger.owned_keys(M, "new", handed, upto="b")
    assert ["c"] == ledger.owned_keys(M, "new", ("running", "failed"))
    assert ["z"] == ledger.owned_keys(M, "old", iter(handed))
    assert [] == ledger.succeeded_keys(M, "new")


def test_counts_by_state_and_side_and_as_json(ledger: Ledger, workers: Workers) -> None:
    workers.register(M, "old", "w1")
    done = ledger.claim(M, "done", "old", "w1").claim
    failed = ledger.claim(M, "failed", "new", "n1").claim
    assert done is not None
    assert failed is not None
    ledger.finish(done, "succeeded")
    ledger.finish(failed, "failed")
    ledger.claim(M, "running", "old", "w1")
    ledger.hand_over(M, "given", "new", "old")
    for side in ("old", "new", "new"):
        ledger.claim(M, "done", side, "x")
    counts = ledger.counts(M)
    assert {
        "executed_twice": 0,
        "refused_executions": 3,
        "refused_by_side": {"old": 1, "new": 2},
        "running": 1,
        "handed_over": 0,
        "succeeded": 1,
        "failed": 1,
    } == counts.as_json()
    assert counts.refused_by_side is not counts.as_json()["refused_by_side"]


def test_a_running_claim_of_a_gone_worker_is_handed_over(
    ledger: Ledger, workers: Workers, store: Journal
) -> None:
    workers.register(M, "old", "gone")
    slow = ledger.claim(M, "k", "old", "gone")
    assert slow.claim is not None
    live = ledger.hand_over(M, "k", "old", "new")
    assert (False, "live", ("old", "gone")) == (bool(live), live.reason, live.holder)
    _age(store, "old", "gone", 31)
    handed = ledger.hand_over(M, "k", "old", "new")
    assert (True, "handed_over", ("old", "gone")) == (bool(handed), handed.reason, handed.holder)
    assert ClaimState("new", "gone", 1, "handed_over") == ledger.claim_of(M, "k")
    assert ["handed_over"] == [e.outcome for e in ledger.executions(M, "k")]
    assert 1 == ledger.counts(M).handed_over
    received = ledger.claim(M, "k", "new", "n1")
    assert received.claim == Claim(M, "k", "new", "n1", 2)


def test_a_hand_over_without_workers_counts_every_running_claim_as_live(upgraded_url: str) -> None:
    with Ledger(upgraded_url) as ledger:
        ledger.claim(M, "k", "old", "w")
        refused = ledger.hand_over(M, "k", "old", "new")
        assert ("live", ("old", "w")) == (refused.reason, refused.holder)
        # and a running claim is never taken over
        assert ("running", ("old", "w")) == (
            ledger.claim(M, "k", "new", "n").reason,
            ledger.claim(M, "k", "new", "n").holder,
        )


def test_a_hand_over_of_a_key_the_other_side_holds_says_what_stands(ledger: Ledger) -> None:
    theirs = ledger.claim(M, "k", "new", "n1")
    assert theirs.claim is not None
    running = ledger.hand_over(M, "k", "old", "new")
    assert ("running", ("new", "n1")) == (running.reason, running.holder)
    ledger.finish(theirs.claim, "failed")
    failed = ledger.hand_over(M, "k", "old", "new")
    assert ("failed", ("new", "n1")) == (failed.reason, failed.holder)
    given_back = ledger.hand_over(M, "k", "new", "old")
    assert given_back
    assert ledger.hand_over(M, "k", "old", "new")  # not claimed on old yet: old gives it on
    assert ClaimState("new", "n1", 1, "handed_over") == ledger.claim_of(M, "k")


def test_a_failure_after_a_hand_over_leaves_the_key_to_the_receiving_side(ledger: Ledger) -> None:
    slow = ledger.claim(M, "k", "old", "w")
    assert slow.claim is not None
    ledger.hand_over(M, "k", "old", "new")
    assert not ledger.finish(slow.claim, "failed")
    assert ClaimState("new", "w", 1, "handed_over") == ledger.claim_of(M, "k")
    assert ["failed"] == [e.outcome for e in ledger.executions(M, "k")]
    assert ledger.claim(M, "k", "new", "n").allowed


def test_a_finish_is_recorded_once(ledger: Ledger) -> None:
    """A second finish of the same attempt changes neither the history nor the claim."""
    first = ledger.claim(M, "k", "old", "w")
    assert first.claim is not None
    assert ledger.finish(first.claim, "failed")
    (done,) = ledger.executions(M, "k")
    assert not ledger.finish(first.claim, "succeeded")
    assert [done] == ledger.executions(M, "k")
    assert ClaimState("old", "w", 1, "failed") == ledger.claim_of(M, "k")


def test_open_checks_the_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with make_engine(url, create=True).connect():
        pass
    with pytest.raises(SchemaNotCurrent, match="is at no schema"):
        Ledger.open(url)
    journal = Journal(url)
    journal.upgrade()
    journal.close()
    with Ledger.open(url) as ledger:
        assert ledger.claim(M, "k", "old", "w").allowed


def test_an_opened_ledger_takes_over_from_the_gone_workers_it_is_given(
    upgraded_url: str, workers: Workers, store: Journal
) -> None:
    """`Ledger.open(url, workers=...)` judges goneness with those workers, as `Ledger(...)` does."""
    workers.register(M, "old", "dead")
    with Ledger.open(upgraded_url, workers=workers) as ledger:
        dead = ledger.claim(M, "k", "old", "dead")
        assert dead.claim is not None
        _age(store, "old", "dead", 31)
        taken = ledger.claim(M, "k", "new", "n1")
        assert ("taken_over", ("old", "dead")) == (taken.reason, taken.holder)
    with Ledger.open(upgraded_url) as blind:  # no workers: every running claim counts as live
        assert "running" == blind.claim(M, "k", "old", "o2").reason


def test_close_disposes_of_its_own_engine_only(upgraded_url: str) -> None:
    """A ledger given an engine leaves its pooled connections alone; its own are closed."""
    engine = make_engine(upgraded_url)
    with Ledger(upgraded_url, engine=engine) as given:
        assert given.engine is engine
        assert given.claim_of(M, "k") is None
    assert 1 == engine.pool.checkedin()  # type: ignore[attr-defined]
    engine.dispose()
    with Ledger(upgraded_url) as owned:
        assert owned.claim_of(M, "k") is None
        pool = owned.engine.pool
        assert 1 == pool.checkedin()  # type: ignore[attr-defined]
    assert 0 == owned.engine.pool.checkedin()  # type: ignore[attr-defined]
    assert pool is not owned.engine.pool


def _bystanders(ledger: Ledger, workers: Workers, worker: str) -> None:
    """Running claims (attempt 1, like the key under test) of another key and of the same key
    in another migration, by a live worker: what happens to `k` of `M` must leave them alone."""
    workers.register(M, "old", worker)
    workers.register("other", "old", worker)
    assert ledger.claim(M, "bystander", "old", worker).allowed
    assert ledger.claim("other", "k", "old", worker).allowed


def _untouched(ledger: Ledger, worker: str) -> None:
    for migration, key in ((M, "bystander"), ("other", "k")):
        assert ClaimState("old", worker, 1, "running") == ledger.claim_of(migration, key)
        assert [(1, "old", worker, "running")] == [
            (e.attempt, e.side, e.worker_id, e.outcome) for e in ledger.executions(migration, key)
        ]


def test_a_take_over_moves_the_claim_and_closes_the_gone_worker_s_execution_only(
    ledger: Ledger, workers: Workers, store: Journal
) -> None:
    _bystanders(ledger, workers, "alive")
    workers.register(M, "old", "dead")
    assert ledger.claim(M, "k", "old", "dead").allowed
    _age(store, "old", "dead", 31)
    before = utcnow()
    taken = ledger.claim(M, "k", "new", "n1")
    assert taken.claim == Claim(M, "k", "new", "n1", 2)
    assert ClaimState("new", "n1", 2, "running") == ledger.claim_of(M, "k")
    history = ledger.executions(M, "k")
    assert [(1, "old", "dead", "handed_over"), (2, "new", "n1", "running")] == [
        (e.attempt, e.side, e.worker_id, e.outcome) for e in history
    ]
    assert before <= history[1].started_at <= utcnow()
    _untouched(ledger, "alive")


def test_a_hand_over_of_a_gone_worker_s_claim_closes_its_execution_only(
    ledger: Ledger, workers: Workers, store: Journal
) -> None:
    _bystanders(ledger, workers, "alive")
    workers.register(M, "old", "dead")
    assert ledger.claim(M, "k", "old", "dead").allowed
    _age(store, "old", "dead", 31)
    assert ledger.hand_over(M, "k", "old", "new")
    assert ClaimState("new", "dead", 1, "handed_over") == ledger.claim_of(M, "k")
    assert ["handed_over"] == [e.outcome for e in ledger.executions(M, "k")]
    _untouched(ledger, "alive")
    # the bystander's worker is live, on this migration and side: its claim is not handed over
    live = ledger.hand_over(M, "bystander", "old", "new")
    assert ("live", ("old", "alive")) == (live.reason, live.holder)


def test_a_finish_is_succeeded_or_failed(ledger: Ledger) -> None:
    running = ledger.claim(M, "k", "old", "w").claim
    assert running is not None
    with pytest.raises(ValueError, match="an execution finishes") as info:
        ledger.finish_many([(running, "handed_over")])
    assert "an execution finishes succeeded or failed, not 'handed_over'" == str(info.value)
    assert ClaimState("old", "w", 1, "running") == ledger.claim_of(M, "k")
    assert 0 == ledger.finish_many([])


def test_a_late_success_takes_back_a_hand_over_nobody_claimed(ledger: Ledger) -> None:
    """The key is closed as the execution that really ran it: side and worker are the finisher's."""
    slow = ledger.claim(M, "k", "old", "w")
    assert slow.claim is not None
    assert ledger.hand_over(M, "k", "old", "new")
    assert ClaimState("new", "w", 1, "handed_over") == ledger.claim_of(M, "k")
    assert ledger.finish(slow.claim, "succeeded")
    assert ClaimState("old", "w", 1, "succeeded") == ledger.claim_of(M, "k")
    assert ["succeeded"] == [e.outcome for e in ledger.executions(M, "k")]


class _FinishesWhileJudged(Workers):
    """Workers that say every worker is gone, and finish `claim` (as its worker would, at that
    very moment) while they are asked: the claim moves between the ledger's read and its
    compare-and-set, deterministically."""

    claim: Claim | None = None
    ledger: Ledger | None = None
    outcome = "succeeded"

    def _finish(self) -> None:
        if self.claim is not None and self.ledger is not None:
            assert self.ledger.finish(self.claim, self.outcome)
            self.claim = None

    def is_gone(self, migration: str, side: str, worker_id: str, *, now: datetime | None = None) -> bool:
        self._finish()
        return True

    def may_take_over(
        self, migration: str, side: str, worker_id: str, *, now: datetime | None = None
    ) -> bool:
        self._finish()
        return True


@pytest.mark.parametrize("command", ["claim", "hand_over"])
def test_a_claim_that_moves_under_a_take_over_or_hand_over_is_decided_again(
    store: Journal, upgraded_url: str, command: str
) -> None:
    workers = _FinishesWhileJudged(store.engine)
    with Ledger(upgraded_url, workers=workers) as ledger:
        running = ledger.claim(M, "k", "old", "w1").claim
        assert running is not None
        workers.claim, workers.ledger = running, ledger
        if command == "claim":
            result = ledger.claim(M, "k", "new", "n1")
            assert (False, "succeeded", ("old", "w1")) == (result.allowed, result.reason, result.holder)
        else:
            handed = ledger.hand_over(M, "k", "old", "new")
            assert (False, "succeeded", ("old", "w1")) == (bool(handed), handed.reason, handed.holder)
        assert ClaimState("old", "w1", 1, "succeeded") == ledger.claim_of(M, "k")
        assert [(1, "succeeded")] == [(e.attempt, e.outcome) for e in ledger.executions(M, "k")]


class _MovesWhileJudged(Workers):
    """Workers that say every worker is gone and, each time they are asked, hand the running
    claim to another worker of its side (as a take-over would): every compare-and-set of a
    hand-over misses."""

    asked = 0

    def is_gone(self, migration: str, side: str, worker_id: str, *, now: datetime | None = None) -> bool:
        self.asked += 1
        c = execution_claims_table.c
        with self.engine.begin() as conn:
            conn.execute(
                update(execution_claims_table)
                .where(c.migration == migration, c.key == "k")
                .values(worker_id=f"w{self.asked + 1}")
            )
        return True


def test_a_hand_over_that_keeps_missing_gives_up_as_contended_after_three_tries(
    store: Journal, upgraded_url: str
) -> None:
    workers = _MovesWhileJudged(store.engine)
    with Ledger(upgraded_url, workers=workers) as ledger:
        assert ledger.claim(M, "k", "old", "w1").allowed
        handed = ledger.hand_over(M, "k", "old", "new")
        assert (False, "contended", None) == (bool(handed), handed.reason, handed.holder)
        assert 3 == workers.asked
        assert ClaimState("old", "w4", 1, "running") == ledger.claim_of(M, "k")


def test_a_finish_closes_its_own_execution_only(ledger: Ledger) -> None:
    mine = ledger.claim(M, "a", "old", "w1").claim
    assert mine is not None
    ledger.claim(M, "b", "old", "w1")  # the same attempt of another key
    ledger.claim("other", "a", "old", "w1")  # the same key and attempt in another migration
    assert ledger.finish(mine, "succeeded")
    done = ledger.executions(M, "a")
    assert [("succeeded", True)] == [(e.outcome, e.finished_at is not None) for e in done]
    for migration, key in ((M, "b"), ("other", "a")):
        assert [("running", None)] == [(e.outcome, e.finished_at) for e in ledger.executions(migration, key)]


def test_a_take_over_moves_one_key_of_one_migration(ledger: Ledger, workers: Workers, store: Journal) -> None:
    for migration in (M, "other"):
        workers.register(migration, "old", "dead")
    for migration, key in ((M, "k"), (M, "j"), ("other", "k")):
        assert ledger.claim(migration, key, "old", "dead").allowed
    _age(store, "old", "dead", 31)
    assert "taken_over" == ledger.claim(M, "k", "new", "n1").reason
    assert ClaimState("new", "n1", 2, "running") == ledger.claim_of(M, "k")
    assert ClaimState("old", "dead", 1, "running") == ledger.claim_of(M, "j")
    assert ClaimState("old", "dead", 1, "running") == ledger.claim_of("other", "k")


def test_a_plain_hand_over_says_handed_over_with_no_holder(ledger: Ledger) -> None:
    """The hand-overs decided by the upsert alone (a key never claimed, a failed claim of the
    giving side, one already given: idempotent) say `handed_over`; only the hand-over of a
    gone worker's running claim names a holder."""
    failed = ledger.claim(M, "failed", "old", "w1").claim
    assert failed is not None
    assert ledger.finish(failed, "failed")
    for key in ("never", "failed", "never"):
        handed = ledger.hand_over(M, key, "old", "new")
        assert (True, "handed_over", None) == (bool(handed), handed.reason, handed.holder), key


class _RetriesWhileJudged(Workers):
    """Workers asked whether the worker of `claim` is gone: the first time, that worker fails
    its attempt and claims the key again at once (a new attempt, the same side and worker,
    running) and is said to be gone, as it looked a moment before; from then on it is live."""

    claim: Claim | None = None
    ledger: Ledger | None = None

    def is_gone(self, migration: str, side: str, worker_id: str, *, now: datetime | None = None) -> bool:
        if self.claim is None or self.ledger is None:
            return False
        assert self.ledger.finish(self.claim, "failed")
        again = self.ledger.claim(migration, self.claim.key, side, worker_id)
        assert again.claim is not None
        assert 2 == again.claim.attempt
        self.claim = None
        return True


def test_a_hand_over_never_moves_an_attempt_it_did_not_see(store: Journal, upgraded_url: str) -> None:
    """The compare-and-set of a gone worker's running claim names the attempt it saw: when the
    worker retried in the meantime (attempt 2, the same side and worker, running), it misses,
    the hand-over decides again, and the worker, live now, keeps its claim."""
    workers = _RetriesWhileJudged(store.engine)
    with Ledger(upgraded_url, workers=workers) as ledger:
        first = ledger.claim(M, "k", "old", "w1").claim
        assert first is not None
        workers.claim, workers.ledger = first, ledger
        handed = ledger.hand_over(M, "k", "old", "new")
        assert (False, "live", ("old", "w1")) == (bool(handed), handed.reason, handed.holder)
        assert ClaimState("old", "w1", 2, "running") == ledger.claim_of(M, "k")
        assert [(1, "failed"), (2, "running")] == [(e.attempt, e.outcome) for e in ledger.executions(M, "k")]


def test_succeeded_and_owned_keys_are_one_migration_s_1000_at_a_time_by_default(ledger: Ledger) -> None:
    """Both page through one migration's keys, in key order, 1000 at a time unless asked."""
    now = utcnow()
    rows = [
        {"migration": M, "key": f"{prefix}{i:04d}", "side": "new", "worker_id": "n1"}
        | {"attempt": 1, "state": state, "started_at": now}
        for prefix, state in (("s", "succeeded"), ("h", "handed_over"))
        for i in range(1001)
    ]
    rows += [  # another migration's keys, sorted before them all
        {"migration": "other", "key": key, "side": "new", "worker_id": "n1"}
        | {"attempt": 1, "state": state, "started_at": now}
        for key, state in (("s0", "succeeded"), ("h0", "handed_over"))
    ]
    with ledger.engine.begin() as conn:
        conn.execute(execution_claims_table.insert(), rows)
    assert [f"s{i:04d}" for i in range(1000)] == ledger.succeeded_keys(M, "new")
    assert ["s1000"] == ledger.succeeded_keys(M, "new", after="s0999")
    assert [f"h{i:04d}" for i in range(1000)] == ledger.owned_keys(M, "new", ("handed_over",))
    assert ["h1000"] == ledger.owned_keys(M, "new", ("handed_over",), after="h0999")


def test_a_claim_decided_again_is_made_for_the_worker_that_asked(store: Journal, upgraded_url: str) -> None:
    """The gone worker's attempt fails between the read and the take-over: decided again, the
    key (failed on this side) is claimed, for the worker that asked."""
    workers = _FinishesWhileJudged(store.engine)
    workers.outcome = "failed"
    with Ledger(upgraded_url, workers=workers) as ledger:
        running = ledger.claim(M, "k", "old", "w1").claim
        assert running is not None
        workers.claim, workers.ledger = running, ledger
        result = ledger.claim(M, "k", "old", "w2")
        assert ClaimResult(True, "claimed", Claim(M, "k", "old", "w2", 2)) == result
        assert ClaimState("old", "w2", 2, "running") == ledger.claim_of(M, "k")
        assert [(1, "w1", "failed"), (2, "w2", "running")] == [
            (e.attempt, e.worker_id, e.outcome) for e in ledger.executions(M, "k")
        ]


def test_counts_are_one_migration_s_and_zero_when_it_has_nothing(ledger: Ledger) -> None:
    """Another migration's executions twice, hand-overs and states are not counted; a
    migration with nothing in the ledger counts zero everywhere."""
    slow = ledger.claim("other", "k", "old", "dead").claim  # never registered: gone
    assert slow is not None
    assert ledger.hand_over("other", "k", "old", "new")
    again = ledger.claim("other", "k", "new", "n1").claim
    assert again is not None
    assert ledger.finish(again, "succeeded")
    assert not ledger.finish(slow, "succeeded")  # late: executed twice
    failed = ledger.claim("other", "f", "new", "n1").claim
    assert failed is not None
    assert ledger.finish(failed, "failed")
    assert ledger.claim("other", "h", "old", "dead").allowed
    assert ledger.hand_over("other", "h", "old", "new")  # its execution stays handed over
    other = ledger.counts("other")
    assert (1, 1, 1, 1) == (other.executed_twice, other.handed_over, other.succeeded, other.failed)
    assert LedgerCounts(0, 0, {"old": 0, "new": 0}, 0, 0, 0, 0) == ledger.counts(M)
