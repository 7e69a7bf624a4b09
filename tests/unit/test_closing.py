"""What closing a transition writes (`journal/closing.py`), decided without I/O: the migration
row as the close leaves it, the closed journal row and its hash, the event and the NOTIFY
payload, for a commit into another phase, a ramp, a commit while a side is paused, and an
abort with and without a pause to lift. The rows read are built here as `closing_rows` gives
them; every figure is written out, not recomputed by the code under test."""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime
from typing import Any

from migration_fsm.fsm import EntryStatus, Phase, Trigger
from migration_fsm.journal import JournalEntry, MigrationState, chain_hash
from migration_fsm.journal.closing import Closing, decide_close, notify_payload

NOW = datetime(2026, 12, 8, 9, 15, 30, 250000, tzinfo=UTC)
CLAIMED = datetime(2026, 12, 8, 9, 15, 0, tzinfo=UTC)
ENTERED = datetime(2026, 12, 1, 8, 0, 0, tzinfo=UTC)
CREATED = datetime(2026, 11, 30, 8, 0, 0, tzinfo=UTC)
EXPIRES = datetime(2026, 12, 8, 9, 16, 0, tzinfo=UTC)
HOLDER = "alice [h:1]"
HEAD = "a" * 64

CURRENT = MigrationState(
    id=7,
    name="orders",
    phase=Phase.DUAL_WRITE,
    percent=0,
    version=4,
    last_seq=3,
    head_hash=HEAD,
    in_progress_seq=3,
    lease_holder=HOLDER,
    lease_expires_at=EXPIRES,
    phase_entered_at=ENTERED,
    created_at=CREATED,
    updated_at=CLAIMED,
    paused_side=None,
)
EARLIER_TAKEOVER = {"command": "resume", "actor": "bob", "at": "2026-12-08T09:15:10.000000+00:00"}
STEPS = [
    {"name": "copy", "status": "done", "attempts": 1, "error": None},
    {"name": "switch", "status": "failed", "attempts": 2, "error": "boom password=hunter2"},
]
#: The event's `steps`: the second step's error redacted.
EVENT_STEPS = [
    {"name": "copy", "status": "done", "attempts": 1, "error": None},
    {"name": "switch", "status": "failed", "attempts": 2, "error": "boom password=***"},
]
CUTOVER_ROUTING = {
    "write_old": True,
    "write_new": True,
    "authoritative": "new",
    "read_from": "split",
    "read_fallback": "old",
    "consume_from": "new",
}
DUAL_WRITE_ROUTING = {
    "write_old": True,
    "write_new": True,
    "authoritative": "old",
    "read_from": "old",
    "read_fallback": None,
    "consume_from": "old",
}


def journal_row(**changes: Any) -> dict[str, Any]:
    """Transition #3's journal row as the close reads it (dual_write to cutover at 10%)."""
    return {
        "migration_id": 7,
        "seq": 3,
        "trigger": "advance",
        "source": "dual_write",
        "dest": "cutover",
        "percent": 10,
        "status": "intent",
        "actor": "alice",
        "reason": "go, token=s3cret",
        "forced": False,
        "guards": [{"name": "lag", "passed": True, "detail": "lag 2 s, password=pw"}],
        "takeovers": [EARLIER_TAKEOVER],
        "started_at": CLAIMED,
        "finished_at": None,
        "host": "box",
        "pid": 41,
        "error": "step switch failed: boom",
        "prev_hash": None,
        "hash": None,
        **changes,
    }


def closed_entry(**changes: Any) -> JournalEntry:
    """The journal row of `journal_row` as a close writes it, before its hash (defaults: a
    commit, its error cleared)."""
    fields: dict[str, Any] = {
        "seq": 3,
        "trigger": Trigger.ADVANCE,
        "source": Phase.DUAL_WRITE,
        "dest": Phase.CUTOVER,
        "percent": 10,
        "status": "committed",
        "actor": "alice",
        "reason": "go, token=s3cret",
        "forced": False,
        "guards": [{"name": "lag", "passed": True, "detail": "lag 2 s, password=pw"}],
        "takeovers": [EARLIER_TAKEOVER],
        "started_at": CLAIMED,
        "finished_at": NOW,
        "host": "box",
        "pid": 41,
        "error": None,
        "prev_hash": HEAD,
        "hash": None,
    }
    return JournalEntry(**{**fields, **changes})


