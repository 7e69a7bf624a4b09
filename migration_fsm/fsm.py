"""Phases, edges and the routing table, as data, checked when imported.

This module is pure (no I/O) and is the only user of ``transitions``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Final, Literal

from transitions import Machine, MachineError

from .exceptions import TriggerNotAllowed

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping


class Phase(StrEnum):
    """The migration's phases, in order."""

    PREPARATION = "preparation"
    DUAL_WRITE = "dual_write"
    CUTOVER = "cutover"
    CLEANUP = "cleanup"
    COMPLETE = "complete"


class Trigger(StrEnum):
    """What an operator can ask of the machine (`init` only starts it)."""

    INIT = "init"
    ADVANCE = "advance"
    ROLLBACK = "rollback"
    RAMP = "ramp"


class EntryStatus(StrEnum):
    """The status of a journal entry (one transition attempt), as stored."""

    INTENT = "intent"
    COMMITTED = "committed"
    REFUSED = "refused"
    ABORTED = "aborted"
    #: An operator's approval of the edge the row names (`approve`); it changes nothing.
    APPROVED = "approved"
    #: A hold `watch` placed (`on_failure = "pause"`): `advance` and a ramp up are refused
    #: while it stands (until a `released` row, or a phase change); it changes nothing else.
    HELD = "held"
    #: An operator's release of the standing hold (`watch --release`); it changes nothing else.
    RELEASED = "released"


class StepStatus(StrEnum):
    """The status of one planned step of a transition, as stored."""

    PENDING = "pending"
    STARTED = "started"
    DONE = "done"
    FAILED = "failed"
    UNDONE = "undone"


class RepairStatus(StrEnum):
    """The status of a dual-write repair log entry, as stored: `open` until `reconcile`
    replays the missed write, then `done`."""

    OPEN = "open"
    DONE = "done"


PHASES: Final[tuple[Phase, ...]] = tuple(Phase)
INITIAL: Final = Phase.PREPARATION
FINAL: Final[frozenset[Phase]] = frozenset({Phase.COMPLETE})

#: `EdgeRules.percent` of an edge that sets the percent the operator asks for (`ramp N`).
AS_REQUESTED: Final = "requested"


@dataclass(frozen=True, slots=True)
class DefaultStep:
    """A step an edge runs by default, and the step that undoes it on `abort` (if any)."""

    name: str
    undo: str | None = None


@dataclass(frozen=True, slots=True)
class EdgeRules:
    """What an edge does besides changing the phase (DESIGN.md sections 3 and 6).

    `percent` is the cutover percent once the edge is taken (`AS_REQUESTED`: the percent
    asked for). `always_on` guards run whatever the config says and `--force` cannot
    override them. `guards` and `steps` are the defaults an edge gets when both stores are
    configured and the config names none for it.
    """

    percent: int | Literal["requested"]
    always_on: tuple[str, ...] = ()
    guards: tuple[str, ...] = ()
    steps: tuple[DefaultStep, ...] = ()


@dataclass(frozen=True, slots=True)
class Edge:
    """One edge of the machine: `trigger` takes `source` to `dest`, following its `rules`.

    Two edges are equal when they join the same phases by the same trigger.
    """

    trigger: Trigger
    source: Phase
    dest: Phase
    rules: EdgeRules = field(compare=False, repr=False)

    @property
    def key(self) -> str:
        """The name config uses for this edge, e.g. ``"dual_write->cutover"``."""
        return f"{self.source}->{self.dest}"


_REACHABLE: Final = ("stores_reachable",)
#: The first step of an edge that moves consumption (DESIGN.md section 10): it pauses the
#: giving side (`giving_side`), and `abort` lifts the pause.
_PAUSE: Final = DefaultStep("pause_consumers", undo="lift_pause")

