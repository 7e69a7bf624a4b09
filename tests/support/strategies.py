"""Hypothesis strategies, and the guards, steps and store that let a test inject faults.

The steps and the guard below are configured by import path (`tests.support.strategies:step_a`),
exactly as an operator configures their own. What they do is decided by the module-level
`PLAN`, which a test arms right before it calls the engine:

- `PLAN.guard` says whether `guard_flag` passes, fails, raises or crashes;
- `PLAN.counter` says what goes wrong (a `Fault`). Fault points are counted from 0 in the
  order the call reaches them: every run of a step or an undo, and just before and just
  after each write that moves a transition along (`append_refused`, `claim`, `take_over`,
  the lease's `commit` or `abort`, through `FaultyStore`). A crash (`SimulatedCrash`: the
  process dies) can hit any point; a failure (`StepError`, which the engine turns into
  `StepFailed`) hits a run of a step or undo.

`FaultCounter` is the single place that decides, so a model can predict the outcome by
counting the same points.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, ParamSpec, TypeVar

from hypothesis import strategies as st

from migration_fsm.fsm import Phase
from migration_fsm.journal import Journal, JournalEntry, Lease, MigrationState
from migration_fsm.plugins.context import Context, GuardVerdict

_P = ParamSpec("_P")
_R = TypeVar("_R")
GuardMode = Literal["pass", "fail", "raise", "crash"]
PointKind = Literal["step", "store"]
Misbehaviour = Literal["crash", "fail"]

GUARD_FLAG: Final = "tests.support.strategies:guard_flag"
STEP_A: Final = "tests.support.strategies:step_a"
STEP_B: Final = "tests.support.strategies:step_b"
STEP_C: Final = "tests.support.strategies:step_c"
UNDO_A: Final = "tests.support.strategies:undo_a"
UNDO_B: Final = "tests.support.strategies:undo_b"
UNDO_C: Final = "tests.support.strategies:undo_c"

#: `guards` setting: `guard_flag` on three advance edges and one rollback edge.
GUARDS: Final[dict[str, list[str]]] = {
    "preparation->dual_write": [GUARD_FLAG],
    "dual_write->cutover": [GUARD_FLAG],
    "cutover->cleanup": [GUARD_FLAG],
    "cutover->dual_write": [GUARD_FLAG],
}

#: `steps` setting: steps with and without an undo, on advance, rollback and ramp edges
#: (`dual_write->cutover` ends with a step without undo, so a failure there leaves two
#: undos for `abort` to run in reverse).
STEPS: Final[dict[str, list[str | dict[str, str]]]] = {
    "preparation->dual_write": [{"do": STEP_A, "undo": UNDO_A}],
    "dual_write->cutover": [{"do": STEP_A, "undo": UNDO_A}, {"do": STEP_B, "undo": UNDO_B}, STEP_C],
    "cutover->cleanup": [STEP_B],
    "cutover->cutover": [STEP_C],
    "cutover->dual_write": [{"do": STEP_B, "undo": UNDO_B}, STEP_A],
    "cleanup->cutover": [{"do": STEP_C, "undo": UNDO_C}, {"do": STEP_A, "undo": UNDO_A}],
}


def edge_steps(key: str) -> list[tuple[str, str | None]]:
    """The (step, undo) pairs `STEPS` configures on the edge `key`."""
    return [
        (spec, None) if isinstance(spec, str) else (spec["do"], spec["undo"]) for spec in STEPS.get(key, [])
    ]


class SimulatedCrash(BaseException):
    """The process dies at this point: a BaseException, so no `except Exception` swallows it."""


class StepError(Exception):
    """An ordinary failure of a step or guard (an outage the operator fixes, then resumes)."""


@dataclass(frozen=True, slots=True)
class Fault:
    """What goes wrong in the next call: with `crash`, the process dies at fault point `at`
    (counting every point); else the `at`-th run of a step or undo raises `StepError`."""

    at: int
    crash: bool


@dataclass(slots=True)
class FaultCounter:
    """Counts the fault points a call reaches and says which one misbehaves, and how."""

    fault: Fault | None
    points: int = 0
    steps: int = 0

    def next(self, kind: PointKind) -> Misbehaviour | None:
        """Reach the next point: None when it behaves, else `crash` or `fail`."""
        point, self.points = self.points, self.points + 1
        step = None
        if kind == "step":
            step, self.steps = self.steps, self.steps + 1
        if self.fault is None:
            return None
        if self.fault.crash:
            return "crash" if self.fault.at == point else None
        return "fail" if self.fault.at == step else None


@dataclass(slots=True)
class Plan:
    """What the configured guard and steps do during the next engine call."""

    guard: GuardMode = "pass"
    counter: FaultCounter = field(default_factory=lambda: FaultCounter(None))


PLAN: Final = Plan()


def arm(guard: GuardMode = "pass", fault: Fault | None = None) -> None:
    """Set what `guard_flag` answers and which fault point misbehaves, from now on."""
    PLAN.guard = guard
    PLAN.counter = FaultCounter(fault)


def fault_point(kind: PointKind) -> None:
    """Reach one fault point: return, or raise what `PLAN` says."""
    match PLAN.counter.next(kind):
        case "crash":
            raise SimulatedCrash(f"simulated crash at fault point {PLAN.counter.points - 1}")
        case "fail":
            raise StepError(f"simulated failure of step run {PLAN.counter.steps - 1}")
        case None:
            return


def guard_flag(ctx: Context) -> GuardVerdict:
    """A configured guard whose verdict `PLAN.guard` decides."""
    if PLAN.guard == "crash":
        raise SimulatedCrash("simulated crash in guard_flag")
    if PLAN.guard == "raise":
        raise StepError("guard_flag could not read what it checks")
    return GuardVerdict(PLAN.guard == "pass", f"the plan says {PLAN.guard}")


#: Every run of a step or undo, per migration, in order: (seq, "tests.support.strategies:step_a").
RUNS: Final[defaultdict[str, list[tuple[int | None, str]]]] = defaultdict(list)


def _step(ctx: Context, name: str) -> None:
    RUNS[ctx.migration].append((ctx.seq, name))
    # Save progress before the fault point, so a resumed step must get it back: the
    # checkpoint of a step then always counts its attempts.
    runs = 0 if ctx.checkpoint is None else int(ctx.checkpoint["runs"])
    ctx.save_checkpoint({"runs": runs + 1})
    fault_point("step")


def _undo(ctx: Context, name: str) -> None:
    RUNS[ctx.migration].append((ctx.seq, name))
    fault_point("step")


def step_a(ctx: Context) -> None:
    """A step that checkpoints its runs, then reaches a fault point."""
    _step(ctx, STEP_A)


def step_b(ctx: Context) -> None:
    """A step that checkpoints its runs, then reaches a fault point."""
    _step(ctx, STEP_B)


def step_c(ctx: Context) -> None:
    """A step that checkpoints its runs, then reaches a fault point."""
    _step(ctx, STEP_C)


def undo_a(ctx: Context) -> None:
    """The compensation of `step_a`: one fault point."""
    _undo(ctx, UNDO_A)


def undo_b(ctx: Context) -> None:
    """The compensation of `step_b`: one fault point."""
    _undo(ctx, UNDO_B)


def undo_c(ctx: Context) -> None:
    """The compensation of `step_c`: one fault point."""
    _undo(ctx, UNDO_C)


def _between_fault_points(write: Callable[_P, _R]) -> Callable[_P, _R]:
    """`write` with a fault point just before and just after it."""

    @functools.wraps(write)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        fault_point("store")
        result = write(*args, **kwargs)
        fault_point("store")
        return result

    return wrapper


class FaultyLease(Lease):
    """A `Lease` whose commit and abort (the writes that close a transition) have fault points."""

    commit = _between_fault_points(Lease.commit)
    abort = _between_fault_points(Lease.abort)


def _faulty(lease: Lease) -> FaultyLease:
    return FaultyLease(lease.journal, lease.migration_id, lease.seq, lease.holder, lease.lease_seconds)


_claim = _between_fault_points(Journal.claim)
_take_over = _between_fault_points(Journal.take_over)


class FaultyStore(Journal):
    """A `Journal` with a fault point just before and just after each write that moves a
    transition along: a crash before one leaves nothing of it written, after one all of it.
    The writes are `append_refused`, `claim`, `take_over` and the lease's `commit` or `abort`."""

    append_refused = _between_fault_points(Journal.append_refused)

    def claim(self, *args: Any, **kwargs: Any) -> tuple[Lease, JournalEntry]:
        lease, entry = _claim(self, *args, **kwargs)
        return _faulty(lease), entry

    def take_over(self, migration: MigrationState, *args: Any, **kwargs: Any) -> Lease:
        return _faulty(_take_over(self, migration, *args, **kwargs))


