"""The lease and the compare-and-set writes of the journal, tested directly on the `Journal`
(no `Migration`, no PostgreSQL advisory lock), on SQLite and on PostgreSQL.

Each test would fail if a compare-and-set were removed or made always true: a stale claim,
a stolen lease, a heartbeat that does nothing, two take-overs at once.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.engine import make_url

from migration_fsm.exceptions import ConcurrentChange, Conflict, LeaseHeld, TransitionInterrupted
from migration_fsm.fsm import Phase, Trigger
from migration_fsm.journal import (
    Journal,
    JournalEntry,
    Lease,
    MigrationState,
    chain_hash,
    journal_table,
    migrations_table,
    steps_table,
    utcnow,
)
from migration_fsm.journal.schema import events_table

NAME = "leased"
STEPS = [("tests.support.steps:step_a", None), ("tests.support.steps:step_b", "tests.support.steps:undo_b")]


def _intent(actor: str = "alice", trigger: Trigger = Trigger.ADVANCE) -> JournalEntry:
    return JournalEntry(
        seq=0,
        trigger=trigger,
        source=Phase.PREPARATION,
        dest=Phase.DUAL_WRITE,
        percent=0,
        status="intent",
        actor=actor,
        reason=None,
        forced=False,
        guards=[],
        takeovers=[],
        started_at=utcnow(),
        finished_at=None,
        host="test-host",
        pid=1,
        error=None,
        prev_hash=None,
        hash=None,
    )


def _claim(store: Journal, holder: str = "alice [h:1]", seconds: float = 30) -> tuple[MigrationState, Lease]:
    store.create(NAME, "alice")
    state = store.get(NAME)
    lease, entry = store.claim(state, _intent(), STEPS, holder, seconds)
    assert (entry.seq, lease.seq, lease.holder, lease.migration_id) == (2, 2, holder, state.id)
    return state, lease


def _snapshot(store: Journal) -> dict[str, Any]:
    """Every row of the three journal tables, to show that nothing changed."""
    with store.transaction(readonly=True) as conn:
        return {
            table.name: [
                dict(row) for row in conn.execute(select(table).order_by(*table.primary_key)).mappings()
            ]
            for table in (migrations_table, journal_table, steps_table)
        }


def _expire(store: Journal) -> None:
    with store.transaction() as conn:
        conn.execute(
            update(migrations_table)
            .where(migrations_table.c.name == NAME)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


# -- claim --------------------------------------------------------------------------------


def test_claim_with_a_stale_last_seq_writes_nothing(store: Journal) -> None:
    """A refusal moved `last_seq` (not `version`): a claim from the state before it loses."""
    store.create(NAME, "alice")
    seen = store.get(NAME)
    store.append_refused(seen, _intent())
    before = _snapshot(store)
    with pytest.raises(ConcurrentChange, match="changed while this command ran"):
        store.claim(seen, _intent(), STEPS, "bob [h:2]", 30)
    assert before == _snapshot(store)


def test_claim_with_a_stale_version_writes_nothing(store: Journal) -> None:
    """A commit moved `version`: a claim from the state before it loses."""
    seen, lease = _claim(store)
    lease.commit()
    before = _snapshot(store)
    with pytest.raises(ConcurrentChange, match=r"version 1 -> 2"):
        store.claim(seen, _intent(), STEPS, "bob [h:2]", 30)
    assert before == _snapshot(store)


def test_claim_against_a_live_lease_names_its_holder(store: Journal) -> None:
    """A second claim while a transition holds a live lease: `LeaseHeld` with its fields."""
    seen, lease = _claim(store, holder="alice [h:1]")
    before = _snapshot(store)
    with pytest.raises(LeaseHeld, match=r"is held by alice \[h:1\] until") as info:
        store.claim(seen, _intent(), STEPS, "bob [h:2]", 30)
    assert "alice [h:1]" == info.value.holder
    assert info.value.expires_at == store.get(NAME).lease_expires_at
    assert 3 == info.value.exit_code
    assert before == _snapshot(store)
    # The seen state does not matter: a fresh one shows the transition in progress.
    with pytest.raises(LeaseHeld):
        store.claim(store.get(NAME), _intent(), STEPS, "bob [h:2]", 30)
    assert before == _snapshot(store)
    assert lease.heartbeat()


def test_claim_against_an_expired_lease_says_interrupted(store: Journal) -> None:
    seen, _ = _claim(store)
    _expire(store)
    before = _snapshot(store)
    with pytest.raises(TransitionInterrupted, match="interrupted transition #2"):
        store.claim(seen, _intent(), STEPS, "bob [h:2]", 30)
    assert before == _snapshot(store)


# -- the lease's writes -------------------------------------------------------------------


def test_lease_writes_steps_checkpoints_and_commits(store: Journal) -> None:
    """The happy path of every method, so the refusals below are not refusals of everything."""
    _, lease = _claim(store)
    lease.start_step(0)
    lease.save_checkpoint(0, {"cursor": "k1"})
    lease.mark_step(0, "done")
    lease.start_step(1)
    lease.start_step(1)
    lease.mark_step(1, "failed", "boom")
    entry = store.entry(store.get(NAME), 2)
    first, second = entry.steps
    assert ("done", 1, {"cursor": "k1"}) == (first.status, first.attempts, first.checkpoint)
    assert first.finished_at is not None
    assert ("failed", 2, "boom") == (second.status, second.attempts, second.error)
    lease.start_step(1)
    assert store.entry(store.get(NAME), 2).steps[1].error is None
    lease.mark_step(1, "done")
    final = lease.commit()
    assert (Phase.DUAL_WRITE, 2, None, None) == (
        final.phase,
        final.version,
        final.in_progress_seq,
        final.lease_holder,
    )
    assert final == store.get(NAME)
    row = store.entry(final, 2)
    assert ("committed", final.head_hash) == (row.status, row.hash)


def test_workers_gone_saves_the_checkpoint_and_journals_its_event(store: Journal) -> None:
    """The step's checkpoint, and one `workers_gone` event naming the side, the workers and
    the step (the outbox row `notify` delivers)."""
    _, lease = _claim(store)
    lease.start_step(0)
    with store.transaction(readonly=True) as conn:
        last = conn.execute(select(func.max(events_table.c.id))).scalar()
    lease.workers_gone(0, {"side": "old", "gone": ["w1"]}, "old", ["w1", "w2"])
    assert {"side": "old", "gone": ["w1"]} == store.entry(store.get(NAME), 2).steps[0].checkpoint
    e = events_table.c
    with store.transaction(readonly=True) as conn:
        found = conn.execute(select(e.migration, e.seq, e.kind, e.event).where(e.id > last)).all()
    [(migration, seq, kind, event)] = found
    assert (NAME, 2, "workers_gone") == (migration, seq, kind)
    assert ("workers_gone", "old", ["w1", "w2"], 0) == (
        event["event"],
        event["side"],
        event["workers"],
        event["step"]["position"],
    )


def test_a_pause_and_its_lift_journal_their_events(store: Journal) -> None:
    """`pause` and `lift` each leave one event about the transition's row, naming the side
    paused (None for the lift)."""
    _, lease = _claim(store)
    with store.transaction(readonly=True) as conn:
        last = conn.execute(select(func.max(events_table.c.id))).scalar()
    lease.pause("old")
    lease.lift()
    e = events_table.c
    with store.transaction(readonly=True) as conn:
        found = conn.execute(select(e.seq, e.kind, e.event).where(e.id > last).order_by(e.id)).all()
    assert [(2, "pause", "old", 2), (2, "lift", None, 2)] == [
        (seq, kind, event["side"], event["seq"]) for seq, kind, event in found
    ]


def test_release_keeps_the_transition_interrupted(store: Journal) -> None:
    _, lease = _claim(store)
    lease.release("step x failed: boom")
    state = store.get(NAME)
    assert (2, None, None) == (state.in_progress_seq, state.lease_holder, state.lease_expires_at)
    entry = store.entry(state, 2)
    assert ("intent", "step x failed: boom") == (entry.status, entry.error)
    # Released: the lease is no longer ours, so it cannot write any more.
    assert not lease.heartbeat()
    with pytest.raises(
        LeaseHeld, match=r"is no longer held \(the transition waits for `resume` or `abort`\)"
    ):
        lease.commit()


def test_abort_keeps_the_phase(store: Journal) -> None:
    _, lease = _claim(store)
    final = lease.abort()
    assert (Phase.PREPARATION, 1, None) == (final.phase, final.version, final.in_progress_seq)
    assert "aborted" == store.entry(final, 2).status


def test_heartbeat_extends_the_lease(store: Journal) -> None:
    """A heartbeat moves `lease_expires_at` to `lease_seconds` from now (not a no-op)."""
    _, lease = _claim(store, seconds=600)
    soon = utcnow() + timedelta(seconds=2)
    with store.transaction() as conn:
        conn.execute(update(migrations_table).values(lease_expires_at=soon))
    before = utcnow()
    assert lease.heartbeat()
    expires = store.get(NAME).lease_expires_at
    assert expires is not None
    assert before + timedelta(seconds=590) < expires <= utcnow() + timedelta(seconds=600)


def test_a_stolen_lease_cannot_write(store: Journal) -> None:
    """After a steal, the old holder's every write is refused and changes nothing."""
    _, lease = _claim(store, holder="alice [h:1]")
    lease.start_step(0)
    thief = store.take_over(store.get(NAME), "mallory [h:9]", 30, {"command": "resume", "stolen": True})
    assert ("mallory [h:9]", lease.seq) == (thief.holder, thief.seq)
    before = _snapshot(store)
    assert not lease.heartbeat()
    attempts = [
        lambda: lease.start_step(1),
        lambda: lease.mark_step(0, "done"),
        lambda: lease.mark_step(0, "failed", "boom"),
        lambda: lease.save_checkpoint(0, {"cursor": "x"}),
        lambda: lease.release("boom"),
        lease.commit,
        lease.abort,
    ]
    for attempt in attempts:
        with pytest.raises(LeaseHeld, match=r"transition #2 .* was taken over by mallory \[h:9\]") as info:
            attempt()
        assert "mallory [h:9]" == info.value.holder
    assert before == _snapshot(store)
    # The thief's lease works.
    thief.mark_step(0, "done")
    assert thief.heartbeat()
    assert Phase.DUAL_WRITE == thief.commit().phase