def released(**changes: Any) -> MigrationState:
    """`CURRENT` with the lease released (the fields every close sets), and `changes`."""
    fields: dict[str, Any] = {
        **{name: getattr(CURRENT, name) for name in MigrationState.__dataclass_fields__},
        "in_progress_seq": None,
        "lease_holder": None,
        "lease_expires_at": None,
        "updated_at": NOW,
        "paused_side": None,
    }
    return MigrationState(**{**fields, **changes})


def released_current(**changes: Any) -> MigrationState:
    """`CURRENT` (the lease held) with `changes`."""
    return MigrationState(
        **{**{name: getattr(CURRENT, name) for name in MigrationState.__dataclass_fields__}, **changes}
    )


def expected_event(kind: str, state: dict[str, Any], **row: Any) -> dict[str, Any]:
    """The event of a close of `journal_row`, its texts redacted; `row` changes the row's
    `status`, `actor`, `reason` (as shown) and `error`, and gives `lifted`."""
    return {
        "schema": 1,
        "event": kind,
        "migration": "orders",
        "seq": 3,
        "at": "2026-12-08T09:15:30.250000+00:00",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "trigger": "advance",
        "edge": "dual_write->cutover",
        "source": "dual_write",
        "dest": "cutover",
        "status": "committed",
        "actor": "alice",
        "reason": "go, token=***",
        "forced": False,
        "error": None,
        "guards": [{"name": "lag", "passed": True, "detail": "lag 2 s, password=***"}],
        "steps": EVENT_STEPS,
        "lifted": False,
        **row,
        "state": state,
    }


def close(current: MigrationState, row: dict[str, Any], status: EntryStatus, **who: str) -> Closing:
    return decide_close(
        current,
        row,
        STEPS,
        status,
        holder=HOLDER,
        now=NOW,
        actor=who.get("actor"),
        reason=who.get("reason"),
    )


def test_a_commit_into_another_phase_moves_phase_percent_version_and_stamps_the_phase() -> None:
    """The whole `Closing` of a commit: the row closed (its error cleared, chained after the
    migration's head), the migration at the row's phase and percent, one version more,
    `phase_entered_at` now, the lease released; the `committed` event and the NOTIFY."""
    done = close(CURRENT, journal_row(), EntryStatus.COMMITTED)
    entry = closed_entry()
    digest = chain_hash(HEAD, "orders", entry)
    after = released(phase=Phase.CUTOVER, percent=10, version=5, phase_entered_at=NOW, head_hash=digest)
    state = {"phase": "cutover", "percent": 10, "version": 5, "paused": None, "routing": CUTOVER_ROUTING}
    assert done.digest == digest
    assert done.entry == closed_entry(hash=digest)
    assert done.after == after
    assert done.event == expected_event("committed", state)
    assert done.notify is not None
    assert json.loads(done.notify) == {
        "migration": "orders",
        "phase": "cutover",
        "percent": 10,
        "version": 5,
        "paused": None,
    }
    assert done.journal_values() == {
        "status": "committed",
        "finished_at": NOW,
        "prev_hash": HEAD,
        "hash": digest,
        "error": None,
        "takeovers": [EARLIER_TAKEOVER],
        "actor": "alice",
        "reason": "go, token=s3cret",
    }
    assert done.migration_values() == {
        "phase": "cutover",
        "percent": 10,
        "version": 5,
        "phase_entered_at": NOW,
        "in_progress_seq": None,
        "lease_holder": None,
        "lease_expires_at": None,
        "head_hash": digest,
        "updated_at": NOW,
        "paused_side": None,
    }


def test_a_ramp_keeps_the_time_its_phase_was_entered() -> None:
    """A commit whose row stays in the phase (cutover 10% to 50%): `phase_entered_at` kept,
    percent and version moved."""
    current = MigrationState(
        **{
            **{name: getattr(CURRENT, name) for name in MigrationState.__dataclass_fields__},
            "phase": Phase.CUTOVER,
            "percent": 10,
        }
    )
    row = journal_row(trigger="ramp", source="cutover", dest="cutover", percent=50)
    done = close(current, row, EntryStatus.COMMITTED)
    assert (Phase.CUTOVER, 50, 5, ENTERED) == (
        done.after.phase,
        done.after.percent,
        done.after.version,
        done.after.phase_entered_at,
    )
    assert ENTERED == done.migration_values()["phase_entered_at"]