def faults() -> st.SearchStrategy[Fault | None]:
    """Nothing goes wrong half of the time; else a crash at one of the first fault points,
    or a failure of one of the first step runs."""
    return st.one_of(
        st.none(),
        st.none(),
        st.builds(Fault, at=st.integers(0, 7), crash=st.just(True)),
        st.builds(Fault, at=st.integers(0, 3), crash=st.just(False)),
    )


def guard_modes() -> st.SearchStrategy[GuardMode]:
    """What `guard_flag` does, passing most often."""
    modes: tuple[GuardMode, ...] = ("pass", "pass", "pass", "pass", "pass", "fail", "fail", "raise", "crash")
    return st.sampled_from(modes)


def reasons() -> st.SearchStrategy[str]:
    """A reason an operator gives (blank ones are tried by `bad_input`)."""
    return st.sampled_from(("rollout looks bad", "ticket OPS-1", "error rate up"))


def percents() -> st.SearchStrategy[int]:
    """A cutover percent, 0..100, 100 (needed to leave cutover) often."""
    return st.sampled_from((100, 0, 100)) | st.integers(0, 100)


def rollback_targets() -> st.SearchStrategy[Phase | None]:
    """No `--to` (one edge back) most of the time, else any phase, reachable or not."""
    return st.one_of(st.none(), st.none(), st.sampled_from(tuple(Phase)))