def test_take_over_from_a_changed_holder_is_refused(store: Journal) -> None:
    """A take-over names the holder it saw; once someone else took over it writes nothing."""
    _, lease = _claim(store, holder="alice [h:1]")
    seen = store.get(NAME)
    store.take_over(seen, "bob [h:2]", 30, {"command": "resume"})
    before = _snapshot(store)
    with pytest.raises(LeaseHeld, match=r"held by bob \[h:2\]"):
        store.take_over(seen, "carol [h:3]", 30, {"command": "resume"})
    assert before == _snapshot(store)
    assert not lease.heartbeat()


@pytest.mark.parametrize("command", ["resume", "abort"])
def test_two_take_overs_at_once_exactly_one_wins(upgraded_url: str, command: str) -> None:
    """Two operators, each with its own `Journal`, take over the same expired lease at the same
    moment: one gets the lease, the other a `Conflict`, and one takeover is journaled."""
    with Journal.open(upgraded_url) as setup:
        _claim(setup, holder="ghost [h:0]")
        _expire(setup)
        seen = setup.get(NAME)
    barrier = threading.Barrier(2)
    won: list[Lease] = []
    lost: list[BaseException] = []

    def take(holder: str) -> None:
        with Journal.open(upgraded_url) as journal:
            barrier.wait(timeout=30)
            try:
                won.append(journal.take_over(seen, holder, 30, {"command": command, "actor": holder}))
            except Conflict as exc:
                lost.append(exc)

    threads = [threading.Thread(target=take, args=(f"op{i} [h:{i}]",)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert (1, 1) == (len(won), len(lost)), (won, lost)
    assert isinstance(lost[0], LeaseHeld)
    with Journal.open(upgraded_url) as check:
        state = check.get(NAME)
        assert won[0].holder == state.lease_holder
        takeovers = check.entry(state, 2).takeovers
    assert [won[0].holder] == [t["actor"] for t in takeovers]


# -- the hash chain -----------------------------------------------------------------------

PINNED_ENTRY = JournalEntry(
    seq=7,
    trigger=Trigger.RAMP,
    source=Phase.CUTOVER,
    dest=Phase.CUTOVER,
    percent=25,
    status="committed",
    actor="alice",
    reason="ramp to a quarter",
    forced=True,
    guards=[{"name": "repair_log_empty", "passed": False, "detail": "2 open", "duration_ms": 3}],
    takeovers=[{"command": "resume", "stolen": False}],
    started_at=datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
    finished_at=datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC),
    host="ops-1",
    pid=4242,
    error=None,
    prev_hash="ab" * 32,
    hash=None,
)
PINNED_HASH = "eebe2496b0fcd7a793083a95a3683dbb754f0d6f7a63ca8d03d6b8f21469e436"


def test_chain_hash_is_pinned() -> None:
    """The hash format is part of every existing journal: it must not change."""
    assert PINNED_HASH == chain_hash("ab" * 32, "orders", PINNED_ENTRY)
    assert PINNED_HASH != chain_hash(None, "orders", PINNED_ENTRY)


#: The first row of a chain (no previous hash), with text that is not ASCII: stored as is.
PINNED_FIRST_HASH = "ce02a6b8dcda0ac1f53196b68b7985e1648609057159fb159f115f13e39daa5e"


def test_chain_hash_of_a_first_row_with_non_ascii_text_is_pinned() -> None:
    first = JournalEntry(
        **{
            **{f: getattr(PINNED_ENTRY, f) for f in PINNED_ENTRY.__dataclass_fields__},
            "reason": "rampe à un quart",
            "prev_hash": None,
        }
    )
    assert PINNED_FIRST_HASH == chain_hash(None, "orders", first)


# -- closing a transition -----------------------------------------------------------------


def test_an_aborted_row_keeps_its_error_and_a_committed_one_clears_it(store: Journal) -> None:
    _, lease = _claim(store)
    lease.release("step a failed: boom")
    thief = store.take_over(store.get(NAME), "bob [h:2]", 30, {"command": "abort"})
    state = thief.abort()
    entry = store.entry(state, 2)
    assert ("aborted", "step a failed: boom") == (entry.status, entry.error)
    assert entry.hash == chain_hash(entry.prev_hash, NAME, entry)


def test_phase_entered_at_moves_with_the_phase_only(store: Journal) -> None:
    """A commit into another phase stamps `phase_entered_at`; a ramp (cutover to cutover)
    and an abort keep it."""
    seen, lease = _claim(store)
    entered = seen.phase_entered_at
    before = utcnow()
    state = lease.commit()
    assert before <= state.phase_entered_at <= utcnow()
    assert entered < state.phase_entered_at
    entered = state.phase_entered_at
    ramp = JournalEntry(
        **{
            **{f: getattr(_intent(), f) for f in JournalEntry.__dataclass_fields__},
            "trigger": Trigger.RAMP,
            "source": Phase.DUAL_WRITE,
            "dest": Phase.DUAL_WRITE,
        }
    )
    lease, _ = store.claim(state, ramp, [], "alice [h:1]", 30)
    assert entered == lease.commit().phase_entered_at
    lease, _ = store.claim(store.get(NAME), _intent(), [], "alice [h:1]", 30)
    assert entered == lease.abort().phase_entered_at


def test_closing_one_migration_leaves_another_with_the_same_seq_alone(store: Journal) -> None:
    """Two migrations each at transition #2: committing one touches only its own rows."""
    _, lease = _claim(store)
    store.create("other", "carol")
    other = store.get("other")
    other_lease, _ = store.claim(other, _intent("carol"), STEPS, "carol [h:3]", 30)
    assert 2 == other_lease.seq
    other_lease.release("step a failed: boom")
    lease.commit()
    entry = store.entry(store.get("other"), 2)
    assert ("intent", None, "step a failed: boom") == (entry.status, entry.hash, entry.error)
    assert Phase.PREPARATION == store.get("other").phase


def test_a_lease_expiring_now_is_not_live(store: Journal) -> None:
    seen, _ = _claim(store)
    state = store.get(NAME)
    assert state.lease_expires_at is not None
    assert state.lease_live(state.lease_expires_at - timedelta(microseconds=1))
    assert not state.lease_live(state.lease_expires_at)
    assert not seen.lease_live()


# -- what an operator reads ------------------------------------------------------------------


def test_the_lease_errors_name_the_holder_the_expiry_and_what_to_do(store: Journal) -> None:
    """The exit-3 messages in full: who holds the lease, until when (UTC, to the second) and
    how long that is from now, and the command to run; a lost lease names who took it."""
    from migration_fsm.journal import lease_held_error
    from migration_fsm.journal.lease import conflict, lease_lost
    from migration_fsm.journal.records import replace

    _claim(store, holder="alice [h:1]")
    state = store.get(NAME)
    expires = datetime(2999, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    held = lease_held_error(replace(state, lease_expires_at=expires))
    assert str(held).startswith(
        f"migration '{NAME}' transition #2 is held by alice [h:1] until 2999-01-02T03:04:05Z (in "
    )
    assert str(held).endswith(
        " s): wait for it, or if that operator is gone, run `migration-fsm resume --steal`"
        " (or `abort --reason TEXT` once the lease has expired)"
    )
    left = int(str(held).split("(in ")[1].split(" s)")[0])
    assert abs(left - (expires - utcnow()).total_seconds()) < 60
    assert (held.holder, held.expires_at) == ("alice [h:1]", expires)
    past = lease_held_error(replace(state, lease_expires_at=utcnow() - timedelta(hours=1)))
    assert "(in 0 s)" in str(past)
    unknown = lease_held_error(replace(state, lease_expires_at=None))
    assert "transition #2 is held by alice [h:1] until ?: wait for it" in str(unknown)
    lost = lease_lost(replace(state, lease_holder=None), 2)
    assert (
        f"the lease on transition #2 of migration '{NAME}' is no longer held (the transition waits"
        " for `resume` or `abort`): this command stops here"
    ) == str(lost)
    ended = lease_lost(replace(state, lease_holder=None, in_progress_seq=None), 2)
    assert "nobody" not in str(ended)
    assert "was taken over, and the transition has ended since (see `migration-fsm history`)" in str(ended)
    assert (None, state.lease_expires_at) == (lost.holder, lost.expires_at)
    seen = replace(state, version=0, in_progress_seq=None)
    interrupted = conflict(replace(state, lease_expires_at=utcnow() - timedelta(seconds=1)), seen)
    assert (
        f"migration '{NAME}' has an interrupted transition #2: run `migration-fsm resume`"
        " or `migration-fsm abort --reason TEXT`"
    ) == str(interrupted)
    assert isinstance(interrupted, TransitionInterrupted)
    moved = conflict(replace(state, in_progress_seq=None, version=3), seen)
    assert isinstance(moved, ConcurrentChange)
    assert (
        f"migration '{NAME}' changed while this command ran (version 0 -> 3, phase preparation):"
        " run `migration-fsm status` and decide again"
    ) == str(moved)


def test_release_stamps_the_row_and_records_the_error_on_its_own_migration_only(store: Journal) -> None:
    """Two migrations each at transition #2: releasing one writes the error on its own row
    and moves its `updated_at`; the other's row keeps no error."""
    _, lease = _claim(store)
    store.create("other", "carol")
    store.claim(store.get("other"), _intent("carol"), STEPS, "carol [h:3]", 30)
    claimed = store.get(NAME).updated_at
    lease.release("step a failed: boom")
    assert store.get(NAME).updated_at > claimed
    assert "step a failed: boom" == store.entry(store.get(NAME), 2).error
    assert store.entry(store.get("other"), 2).error is None


def test_abort_records_who_aborted_and_why_in_the_chained_row(store: Journal) -> None:
    _, lease = _claim(store)
    state = lease.abort(actor="bob", reason="the window closed")
    entry = store.entry(state, 2)
    assert ("aborted", "bob", "the window closed") == (entry.status, entry.actor, entry.reason)
    assert entry.hash == state.head_hash == chain_hash(entry.prev_hash, NAME, entry)
    _, lease = _claim_again(store)
    state = lease.abort(reason="only a reason")
    assert ("alice", "only a reason") == (store.entry(state, 3).actor, store.entry(state, 3).reason)


def _claim_again(store: Journal) -> tuple[MigrationState, Lease]:
    state = store.get(NAME)
    lease, _ = store.claim(state, _intent(), STEPS, "alice [h:1]", 30)
    return state, lease


@pytest.mark.usefixtures("local_time_zone")
def test_the_lease_expiry_is_shown_in_utc_whatever_the_local_time_zone(store: Journal) -> None:
    from migration_fsm.journal import lease_held_error
    from migration_fsm.journal.records import replace

    _claim(store)
    expires = datetime(2999, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert datetime(2999, 1, 2, 3, 4, 5).astimezone().utcoffset() == timedelta(hours=5, minutes=30)
    held = lease_held_error(replace(store.get(NAME), lease_expires_at=expires))
    assert " until 2999-01-02T03:04:05Z (in " in str(held)


def test_step_writes_stamp_and_touch_their_own_migration_only(store: Journal) -> None:
    """Two migrations each at transition #2: starting and finishing a step of one stamps it
    (`started_at`, `finished_at`) and leaves the other's step 0 pending."""
    _, lease = _claim(store)
    store.create("other", "carol")
    store.claim(store.get("other"), _intent("carol"), STEPS, "carol [h:3]", 30)
    before = utcnow()
    lease.start_step(0)
    started = store.entry(store.get(NAME), 2).steps[0]
    assert started.started_at is not None
    assert before <= started.started_at <= utcnow()
    assert (started.status, started.finished_at) == ("started", None)
    lease.mark_step(0, "done")
    other = store.entry(store.get("other"), 2).steps[0]
    assert ("pending", 0, None, None) == (other.status, other.attempts, other.started_at, other.finished_at)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_pause_and_a_lift_notify_the_new_state_at_commit(store: Journal, upgraded_url: str) -> None:
    """On PostgreSQL a pause or a lift sends the migration's new state on the NOTIFY channel
    (what PhaseClients and WorkerGates apply without a query); one that changes nothing does
    not."""
    state, lease = _claim(store)
    conninfo = make_url(upgraded_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as listener:
        listener.execute("LISTEN migration_fsm")
        paused = lease.pause("old")
        assert lease.pause("old") == paused  # already paused: nothing to say
        lifted = lease.lift()
        heard = [(n.channel, json.loads(n.payload)) for n in listener.notifies(timeout=10, stop_after=2)]
    now = {"migration": NAME, "phase": state.phase.value, "percent": state.percent}
    assert heard == [
        ("migration_fsm", {**now, "version": paused, "paused": "old"}),
        ("migration_fsm", {**now, "version": lifted, "paused": None}),
    ]
