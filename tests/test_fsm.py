"""The machine definition: edges, graph checks, routing table, buckets, Mermaid."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from migration_fsm import fsm
from migration_fsm.exceptions import TriggerNotAllowed
from migration_fsm.fsm import EDGES, FINAL, INITIAL, Edge, EdgeRules, Phase, Trigger

DESIGN_ROUTING = {
    # phase: (write_old, write_new, authoritative, read_from, read_fallback, consume_from)
    Phase.PREPARATION: (True, False, "old", "old", None, "old"),
    Phase.DUAL_WRITE: (True, True, "old", "old", None, "old"),
    Phase.CLEANUP: (False, True, "new", "new", "old", "new"),
    Phase.COMPLETE: (False, True, "new", "new", None, "new"),
}


def _tuple(routing: fsm.Routing) -> tuple[object, ...]:
    return (
        routing.write_old,
        routing.write_new,
        routing.authoritative,
        routing.read_from,
        routing.read_fallback,
        routing.consume_from,
    )


def test_phases_are_the_contract_names_in_order() -> None:
    """Phase values are exactly DESIGN.md's names, in order."""
    assert ["preparation", "dual_write", "cutover", "cleanup", "complete"] == [p.value for p in Phase]
    as_text: str = Phase.CUTOVER  # a StrEnum compares equal to its value
    assert "cutover" == as_text


@pytest.mark.parametrize(
    ("source", "trigger", "dest"),
    [
        (Phase.PREPARATION, Trigger.ADVANCE, Phase.DUAL_WRITE),
        (Phase.DUAL_WRITE, Trigger.ADVANCE, Phase.CUTOVER),
        (Phase.CUTOVER, Trigger.ADVANCE, Phase.CLEANUP),
        (Phase.CLEANUP, Trigger.ADVANCE, Phase.COMPLETE),
        (Phase.DUAL_WRITE, Trigger.ROLLBACK, Phase.PREPARATION),
        (Phase.CUTOVER, Trigger.ROLLBACK, Phase.DUAL_WRITE),
        (Phase.CLEANUP, Trigger.ROLLBACK, Phase.CUTOVER),
        (Phase.CUTOVER, Trigger.RAMP, Phase.CUTOVER),
    ],
)
def test_fire_takes_each_design_edge(source: Phase, trigger: Trigger, dest: Phase) -> None:
    """Every edge of DESIGN.md section 2 fires on the transitions machine."""
    edge = fsm.resolve_edge(source, trigger)
    assert (trigger, source, dest) == (edge.trigger, edge.source, edge.dest)


@pytest.mark.parametrize(
    ("source", "trigger"),
    [
        (Phase.PREPARATION, Trigger.ROLLBACK),
        (Phase.COMPLETE, Trigger.ADVANCE),
        (Phase.COMPLETE, Trigger.ROLLBACK),
        (Phase.DUAL_WRITE, Trigger.RAMP),
        (Phase.CLEANUP, Trigger.RAMP),
        (Phase.PREPARATION, Trigger.INIT),
    ],
)
def test_fire_refuses_edges_that_do_not_exist(source: Phase, trigger: Trigger) -> None:
    """A trigger with no edge from the phase raises TriggerNotAllowed (exit 2)."""
    with pytest.raises(TriggerNotAllowed) as info:
        fsm.resolve_edge(source, trigger)
    assert 2 == info.value.exit_code


def test_nothing_leaves_complete() -> None:
    """complete is final: no trigger is allowed from it."""
    assert [] == fsm.allowed_triggers(Phase.COMPLETE)
    assert frozenset({Phase.COMPLETE}) == FINAL


def test_graph_check_rejects_a_dead_end() -> None:
    """A non-final phase without a way out fails the import-time check."""
    edges = (
        *(e for e in EDGES if e.source is not Phase.CLEANUP),
        # complete stays reachable (by a trigger preparation has no other edge for)
        Edge(Trigger.ROLLBACK, Phase.PREPARATION, Phase.COMPLETE, EdgeRules(100)),
    )
    with pytest.raises(ValueError, match="dead end"):
        fsm.check_graph(edges, INITIAL, FINAL)


def test_graph_check_rejects_an_unreachable_phase() -> None:
    """A phase no edge reaches fails the import-time check."""
    edges = tuple(e for e in EDGES if e.dest is not Phase.COMPLETE)
    with pytest.raises(ValueError, match="unreachable"):
        fsm.check_graph(edges, INITIAL, FINAL)


def test_graph_check_rejects_an_edge_out_of_a_final_phase() -> None:
    """An edge leaving complete fails the import-time check."""
    edges = (*EDGES, Edge(Trigger.ROLLBACK, Phase.COMPLETE, Phase.CLEANUP, EdgeRules(100)))
    with pytest.raises(ValueError, match="final phase"):
        fsm.check_graph(edges, INITIAL, FINAL)