EDGES: Final[tuple[Edge, ...]] = (
    Edge(
        Trigger.ADVANCE,
        Phase.PREPARATION,
        Phase.DUAL_WRITE,
        EdgeRules(0, guards=_REACHABLE),
    ),
    Edge(
        Trigger.ADVANCE,
        Phase.DUAL_WRITE,
        Phase.CUTOVER,
        EdgeRules(
            0,
            guards=("backfill_complete", "repair_log_empty", "checksums_match"),
            steps=(_PAUSE, DefaultStep("drain_old"), DefaultStep("transfer_state")),
        ),
    ),
    Edge(
        Trigger.ADVANCE,
        Phase.CUTOVER,
        Phase.CLEANUP,
        EdgeRules(
            100,
            always_on=("percent_is_100",),
            guards=("percent_is_100", "old_drained", "checksums_match", "no_double_execution"),
            steps=(DefaultStep("retire_old"),),
        ),
    ),
    Edge(
        Trigger.ADVANCE,
        Phase.CLEANUP,
        Phase.COMPLETE,
        # `retire_old` again: the old copies that producers still on cutover's routing wrote
        # during the cutover -> cleanup transition (after its own `retire_old` had looked).
        EdgeRules(
            100, guards=("repair_log_empty", "no_double_execution"), steps=(DefaultStep("retire_old"),)
        ),
    ),
    Edge(
        Trigger.ROLLBACK,
        Phase.DUAL_WRITE,
        Phase.PREPARATION,
        EdgeRules(0),
    ),
    Edge(
        Trigger.ROLLBACK,
        Phase.CUTOVER,
        Phase.DUAL_WRITE,
        EdgeRules(
            0,
            guards=_REACHABLE,
            steps=(_PAUSE, DefaultStep("drain_new"), DefaultStep("reverse_sync")),
        ),
    ),
    Edge(
        Trigger.ROLLBACK,
        Phase.CLEANUP,
        Phase.CUTOVER,
        EdgeRules(100, guards=_REACHABLE, steps=(DefaultStep("reverse_sync"),)),
    ),
    Edge(Trigger.RAMP, Phase.CUTOVER, Phase.CUTOVER, EdgeRules(AS_REQUESTED)),
)
EDGES_BY_KEY: Final[Mapping[str, Edge]] = {edge.key: edge for edge in EDGES}
#: The always-on guards by edge key, read from `EDGES` (each edge's `rules.always_on`).
ALWAYS_ON_GUARDS: Final[Mapping[str, tuple[str, ...]]] = {
    edge.key: edge.rules.always_on for edge in EDGES if edge.rules.always_on
}

Side = Literal["old", "new"]
ReadFrom = Literal["old", "new", "split"]


@dataclass(frozen=True, slots=True)
class Routing:
    """What a backend does in a phase: where to write, read and consume."""

    write_old: bool
    write_new: bool
    authoritative: Side
    read_from: ReadFrom
    read_fallback: Side | None
    consume_from: Side

    def as_dict(self) -> dict[str, object]:
        """The `routing` object of `status --json`."""
        return {
            "write_old": self.write_old,
            "write_new": self.write_new,
            "authoritative": self.authoritative,
            "read_from": self.read_from,
            "read_fallback": self.read_fallback,
            "consume_from": self.consume_from,
        }


#: DESIGN.md section 2; the cutover row's `read_from` is refined by `routing_for`.
ROUTING: Final[Mapping[Phase, Routing]] = {
    Phase.PREPARATION: Routing(True, False, "old", "old", None, "old"),
    Phase.DUAL_WRITE: Routing(True, True, "old", "old", None, "old"),
    Phase.CUTOVER: Routing(True, True, "new", "split", "old", "new"),
    Phase.CLEANUP: Routing(False, True, "new", "new", "old", "new"),
    Phase.COMPLETE: Routing(False, True, "new", "new", None, "new"),
}
_CUTOVER_BY_READ: Final[Mapping[ReadFrom, Routing]] = {
    read: Routing(True, True, "new", read, "old", "new") for read in ("old", "new", "split")
}


def bucket(key: str) -> int:
    """The key's percent bucket, 0..99, the same on every process and Python version."""
    return zlib.crc32(key.encode("utf-8")) % 100


def routing_for(phase: Phase, percent: int, key: str | None = None) -> Routing:
    """The routing of `phase` at `percent`, for one key or (key None) for the whole migration."""
    if phase is not Phase.CUTOVER:
        return ROUTING[phase]
    if key is not None:
        return _CUTOVER_BY_READ["new" if bucket(key) < percent else "old"]
    if percent >= 100:
        return _CUTOVER_BY_READ["new"]
    if percent <= 0:
        return _CUTOVER_BY_READ["old"]
    return _CUTOVER_BY_READ["split"]


def percent_routed(phase: Phase) -> bool:
    """Whether the routing of `phase` depends on the cutover percent (only cutover's does)."""
    return routing_for(phase, 0) != routing_for(phase, 100)