def test_a_commit_while_a_side_is_paused_unpauses_it_without_a_lift_record() -> None:
    """A commit clears `paused_side` but journals no `lift` (only an abort does): one
    version more, not two; the event's `lifted` is false and the NOTIFY says not paused."""
    done = close(released_current(paused_side="old"), journal_row(), EntryStatus.COMMITTED)
    assert [EARLIER_TAKEOVER] == done.entry.takeovers
    assert (5, None) == (done.after.version, done.after.paused_side)
    assert done.event["lifted"] is False
    assert done.notify is not None
    assert json.loads(done.notify)["paused"] is None


def test_an_abort_that_lifts_a_pause_journals_the_lift_and_notifies() -> None:
    """An abort while a side is paused: phase, percent and `phase_entered_at` stay, the lift
    is one more version, journaled on the row after its earlier takeovers; the row keeps its
    error and takes the aborting operator's actor and reason; the `aborted` event says
    `lifted`, and the new state is NOTIFYed."""
    current = released_current(paused_side="new")
    done = close(current, journal_row(), EntryStatus.ABORTED, actor="bob", reason="stop it")
    lift = {"command": "lift", "actor": HOLDER, "at": "2026-12-08T09:15:30.250000+00:00", "version": 5}
    entry = closed_entry(
        status="aborted",
        error="step switch failed: boom",
        actor="bob",
        reason="stop it",
        takeovers=[EARLIER_TAKEOVER, lift],
    )
    digest = chain_hash(HEAD, "orders", entry)
    assert done.entry == closed_entry(
        status="aborted",
        error="step switch failed: boom",
        actor="bob",
        reason="stop it",
        takeovers=[EARLIER_TAKEOVER, lift],
        hash=digest,
    )
    assert done.digest == digest
    assert done.after == released(version=5, head_hash=digest)
    state = {"phase": "dual_write", "percent": 0, "version": 5, "paused": None, "routing": DUAL_WRITE_ROUTING}
    assert done.event == expected_event(
        "aborted",
        state,
        status="aborted",
        actor="bob",
        reason="stop it",
        error="step switch failed: boom",
        lifted=True,
    )
    assert done.notify is not None
    assert json.loads(done.notify) == {
        "migration": "orders",
        "phase": "dual_write",
        "percent": 0,
        "version": 5,
        "paused": None,
    }
    values = done.journal_values()
    assert ("aborted", "step switch failed: boom", "bob", "stop it", [EARLIER_TAKEOVER, lift]) == (
        values["status"],
        values["error"],
        values["actor"],
        values["reason"],
        values["takeovers"],
    )


def test_an_abort_with_nothing_paused_changes_no_version_and_notifies_nothing() -> None:
    """An abort with no pause: the version stays, no lift is journaled, no NOTIFY; the row
    keeps its own actor and reason when the abort gives none."""
    done = close(CURRENT, journal_row(), EntryStatus.ABORTED)
    entry = closed_entry(status="aborted", error="step switch failed: boom")
    digest = chain_hash(HEAD, "orders", entry)
    assert done.entry == closed_entry(status="aborted", error="step switch failed: boom", hash=digest)
    assert done.after == released(head_hash=digest)
    state = {"phase": "dual_write", "percent": 0, "version": 4, "paused": None, "routing": DUAL_WRITE_ROUTING}
    assert done.event == expected_event("aborted", state, status="aborted", error="step switch failed: boom")
    assert done.notify is None


def test_the_notify_payload_is_the_new_state_as_json() -> None:
    """The exact text PhaseClients and WorkerGates parse."""
    state = released_current(phase=Phase.CUTOVER, percent=25, version=9, paused_side="old")
    assert (
        '{"migration": "orders", "phase": "cutover", "percent": 25, "version": 9, "paused": "old"}'
        == notify_payload(state)
    )