@pytest.mark.parametrize("phase", list(DESIGN_ROUTING))
def test_routing_matches_design_table(phase: Phase) -> None:
    """The routing of every non-cutover phase equals DESIGN.md's table, whatever the percent."""
    for percent in (0, 37, 100):
        assert DESIGN_ROUTING[phase] == _tuple(fsm.routing_for(phase, percent))


@pytest.mark.parametrize(("percent", "read_from"), [(0, "old"), (1, "split"), (99, "split"), (100, "new")])
def test_cutover_routing_reads_per_percent(percent: int, read_from: str) -> None:
    """In cutover, writes go to both, new is authoritative, and read_from follows the percent."""
    assert (True, True, "new", read_from, "old", "new") == _tuple(fsm.routing_for(Phase.CUTOVER, percent))


def test_bucket_is_stable_across_processes() -> None:
    """bucket() is the same in a fresh interpreter (no hash() randomisation)."""
    keys = [f"task-{i}" for i in range(50)]
    code = "from migration_fsm.fsm import bucket; import sys; print([bucket(k) for k in sys.argv[1:]])"
    out = subprocess.run(
        [sys.executable, "-c", code, *keys],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123"},
    ).stdout
    assert str([fsm.bucket(k) for k in keys]) == out.strip()


def test_keys_move_to_new_monotonically_and_in_proportion() -> None:
    """A key routed to new at p stays new at every p' > p; the share at p is within 2 points."""
    rng = random.Random(7)
    keys = [f"{rng.getrandbits(64):x}" for _ in range(10_000)]
    previous: set[str] = set()
    for percent in range(101):
        new = {k for k in keys if fsm.routing_for(Phase.CUTOVER, percent, k).read_from == "new"}
        assert previous <= new
        assert abs(len(new) / len(keys) * 100 - percent) <= 2
        previous = new


@pytest.mark.parametrize(
    ("edge", "before", "after"),
    [
        (fsm.edge_for(Phase.DUAL_WRITE, Trigger.ADVANCE, Phase.CUTOVER), 0, 0),
        (fsm.edge_for(Phase.CLEANUP, Trigger.ROLLBACK, Phase.CUTOVER), 100, 100),
        (fsm.edge_for(Phase.CUTOVER, Trigger.ADVANCE, Phase.CLEANUP), 100, 100),
        (fsm.edge_for(Phase.CUTOVER, Trigger.ROLLBACK, Phase.DUAL_WRITE), 60, 0),
        (fsm.edge_for(Phase.PREPARATION, Trigger.ADVANCE, Phase.DUAL_WRITE), 0, 0),
    ],
)
def test_percent_after_each_edge(edge: Edge, before: int, after: int) -> None:
    """Percent is 0 before cutover, 0 entering it forward, 100 entering it back and after it."""
    assert after == fsm.percent_after(edge, before)


def test_rollback_path_goes_edge_by_edge() -> None:
    """rollback --to walks the rollback edges one at a time."""
    path = fsm.rollback_path(Phase.CLEANUP, Phase.PREPARATION)
    assert [Phase.CUTOVER, Phase.DUAL_WRITE, Phase.PREPARATION] == [e.dest for e in path]
    with pytest.raises(TriggerNotAllowed):
        fsm.rollback_path(Phase.DUAL_WRITE, Phase.CLEANUP)
    with pytest.raises(TriggerNotAllowed):
        fsm.rollback_path(Phase.DUAL_WRITE, Phase.DUAL_WRITE)


def test_replay_reaches_the_last_committed_phase() -> None:
    """Replaying committed rows gives their final phase and percent; a broken chain is refused."""
    rows = [
        (Trigger.INIT, None, Phase.PREPARATION, 0),
        (Trigger.ADVANCE, Phase.PREPARATION, Phase.DUAL_WRITE, 0),
        (Trigger.ADVANCE, Phase.DUAL_WRITE, Phase.CUTOVER, 0),
        (Trigger.RAMP, Phase.CUTOVER, Phase.CUTOVER, 30),
    ]
    assert (Phase.CUTOVER, 30) == fsm.replay(rows)
    with pytest.raises(ValueError, match="while the phase was"):
        fsm.replay([*rows, (Trigger.ADVANCE, Phase.CLEANUP, Phase.COMPLETE, 100)])


def test_mermaid_lists_every_edge() -> None:
    """The diagram is generated from EDGES: one line per edge, plus start and end."""
    text = fsm.mermaid()
    assert text.startswith("stateDiagram-v2\n")
    assert "    [*] --> preparation" in text
    assert "    complete --> [*]" in text
    for edge in EDGES:
        assert f"    {edge.source} --> {edge.dest}: {edge.trigger}" in text


def test_machine_and_store_imports_are_light() -> None:
    """Importing the machine and the store pulls in neither click, rich nor alembic."""
    code = (
        "import sys, migration_fsm.fsm, migration_fsm.journal.store;"
        "print(sorted(m for m in ('click', 'rich', 'alembic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "[]" == out.strip()


def test_public_names_resolve() -> None:
    """Every name in migration_fsm.__all__ resolves to an object."""
    import migration_fsm

    for name in migration_fsm.__all__:
        assert getattr(migration_fsm, name) is not None