def giving_side(source: Phase, dest: Phase) -> Side | None:
    """The side whose workers stop consuming when `source -> dest` is taken (the side that
    consumes in `source` and not in `dest`), or None when the edge does not move consumption.
    `pause_consumers` pauses it; the other side receives the in-flight tasks."""
    before, after = ROUTING[source].consume_from, ROUTING[dest].consume_from
    return before if before != after else None


def authoritative_phases(side: Side) -> tuple[Phase, ...]:
    """The phases, in order, whose routing makes `side` authoritative (in cutover the new
    side is authoritative at every percent)."""
    return tuple(phase for phase in PHASES if ROUTING[phase].authoritative == side)


def percent_after(edge: Edge, *, requested: int | None = None) -> int:
    """The cutover percent once `edge` is taken: fixed by its rule, or `requested` (`ramp`)."""
    rule = edge.rules.percent
    if rule == AS_REQUESTED:
        if requested is None:
            raise ValueError(f"{edge.trigger} needs a percent")
        return requested
    assert isinstance(rule, int)
    return rule


class _PhaseModel:
    """A throw-away model that `transitions` moves between phases."""

    state: str

    if TYPE_CHECKING:  # added by transitions.Machine.add_model

        def trigger(self, name: str) -> bool: ...


_MACHINE: Final = Machine(
    model=None,
    states=[phase.value for phase in PHASES],
    transitions=[
        {
            "trigger": edge.trigger.value,
            "source": edge.source.value,
            # An internal transition keeps the state without exit/enter callbacks.
            "dest": None if edge.source == edge.dest else edge.dest.value,
        }
        for edge in EDGES
    ],
    initial=INITIAL.value,
    auto_transitions=False,
)


def resolve_edge(source: Phase, trigger: Trigger) -> Edge:
    """The edge that `trigger` takes from `source`, fired on a `transitions` machine.

    Raises `TriggerNotAllowed` when the phase has no such edge.
    """
    model = _PhaseModel()
    _MACHINE.add_model(model, initial=source.value)
    try:
        model.trigger(trigger.value)
    except (MachineError, AttributeError) as exc:  # AttributeError: a trigger with no edge at all
        allowed = allowed_triggers(source)
        raise TriggerNotAllowed(
            f"'{trigger}' is not allowed from phase '{source}'"
            f" (allowed: {', '.join(allowed) or 'none, the phase is final'})",
            trigger=str(trigger),
            phase=str(source),
            allowed=allowed,
        ) from exc
    finally:
        _MACHINE.remove_model(model)
    return edge_for(source, trigger, Phase(model.state))


def edge_for(source: Phase, trigger: Trigger, dest: Phase | None = None) -> Edge:
    """The edge of `trigger` from `source` (and to `dest`, when given)."""
    for edge in EDGES:
        if edge.source is source and edge.trigger is trigger and dest in (None, edge.dest):
            return edge
    raise TriggerNotAllowed(
        f"'{trigger}' is not allowed from phase '{source}'",
        trigger=str(trigger),
        phase=str(source),
        allowed=allowed_triggers(source),
    )


def allowed_triggers(phase: Phase) -> list[str]:
    """The triggers with an edge out of `phase`, in table order."""
    seen: list[str] = []
    for edge in EDGES:
        if edge.source is phase and edge.trigger.value not in seen:
            seen.append(edge.trigger.value)
    return seen


def rollback_path(source: Phase, target: Phase) -> list[Edge]:
    """The rollback edges, one by one, from `source` back to `target`."""
    path: list[Edge] = []
    phase, target = Phase(source), Phase(target)
    while phase != target:
        try:
            edge = edge_for(phase, Trigger.ROLLBACK)
        except TriggerNotAllowed:
            raise TriggerNotAllowed(
                f"cannot roll back from '{source}' to '{target}':"
                f" '{target}' is not an earlier phase reachable by rollback",
                trigger=str(Trigger.ROLLBACK),
                phase=str(source),
                allowed=allowed_triggers(source),
            ) from None
        path.append(edge)
        phase = edge.dest
    if not path:
        raise TriggerNotAllowed(
            f"the migration is already in '{target}'",
            trigger=str(Trigger.ROLLBACK),
            phase=str(source),
            allowed=allowed_triggers(source),
        )
    return path


