"""The journal's records (`journal/records.py`) and the digests of the rows outside the chain
(`journal/chain.py`): the pinned digest format, what `verify` counts from the rows (the
version bumps, when the phase was entered), and the exit-4 error naming a row altered
outside migration-fsm. The hash chain's own pinned format is in `test_lease.py`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import event, update

from migration_fsm.exceptions import JournalCorrupt
from migration_fsm.fsm import Phase, Trigger
from migration_fsm.journal import Journal, JournalEntry, chain_hash, journal_table, steps_table
from migration_fsm.journal.chain import row_digest, row_digest_ok
from migration_fsm.journal.records import phase_entered_at, step_from_row, undecodable, version_bumps

if TYPE_CHECKING:
    pass

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _entry(**changes: Any) -> JournalEntry:
    fields: dict[str, Any] = {
        "seq": 1,
        "trigger": Trigger.INIT,
        "source": None,
        "dest": Phase.PREPARATION,
        "percent": 0,
        "status": "committed",
        "actor": "alice",
        "reason": None,
        "forced": False,
        "guards": [],
        "takeovers": [],
        "started_at": T0,
        "finished_at": T0,
        "host": "h",
        "pid": 1,
        "error": None,
        "prev_hash": None,
        "hash": None,
    }
    return JournalEntry(**{**fields, **changes})


# -- the digests of the rows outside the chain ---------------------------------------------

#: A validation run's fields in no particular order, a timestamp that is not in UTC and
#: text that is not ASCII: the digest is `v1:` + SHA-256 over the canonical JSON.
DIGEST_FIELDS: dict[str, Any] = {
    "table": "orders",
    "mismatched": 0,
    "at": datetime(2026, 3, 1, 17, 30, 0, 5, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    "note": "vérifié",
}
PINNED_VALIDATION_DIGEST = "v1:8d24949f6507fb512e9e2b71d4ec5208c3dcd5380c31ad35dddcc87711ba04ad"
PINNED_BACKFILL_DIGEST = "v1:9edb125c7288dcddf99d0ef3163422424786f0e7de5c1fabb36bc750ff7d78e9"


def test_row_digest_is_pinned() -> None:
    """The digest format of validation runs and backfill checkpoints is stored on existing rows:
    it must not change (the kind is part of it, so the same fields digest differently)."""
    assert PINNED_VALIDATION_DIGEST == row_digest("validation_run", DIGEST_FIELDS)
    assert PINNED_BACKFILL_DIGEST == row_digest("backfill", DIGEST_FIELDS)


def test_row_digest_does_not_depend_on_the_local_time_zone(local_time_zone: None) -> None:
    assert datetime(2026, 1, 1, tzinfo=UTC).astimezone().utcoffset() == timedelta(hours=5, minutes=30)
    assert PINNED_VALIDATION_DIGEST == row_digest("validation_run", DIGEST_FIELDS)


def test_chain_hash_does_not_depend_on_the_local_time_zone(local_time_zone: None) -> None:
    """`test_lease.py` pins the hash on a UTC machine; the same row hashes the same elsewhere."""
    utc = chain_hash(None, "orders", _entry())
    shifted = chain_hash(None, "orders", _entry(started_at=T0.astimezone(), finished_at=T0.astimezone()))
    assert PINNED_INIT_HASH == utc == shifted


#: `chain_hash(None, "orders", _entry())`: a first row, whose `source` is null (not "None").
PINNED_INIT_HASH = "c6711912e4343f6a9d11a06366e217bd5d898f969b11b073462642b147e28253"


def test_row_digest_ok_accepts_its_own_digest_only() -> None:
    digest = row_digest("backfill", {"done": 3})
    assert row_digest_ok("backfill", {"done": 3}, digest)
    assert not row_digest_ok("backfill", {"done": 4}, digest)
    assert not row_digest_ok("validation_run", {"done": 3}, digest)
    assert not row_digest_ok("backfill", {"done": 3}, None)


# -- what verify counts from the rows -------------------------------------------------------


def test_version_bumps_counts_the_pauses_and_lifts_only() -> None:
    takeovers = [
        {"command": "pause", "side": "old"},
        {"command": "resume", "from": "bob"},
        {"command": "lift"},
        {"side": "new"},
        {"command": "pause", "side": "new"},
    ]
    assert 3 == version_bumps(_entry(takeovers=takeovers))
    assert 0 == version_bumps(_entry())


def test_phase_entered_at_is_the_last_committed_phase_change() -> None:
    entered = T0 + timedelta(hours=1)
    entries = [
        _entry(),
        _entry(
            seq=2,
            trigger=Trigger.ADVANCE,
            source=Phase.PREPARATION,
            dest=Phase.DUAL_WRITE,
            finished_at=entered,
        ),
        # refused and aborted rows, and a commit that stays in its phase, move nothing
        _entry(
            seq=3,
            trigger=Trigger.ADVANCE,
            source=Phase.DUAL_WRITE,
            dest=Phase.CUTOVER,
            status="refused",
            finished_at=T0 + timedelta(hours=2),
        ),
        _entry(
            seq=4,
            trigger=Trigger.ADVANCE,
            source=Phase.DUAL_WRITE,
            dest=Phase.CUTOVER,
            status="aborted",
            finished_at=T0 + timedelta(hours=3),
        ),
        _entry(
            seq=5,
            trigger=Trigger.RAMP,
            source=Phase.DUAL_WRITE,
            dest=Phase.DUAL_WRITE,
            percent=10,
            finished_at=T0 + timedelta(hours=4),
        ),
    ]
    assert entered == phase_entered_at(entries)
    assert T0 == phase_entered_at(entries[:1])
    assert phase_entered_at([]) is None


# -- rows altered outside migration-fsm -------------------------------------------------------


def _step_row(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "position": 0,
        "name": "a",
        "undo": None,
        "status": "started",
        "attempts": 1,
        "checkpoint": {"cursor": 1},
        "error": None,
        "started_at": T0,
        "finished_at": None,
    }
    return {**row, **changes}


def test_a_step_row_reads_back_as_stored() -> None:
    step = step_from_row(_step_row())
    assert (0, "a", "started", 1, {"cursor": 1}, T0, None) == (
        step.position,
        step.name,
        step.status,
        step.attempts,
        step.checkpoint,
        step.started_at,
        step.finished_at,
    )


def test_a_step_checkpoint_that_is_not_an_object_does_not_decode() -> None:
    long = list(range(40))
    with pytest.raises(TypeError) as info:
        step_from_row(_step_row(checkpoint=long))
    assert f"checkpoint is not an object: {str(long)[:60]}" == str(info.value)


def test_a_journal_row_altered_outside_is_named_in_the_exit_4_error(store: Journal) -> None:
    """Every row that does not decode is named, with its reason and what to do."""
    state = store.create("orders", "alice")
    store.create("other", "alice")  # its row #1 decodes: each row is read by migration and seq
    store.append_refused(
        state, _entry(trigger=Trigger.ADVANCE, source=Phase.PREPARATION, dest=Phase.DUAL_WRITE)
    )
    store.append_refused(
        store.get("orders"), _entry(trigger=Trigger.ADVANCE, source=Phase.PREPARATION, dest=Phase.DUAL_WRITE)
    )
    with store.transaction() as conn:
        conn.execute(
            update(journal_table)
            .where(journal_table.c.migration_id == state.id, journal_table.c.seq != 2)
            .values(status="bogus")
        )
    with pytest.raises(JournalCorrupt) as info:
        store.journal(state)
    assert (
        "journal of migration 'orders' does not verify: row #1 does not decode (ValueError: 'bogus'"
        " is not a valid EntryStatus); row #3 does not decode (ValueError: 'bogus' is not a valid"
        " EntryStatus): altered outside migration-fsm; restore the database from a"
        " backup (`migration-fsm verify` names every such row)"
    ) == str(info.value)
    assert 4 == info.value.exit_code


def test_a_step_row_altered_outside_is_named_with_its_row(store: Journal) -> None:
    state = store.create("orders", "alice")
    intent = _entry(
        trigger=Trigger.ADVANCE, source=Phase.PREPARATION, dest=Phase.DUAL_WRITE, finished_at=None
    )
    store.claim(state, intent, [("a", None), ("b", "undo_b")], "alice [h:1]", 30)
    with store.transaction() as conn:
        conn.execute(update(steps_table).where(steps_table.c.position == 1).values(checkpoint=[1, 2]))
    entries, bad = store.decoded_journal(state)
    assert [1, 2] == [entry.seq for entry in entries]
    assert ["step 1 of row #2 does not decode (TypeError: checkpoint is not an object: [1, 2])"] == bad


def test_a_journal_that_decodes_is_read_in_one_query_per_table(store: Journal) -> None:
    """`decode_rows` reads row by row only when a row does not decode: a journal of three rows
    with steps is two SELECTs (the steps, the rows), not one per row."""
    state = store.create("orders", "alice")
    intent = _entry(
        trigger=Trigger.ADVANCE, source=Phase.PREPARATION, dest=Phase.DUAL_WRITE, finished_at=None
    )
    store.append_refused(state, intent)
    state = store.get("orders")
    store.claim(state, intent, [("a", None), ("b", None)], "alice [h:1]", 30)
    state = store.get("orders")
    selects: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        entries = store.journal(state)
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    assert [1, 2, 3] == [entry.seq for entry in entries]
    assert [[], [], ["a", "b"]] == [[step.name for step in entry.steps] for entry in entries]
    assert 2 == len(selects)


def test_undecodable_names_the_error_s_type_and_first_line() -> None:
    assert "row #1 does not decode (ValueError: one)" == undecodable("row #1", ValueError(" one\ntwo "))
    assert "row #1 does not decode (KeyError: )" == undecodable("row #1", KeyError())


def test_guards_and_takeovers_of_the_wrong_shape_do_not_decode(store: Journal) -> None:
    """Each row names what is wrong with its JSON: not a list of objects (the first 60
    characters of it), or a guard without the keys every guard has."""
    state = store.create("orders", "alice")
    intent = _entry(trigger=Trigger.ADVANCE, source=Phase.PREPARATION, dest=Phase.DUAL_WRITE)
    for _ in range(3):
        store.append_refused(store.get("orders"), intent)
    long = {"detail": "x" * 80}
    shapes: dict[int, dict[str, Any]] = {
        1: {"guards": long},
        2: {"takeovers": [1, 2]},
        3: {"guards": [{"name": "g"}]},
        4: {},
    }
    with store.transaction() as conn:
        for seq, values in shapes.items():
            if values:
                conn.execute(
                    update(journal_table)
                    .where(journal_table.c.migration_id == state.id, journal_table.c.seq == seq)
                    .values(**values)
                )
    entries, bad = store.decoded_journal(state)
    assert [4] == [entry.seq for entry in entries]
    assert [
        f"row #1 does not decode (TypeError: guards is not a list of objects: {str(long)[:60]})",
        "row #2 does not decode (TypeError: takeovers is not a list of objects: [1, 2])",
        "row #3 does not decode (KeyError: 'guards: an entry has no passed, detail')",
    ] == bad
