"""The machine definition: edges, graph checks, routing table, buckets, Mermaid."""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys

import pytest

from migration_fsm import fsm
from migration_fsm.exceptions import TriggerNotAllowed
from migration_fsm.fsm import EDGES, FINAL, INITIAL, PHASES, Edge, EdgeRules, Phase, Trigger

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
    assert after == fsm.percent_after(edge)


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
        "import sys, migration_fsm.fsm, migration_fsm.journal;"
        "print(sorted(m for m in ('click', 'rich', 'alembic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "[]" == out.strip()


def test_public_names_resolve() -> None:
    """Every name in migration_fsm.__all__ resolves to an object."""
    import migration_fsm

    for name in migration_fsm.__all__:
        assert getattr(migration_fsm, name) is not None


# -- each edge owns its rules ----------------------------------------------------------------

#: The tables these rules replaced (plugins/defaults.py's DEFAULT_GUARDS and DEFAULT_STEPS,
#: fsm.ALWAYS_ON_GUARDS and percent_after's branches), pinned edge by edge.
OLD_TABLES: dict[str, tuple[int | str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # edge: (percent after, always-on guards, default guards, default steps): DESIGN.md section 10
    "preparation->dual_write": (0, (), ("stores_reachable",), ()),
    "dual_write->cutover": (
        0,
        (),
        ("backfill_complete", "repair_log_empty", "checksums_match"),
        ("pause_consumers", "drain_old", "transfer_state"),
    ),
    "cutover->cleanup": (
        100,
        ("percent_is_100",),
        ("percent_is_100", "old_drained", "checksums_match", "no_double_execution"),
        ("retire_old",),
    ),
    "cleanup->complete": (100, (), ("repair_log_empty", "no_double_execution"), ("retire_old",)),
    "dual_write->preparation": (0, (), (), ()),
    "cutover->dual_write": (
        0,
        (),
        ("stores_reachable",),
        ("pause_consumers", "drain_new", "reverse_sync"),
    ),
    "cleanup->cutover": (100, (), ("stores_reachable",), ("reverse_sync",)),
    "cutover->cutover": ("requested", (), (), ()),
}


def test_each_edge_carries_the_rules_the_old_tables_gave_it() -> None:
    """Percent rule, always-on guards, default guards and default steps (only the pause has an
    undo: `abort` lifts it)."""
    got = {
        edge.key: (
            edge.rules.percent,
            edge.rules.always_on,
            edge.rules.guards,
            tuple(step.name for step in edge.rules.steps),
        )
        for edge in EDGES
    }
    assert OLD_TABLES == got
    undos = {(step.name, step.undo) for edge in EDGES for step in edge.rules.steps if step.undo}
    assert {("pause_consumers", "lift_pause")} == undos
    assert {"cutover->cleanup": ("percent_is_100",)} == dict(fsm.ALWAYS_ON_GUARDS)


def test_the_giving_side_is_read_off_the_routing_of_the_edge() -> None:
    """The side that consumes in the source phase and not in the destination: old on the way to
    cutover, new on the rollback to dual_write; no edge that keeps consumption has one."""
    moves = {edge.key: fsm.giving_side(edge.source, edge.dest) for edge in EDGES}
    assert {"dual_write->cutover": "old", "cutover->dual_write": "new"} == {
        key: side for key, side in moves.items() if side is not None
    }
    # Every edge that moves consumption starts with the pause in the default table.
    for edge in EDGES:
        if moves[edge.key] is not None:
            assert "pause_consumers" == edge.rules.steps[0].name


def test_percent_after_follows_each_edges_rule() -> None:
    """Every edge but ramp sets its fixed percent whatever the percent before; ramp sets the
    percent asked for and needs one."""
    for edge in EDGES:
        if edge.trigger is Trigger.RAMP:
            assert 42 == fsm.percent_after(edge, requested=42)
        else:
            assert OLD_TABLES[edge.key][0] == fsm.percent_after(edge)
    with pytest.raises(ValueError, match="ramp needs a percent"):
        fsm.percent_after(fsm.edge_for(Phase.CUTOVER, Trigger.RAMP))


def test_edges_are_equal_by_trigger_and_phases_only() -> None:
    """The rules do not take part in equality or hashing: an edge is its (trigger, source, dest)."""
    edge = fsm.EDGES_BY_KEY["dual_write->cutover"]
    same = Edge(edge.trigger, edge.source, edge.dest, EdgeRules(0))
    assert same == edge
    assert hash(same) == hash(edge)


def test_graph_check_refuses_two_edges_for_one_source_and_trigger() -> None:
    """A second `advance` out of cutover (even to another phase) fails the import-time check."""
    edges = (*EDGES, Edge(Trigger.ADVANCE, Phase.CUTOVER, Phase.COMPLETE, EdgeRules(100)))
    with pytest.raises(ValueError, match="two edges for 'advance' from cutover"):
        fsm.check_graph(edges, INITIAL, FINAL)
    with pytest.raises(ValueError, match="two edges for 'rollback' from dual_write"):
        fsm.check_graph((*EDGES, EDGES[4]), INITIAL, FINAL)


@pytest.mark.parametrize(
    ("rules", "match"),
    [
        (EdgeRules(101), "percent rule 101"),
        (EdgeRules(-1), "percent rule -1"),
        (EdgeRules(fsm.AS_REQUESTED), "changes the phase but takes the percent as requested"),
    ],
)
def test_graph_check_refuses_a_bad_percent_rule(rules: EdgeRules, match: str) -> None:
    """A percent rule is 0..100, or `requested` on an edge that stays in its phase."""
    edges = tuple(
        Edge(e.trigger, e.source, e.dest, rules) if e.key == "cutover->cleanup" else e for e in EDGES
    )
    with pytest.raises(ValueError, match=match):
        fsm.check_graph(edges, INITIAL, FINAL)


def _with_rules(key: str, rules: EdgeRules) -> tuple[Edge, ...]:
    return tuple(Edge(e.trigger, e.source, e.dest, rules) if e.key == key else e for e in EDGES)


def test_name_check_accepts_the_machine_with_the_registry() -> None:
    """Every name in the rules is a registered built-in (the registry checks this at import)."""
    from migration_fsm.plugins.registry import BUILTIN_GUARDS, BUILTIN_STEPS, BUILTIN_UNDO

    fsm.check_names(EDGES, BUILTIN_GUARDS, BUILTIN_STEPS, BUILTIN_UNDO)


@pytest.mark.parametrize(
    ("rules", "match"),
    [
        (EdgeRules(0, always_on=("nope",)), "names guard 'nope'"),
        (EdgeRules(0, guards=("stores_reachable", "nope")), "names guard 'nope'"),
        (EdgeRules(0, steps=(fsm.DefaultStep("nope"),)), "names step 'nope'"),
        (EdgeRules(0, steps=(fsm.DefaultStep("drain_old", "nope"),)), "names step 'nope'"),
        (
            EdgeRules(0, steps=(fsm.DefaultStep("drain_old", "drain_new"),)),
            "undoes step 'drain_old' with 'drain_new', but the built-in undo is None",
        ),
    ],
)
def test_name_check_refuses_names_that_are_not_registered(rules: EdgeRules, match: str) -> None:
    """A default guard or step (or undo) that is not a registered built-in fails the check."""
    from migration_fsm.plugins.registry import BUILTIN_GUARDS, BUILTIN_STEPS, BUILTIN_UNDO

    with pytest.raises(ValueError, match=match):
        fsm.check_names(
            _with_rules("preparation->dual_write", rules), BUILTIN_GUARDS, BUILTIN_STEPS, BUILTIN_UNDO
        )


def test_the_registry_refuses_an_unregistered_default_at_import() -> None:
    """Importing the registry runs the name check against the machine's table."""
    code = (
        "from migration_fsm import fsm\n"
        "fsm.EDGES = (*fsm.EDGES[:-1], fsm.Edge(fsm.Trigger.RAMP, fsm.Phase.CUTOVER, fsm.Phase.CUTOVER,"
        " fsm.EdgeRules('requested', guards=('no_such_guard',))))\n"
        "import migration_fsm.plugins.registry\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert 0 != result.returncode
    assert "names guard 'no_such_guard', which is not a built-in guard" in result.stderr


# -- errors carry fields ---------------------------------------------------------------------


def test_trigger_not_allowed_carries_trigger_phase_and_allowed() -> None:
    """The fields say what was asked, where, and what the phase allows; the text is unchanged."""
    with pytest.raises(TriggerNotAllowed) as info:
        fsm.resolve_edge(Phase.PREPARATION, Trigger.ROLLBACK)
    error = info.value
    assert "'rollback' is not allowed from phase 'preparation' (allowed: advance)" == str(error)
    assert ("rollback", "preparation", ["advance"]) == (error.trigger, error.phase, error.allowed)
    with pytest.raises(TriggerNotAllowed) as info:
        fsm.resolve_edge(Phase.COMPLETE, Trigger.ADVANCE)
    assert "'advance' is not allowed from phase 'complete' (allowed: none, the phase is final)" == str(
        info.value
    )
    assert ("advance", "complete", []) == (info.value.trigger, info.value.phase, info.value.allowed)
    with pytest.raises(TriggerNotAllowed) as info:
        fsm.rollback_path(Phase.DUAL_WRITE, Phase.CLEANUP)
    assert ("rollback", "dual_write", ["advance", "rollback"]) == (
        info.value.trigger,
        info.value.phase,
        info.value.allowed,
    )
    with pytest.raises(TriggerNotAllowed) as info:
        fsm.edge_for(Phase.DUAL_WRITE, Trigger.RAMP)
    assert ("ramp", "dual_write", ["advance", "rollback"]) == (
        info.value.trigger,
        info.value.phase,
        info.value.allowed,
    )


def test_trigger_not_allowed_pickles_with_its_fields() -> None:
    """An error sent across processes keeps its fields (and message, exit code)."""
    error = TriggerNotAllowed("no", trigger="ramp", phase="cleanup", allowed=["advance"])
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert ("no", "ramp", "cleanup", ["advance"], 2) == (
        str(copy),
        copy.trigger,
        copy.phase,
        copy.allowed,
        copy.exit_code,
    )
    bare = pickle.loads(pickle.dumps(TriggerNotAllowed("plain")))  # noqa: S301 - our own bytes
    assert ("plain", None, None, []) == (str(bare), bare.trigger, bare.phase, bare.allowed)


# -- statuses --------------------------------------------------------------------------------


def test_status_enums_are_the_stored_strings() -> None:
    """The values are what the journal stores and the JSON shows (DESIGN.md contract)."""
    # `approved`, `held` and `released` (DESIGN.md section 11, approvals and watch) come after the
    # section 4 four.
    assert ["intent", "committed", "refused", "aborted", "approved", "held", "released"] == [
        s.value for s in fsm.EntryStatus
    ]
    assert ["pending", "started", "done", "failed", "undone"] == [s.value for s in fsm.StepStatus]
    assert '"committed"' == json.dumps(fsm.EntryStatus.COMMITTED)
    assert "done" == f"{fsm.StepStatus.DONE}"


def test_only_cutover_is_routed_by_percent() -> None:
    """`percent_is_100` and the clients ask the routing, not the phase name, whether the
    percent matters; today only cutover's routing depends on it."""
    assert [Phase.CUTOVER] == [phase for phase in PHASES if fsm.percent_routed(phase)]
    assert (Phase.PREPARATION, Phase.DUAL_WRITE) == fsm.authoritative_phases("old")
    assert (Phase.CUTOVER, Phase.CLEANUP, Phase.COMPLETE) == fsm.authoritative_phases("new")