def replay(edges: list[tuple[Trigger, Phase | None, Phase, int]]) -> tuple[Phase, int]:
    """The phase and percent reached by committed (trigger, source, dest, percent) rows."""
    phase: Phase | None = None
    percent = 0
    for trigger, source, dest, row_percent in edges:
        if trigger is Trigger.INIT:
            if phase is not None or dest is not INITIAL:
                raise ValueError(f"unexpected init to {dest}")
        else:
            if phase is None or source is not phase:
                raise ValueError(f"{trigger} from {source} while the phase was {phase}")
            edge = resolve_edge(phase, trigger)
            if edge.dest is not dest:
                raise ValueError(f"{trigger} from {source} leads to {edge.dest}, not {dest}")
        phase, percent = dest, row_percent
    if phase is None:
        raise ValueError("no init row")
    return phase, percent


def mermaid() -> str:
    """The machine as a Mermaid `stateDiagram-v2`, generated from `EDGES`."""
    lines = ["stateDiagram-v2", f"    [*] --> {INITIAL}"]
    lines += [f"    {edge.source} --> {edge.dest}: {edge.trigger}" for edge in EDGES]
    lines += [f"    {phase} --> [*]" for phase in PHASES if phase in FINAL]
    return "\n".join(lines) + "\n"


def check_graph(edges: tuple[Edge, ...], initial: Phase, final: frozenset[Phase]) -> None:
    """Raise ValueError unless every phase is reachable, only final phases are dead ends,
    nothing leaves a final phase, and every edge passes `check_edges`."""
    check_edges(edges)
    outgoing: dict[Phase, set[Phase]] = {phase: set() for phase in PHASES}
    for edge in edges:
        outgoing[edge.source].add(edge.dest)
    reached = {initial}
    frontier = [initial]
    while frontier:
        for dest in outgoing[frontier.pop()]:
            if dest not in reached:
                reached.add(dest)
                frontier.append(dest)
    if unreachable := set(PHASES) - reached:
        raise ValueError(f"unreachable phases: {sorted(unreachable)}")
    for phase in PHASES:
        if phase in final and outgoing[phase]:
            raise ValueError(f"final phase {phase} has outgoing edges")
        if phase not in final and not outgoing[phase] - {phase}:
            raise ValueError(f"phase {phase} is a dead end")
    if set(ROUTING) != set(PHASES):
        raise ValueError("the routing table does not cover every phase")


def check_edges(edges: tuple[Edge, ...]) -> None:
    """Raise ValueError if two edges leave one phase by one trigger, or an edge's percent
    rule is neither a percent nor (for an edge that stays in its phase) as requested."""
    seen: dict[tuple[Phase, Trigger], Edge] = {}
    for edge in edges:
        if (twin := seen.get((edge.source, edge.trigger))) is not None:
            raise ValueError(f"two edges for '{edge.trigger}' from {edge.source}: {twin.key} and {edge.key}")
        seen[edge.source, edge.trigger] = edge
        rule = edge.rules.percent
        if rule == AS_REQUESTED:
            if edge.source is not edge.dest:
                raise ValueError(f"edge {edge.key} changes the phase but takes the percent as requested")
        elif not isinstance(rule, int) or isinstance(rule, bool) or not 0 <= rule <= 100:
            raise ValueError(f"edge {edge.key} has percent rule {rule!r}, not 0..100 or {AS_REQUESTED!r}")


def check_names(
    edges: tuple[Edge, ...],
    guards: Collection[str],
    steps: Collection[str],
    undo: Mapping[str, str],
) -> None:
    """Raise ValueError unless every guard and step an edge's rules name is a registered
    built-in, and each default step's undo is the one registered for that step (so a step
    undoes the same way whether it runs by default or because the config names it).

    Called where the registry is built (`plugins.registry`), which this module cannot import.
    """
    for edge in edges:
        for name in (*edge.rules.always_on, *edge.rules.guards):
            if name not in guards:
                raise ValueError(f"edge {edge.key} names guard '{name}', which is not a built-in guard")
        for step in edge.rules.steps:
            for step_name in (step.name, step.undo):
                if step_name is not None and step_name not in steps:
                    raise ValueError(
                        f"edge {edge.key} names step '{step_name}', which is not a built-in step"
                    )
            if step.undo != undo.get(step.name):
                raise ValueError(
                    f"edge {edge.key} undoes step '{step.name}' with {step.undo!r},"
                    f" but the built-in undo is {undo.get(step.name)!r}"
                )


check_graph(EDGES, INITIAL, FINAL)
