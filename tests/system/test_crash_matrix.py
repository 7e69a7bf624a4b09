"""The crash matrix: on every edge of the machine, a real CLI process is SIGKILLed right after
the claim, inside each step, between two steps and just before the commit; then `resume --steal`
from a new process finishes the transition. On SQLite and on PostgreSQL.

Both sides are SQL task stores holding a few hundred tasks that "workers" and "producers"
changed in every phase, so the default steps (drain_old, transfer_state, drain_new,
reverse_sync) do real work; edges without a default step run `tests.support.steps:noop_step`.
Setup and checks use the Python API in this process. The killed run is a new process that
sends itself SIGKILL at the chosen point (`tests/support/crashkit.py`); `resume --steal` runs in
another new process. For the first point of each edge both are new interpreters
(`python -m tests.support.crashkit --crash-at ...`, then `python -m migration_fsm resume --steal`);
for the others, fresh forks of the fork server (`tests/support/forkserver.py`), which imported
the CLI once: the same `cli.main`, a second less to start each.

After each crash: the phase is still the source, the journal verifies and shows the
interrupted transition. After `resume`: the phase is the destination, the journal verifies,
has exactly one new row (committed, by the killed actor, taken over once), no row before it
changed, each step ran once more only if it died inside; and both sides hold exactly what
one uninterrupted run of the edge's steps gives (no task lost, none doubled, every status
and attempt count as the steps set it).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from migration_fsm.commands import Verified, verify_entries
from migration_fsm.config import Settings, StepSpec, StoreConfig, load_settings
from migration_fsm.fsm import (
    EDGES,
    EDGES_BY_KEY,
    PHASES,
    ROUTING,
    Edge,
    Phase,
    Side,
    Trigger,
    giving_side,
    percent_after,
    resolve_edge,
)
from migration_fsm.journal import Journal, JournalEntry, MigrationState
from migration_fsm.journal.schema import execution_claims_table
from migration_fsm.migration import Migration, edge_steps
from migration_fsm.plugins.defaults import DEFAULT_STEPS
from migration_fsm.tasks.factory import build_store
from migration_fsm.tasks.records import TaskStatus
from migration_fsm.tasks.sides import SIDES
from migration_fsm.tasks.sql import SqlTaskStore
from migration_fsm.tools.backfill import backfill_migration
from migration_fsm.tools.validate import ValidationReport, validate_migration
from tests.support.cli import ROOT, CliResult
from tests.support.crashkit import NOOP_STEP, NOT_REACHED, CrashPoint
from tests.support.datatools import create_task_table, everything, row_counts, tasks, write_stores_config
from tests.support.forkserver import ForkServer, child_env

pytestmark = pytest.mark.slow

MIGRATION: Final = "crash"
DOOMED: Final = "doomed"
RESCUER: Final = "rescuer"
RAMP_TO: Final = 50
SEED_TASKS: Final = 240
WAIT: Final = 120.0  # the most one subprocess may take before the test fails

#: Edges with no default step get the no-op step, so every edge has a step to die in.
STEPS: Final[dict[str, list[str | StepSpec]]] = {
    edge.key: [NOOP_STEP] for edge in EDGES if not DEFAULT_STEPS.get(edge.key)
}

#: `in_step` dies after this many writes of the step (task batches and checkpoints):
IN_STEP_WRITES: Final = {
    NOOP_STEP: 1,  # between its two checkpoints
    "pause_consumers": 2,  # the pause is published and checkpointed, not yet acknowledged
    "drain_old": 2,  # the first handed-over task is pending on the new side, still running on old
    "drain_new": 2,  # ... on the old side, still running on new
    "transfer_state": 3,  # two rows written after the first checkpoint: resume writes them again
    "reverse_sync": 3,
    "retire_old": 3,  # a batch of old copies retired after the first checkpoint, then checkpointed
}

CONFIG_LINES: Final = (
    "lease_seconds = 120",  # the dead holder's lease is still live: `resume --steal` takes it
    "heartbeat_seconds = 30",
    "drain_timeout_seconds = 0",  # a drain requeues at once whatever still runs
    'drain_policy = "requeue"',
    "backfill_batch_size = 50",  # several batches, so a step can die between two checkpoints
    "[steps]",
    *(f"{json.dumps(key)} = {json.dumps(names)}" for key, names in STEPS.items()),
)

#: A task as the checks compare it: identity checksum, status, attempts.
Fact = tuple[str, TaskStatus, int]
Sides = dict[Side, dict[str, Fact]]


@dataclass(frozen=True, slots=True)
class Case:
    """One crash point of the matrix: an edge, its steps, where the process dies."""

    edge: Edge
    steps: tuple[str, ...]
    point: CrashPoint

    @property
    def id(self) -> str:
        where = str(self.point.kind)
        if self.point.step is not None:
            where += f":{self.point.step.rpartition(':')[2]}"
        return f"{self.edge.key}/{where}"


def edge_step_names(edge: Edge) -> tuple[str, ...]:
    """The steps the crash config runs on `edge` (defaults, or the no-op step)."""
    stores: dict[Side, StoreConfig] = {side: StoreConfig(kind="memory") for side in SIDES}
    settings = Settings(database_url="sqlite://", actor="matrix", stores=stores, steps=STEPS)
    return tuple(name for name, _ in edge_steps(settings, edge))


def matrix() -> list[Case]:
    """Every edge x (after the claim, inside and after each step, before the commit)."""
    cases = []
    for edge in EDGES:
        steps = edge_step_names(edge)
        points = [CrashPoint("after_claim")]
        for step in steps:
            points.append(CrashPoint("in_step", step, IN_STEP_WRITES[step]))
            if step != steps[-1]:  # after the last step comes `before_commit`
                points.append(CrashPoint("after_step", step))
        points.append(CrashPoint("before_commit"))
        cases += [Case(edge, steps, point) for point in points]
    return cases


MATRIX: Final = matrix()
TRIED: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def tally() -> Iterator[Counter[str]]:
    """Count the crash points tried per backend; print them at the end (seen with `pytest -s`)."""
    yield TRIED
    for backend, count in sorted(TRIED.items()):
        print(f"\ncrash matrix: {count} crash points on {backend}")


# -- the two task stores and their traffic ---------------------------------------------


class World:
    """A migration database, two SQL task stores (kept open) and the crash config naming them."""

    def __init__(self, url: str, folder: Path) -> None:
        self.url = url
        self.backend = make_url(url).get_backend_name()
        # On SQLite each system has a database file of its own; on PostgreSQL, a table in the test's schema.
        self.tables: dict[Side, tuple[str, str]] = {
            side: (f"sqlite:///{folder / f'{side}.db'}" if self.backend == "sqlite" else url, f"{side}_tasks")
            for side in SIDES
        }
        for task_url, table in self.tables.values():
            create_task_table(task_url, table)
        stores: dict[str, dict[str, str]] = {
            side: {"kind": "sql", "url": task_url, "table": table}
            for side, (task_url, table) in self.tables.items()
        }
        self.config = write_stores_config(folder / "crash.toml", stores, CONFIG_LINES)
        self.settings = load_settings(self.config, database_url=url, actor="setup")
        self.stores = {side: build_store(self.settings.stores[side], side) for side in SIDES}
        self.store = Journal.open(url)
        self.engine = Migration(self.store, self.settings, MIGRATION)

    def close(self) -> None:
        self.store.close()
        for store in self.stores.values():
            assert isinstance(store, SqlTaskStore)
            store.close()

    def cli_args(self, command: list[str], actor: str) -> list[str]:
        return [*command, "-m", MIGRATION, "--db", self.url, "--config", self.config, "--actor", actor]

    def sides(self) -> Sides:
        """Every task of both sides."""
        return {
            side: {r.key: (r.checksum(), r.status, r.attempts) for r in everything(store)}
            for side, store in self.stores.items()
        }

    def handed(self) -> Handed:
        """Where the execution ledger gives each key it knows (the side of its claim)."""
        c = execution_claims_table.c
        with self.store.transaction() as conn:
            rows = conn.execute(select(c.key, c.side).where(c.migration == MIGRATION)).all()
        return {row.key: row.side for row in rows}

    def state(self) -> tuple[MigrationState, list[JournalEntry]]:
        state = self.store.get(MIGRATION)
        return state, self.store.journal(state)

    def verify(self) -> Verified:
        """What `migration-fsm verify` checks, on the journal as it is now."""
        return verify_entries(*self.state())

    def validate(self) -> ValidationReport:
        """`migration-fsm validate`, recorded for the guards (nothing is in flight: no settling)."""
        return validate_migration(self.store, self.settings, MIGRATION, settle=0)[1]

    def traffic(self, phase: Phase) -> None:
        """What the systems do while `phase` lasts: producers write fresh tasks where the
        routing says, workers of the consuming side finish some tasks and start others."""
        routing = ROUTING[phase]
        index = PHASES.index(phase)
        fresh = tasks(10, start=10_000 + 100 * index)  # scheduled: pending
        if routing.write_old:
            self.stores["old"].put_many(fresh)
        if routing.write_new:
            self.stores["new"].put_many(fresh)
        side = self.stores[routing.consume_from]
        work = []
        for i, record in enumerate(everything(side)):
            if i % 7 == index:
                done = TaskStatus.FAILED if record.status is TaskStatus.COMPLETED else TaskStatus.COMPLETED
                work.append(record.model_copy(update={"status": done, "attempts": record.attempts + 1}))
            elif i % 23 == index + 1:
                work.append(record.model_copy(update={"status": TaskStatus.RUNNING}))
        side.put_many(work)

    def ready(self, edge: Edge) -> None:
        """Do what the default guards of `edge` ask for before it may be taken."""
        if edge.key == "dual_write->cutover":
            backfill_migration(self.store, self.settings, MIGRATION)
            self.validate()
        elif edge.key == "cutover->cleanup":
            self.engine.ramp(100)
            self.validate()
        elif edge.key == "cleanup->complete":
            # What producers still on cutover's routing wrote while `cutover -> cleanup` ran:
            # old copies that the second `retire_old` must retire.
            late = tasks(60, start=20_000)  # more than a batch (`backfill_batch_size` 50)
            self.stores["old"].put_many(late)
            self.stores["new"].put_many(late)

    def reach(self, edge: Edge) -> None:
        """Create the migration and walk it, in this process, to where `edge` may be taken:
        traffic in every phase, and what the guards of each edge ask for."""
        self.engine.init()
        self.stores["old"].put_many(tasks(SEED_TASKS, mixed=True))
        for phase in PHASES[: PHASES.index(edge.source)]:
            self.traffic(phase)
            forward = resolve_edge(phase, Trigger.ADVANCE)
            self.ready(forward)
            self.engine.advance()
        self.traffic(edge.source)
        self.ready(edge)


@pytest.fixture
def world(upgraded_url: str, tmp_path: Path) -> Iterator[World]:
    """The crash matrix's world on the test database."""
    made = World(upgraded_url, tmp_path)
    yield made
    made.close()


# -- what one uninterrupted run of the steps does to the tasks ------------------------------


#: Where the execution ledger gives each key it knows (its claim's side); no worker claims
#: anything in the matrix, so the drains' hand-overs are all there is.
Handed = dict[str, Side]
FINISHED: Final = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


def _other(side: Side) -> Side:
    return "new" if side == "old" else "old"


def _hand_over(sides: Sides, handed: Handed, side: Side, key: str) -> None:
    """A running task of `side` handed over: pending with one more attempt on the other side
    (created there if missing), cancelled on `side`, given to the other side in the ledger."""
    other = _other(side)
    checksum, _, attempts = sides[side][key]
    theirs = sides[other].get(key)
    sides[other][key] = (checksum if theirs is None else theirs[0], TaskStatus.PENDING, attempts + 1)
    sides[side][key] = (checksum, TaskStatus.CANCELLED, attempts)
    handed[key] = other


def _give_back(sides: Sides, handed: Handed, side: Side) -> None:
    """`side` stops consuming: each key handed over to it and pending there (no worker claims
    in the matrix) goes to the other side, pending with the same attempts, cancelled on `side`."""
    other = _other(side)
    for key, owner in list(handed.items()):
        mine = sides[side].get(key)
        if owner != side or mine is None or mine[1] is not TaskStatus.PENDING:
            continue
        theirs = sides[other].get(key)
        sides[other][key] = (mine[0] if theirs is None else theirs[0], TaskStatus.PENDING, mine[2])
        sides[side][key] = (mine[0], TaskStatus.CANCELLED, mine[2])
        handed[key] = other


def _drain(side: Side) -> Callable[[Sides, Handed], None]:
    def effect(sides: Sides, handed: Handed) -> None:
        for key, (_, status, _) in list(sides[side].items()):
            if status is TaskStatus.RUNNING:
                _hand_over(sides, handed, side, key)
        _give_back(sides, handed, side)  # the default drains run where their side gives

    return effect


def _sync(source: Side, target: Side, *, handing: bool) -> Callable[[Sides, Handed], None]:
    def effect(sides: Sides, handed: Handed) -> None:
        if handing:
            _give_back(sides, handed, source)
        for key, (checksum, status, attempts) in list(sides[source].items()):
            theirs = sides[target].get(key)
            if status is TaskStatus.RUNNING:  # never copied as running
                if handing:
                    _hand_over(sides, handed, source, key)
                elif theirs is None:
                    sides[target][key] = (checksum, TaskStatus.PENDING, attempts)
            elif theirs is None:
                sides[target][key] = (checksum, status, attempts)
            elif (status, attempts) != theirs[1:] and not (
                status is TaskStatus.CANCELLED and theirs[1] not in FINISHED and handed.get(key) == target
            ):
                sides[target][key] = (theirs[0], status, attempts)

    return effect


def _retire_old(sides: Sides, handed: Handed) -> None:  # the ledger has no success: no key of its own
    for key, (checksum, status, attempts) in list(sides["old"].items()):
        theirs = sides["new"].get(key)
        if status not in (TaskStatus.PENDING, TaskStatus.RUNNING) or theirs is None:
            continue
        if theirs[1] in FINISHED:  # ran on new
            sides["old"][key] = (checksum, theirs[1], max(attempts, theirs[2]))
        else:  # new's, not finished there: handed over to new (issue 12)
            sides["old"][key] = (checksum, TaskStatus.CANCELLED, attempts)
            handed[key] = "new"


EFFECTS: Final[dict[str, Callable[[Sides, Handed], None]]] = {
    NOOP_STEP: lambda sides, handed: None,
    "pause_consumers": lambda sides, handed: None,  # no worker registered: it goes on at once
    "drain_old": _drain("old"),
    "drain_new": _drain("new"),
    # The giving side of each edge: transfer_state runs where old gives, reverse_sync on the
    # rollback to dual_write where new gives, and on cleanup -> cutover where nobody does.
    "transfer_state": _sync("old", "new", handing=True),
    "retire_old": _retire_old,
}


def after_steps(before: Sides, steps: tuple[str, ...], handed: Handed, edge: Edge) -> Sides:
    """Both sides once `steps` ran once each, from `before`."""
    sides: Sides = {side: dict(facts) for side, facts in before.items()}
    handed = dict(handed)
    for step in steps:
        if step == "reverse_sync":
            _sync("new", "old", handing=giving_side(edge.source, edge.dest) == "new")(sides, handed)
        else:
            EFFECTS[step](sides, handed)
    return sides


def status_differs(sides: Sides) -> int:
    """How many keys both sides hold with the same identity and another status or attempts."""
    old, new = sides["old"], sides["new"]
    return sum(1 for key in old.keys() & new.keys() if old[key][0] == new[key][0] and old[key] != new[key])


def differences(expected: Sides, found: Sides) -> dict[str, list[str]]:
    """Per side, the first few keys whose task is not as expected (missing, extra or changed)."""
    wrong: dict[str, list[str]] = {}
    for side in SIDES:
        want, got = expected[side], found[side]
        keys = [key for key in sorted(want.keys() | got.keys()) if want.get(key) != got.get(key)]
        if keys:
            wrong[side] = [f"{len(keys)} tasks differ"] + [
                f"{key}: expected {_show(want.get(key))}, found {_show(got.get(key))}" for key in keys[:5]
            ]
    return wrong


def _show(fact: Fact | None) -> str:
    return "nothing" if fact is None else f"{fact[1]} attempts={fact[2]} identity={fact[0][:8]}"


# -- the matrix -----------------------------------------------------------------------------


def command(edge: Edge) -> list[str]:
    """The CLI command that takes `edge`."""
    if edge.trigger is Trigger.RAMP:
        return ["ramp", str(RAMP_TO)]
    if edge.trigger is Trigger.ROLLBACK:
        return ["rollback", "--reason", "crash matrix"]
    return ["advance"]


@pytest.fixture(scope="module")
def forks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    """The fork server of the matrix's CLI runs, shared by the whole module."""
    server = ForkServer(tmp_path_factory.mktemp("forks"))
    yield server
    server.close()


def in_new_process(
    forks: ForkServer, point: CrashPoint | None, argv: list[str], log: Path, *, ordinary: bool
) -> tuple[int, CliResult]:
    """The pid and result of one CLI run in a new process (armed to die at `point`): a new
    interpreter when `ordinary`, else a fresh fork of the warm server."""
    if not ordinary:
        return forks.run(point, argv, log)
    module = (
        ["migration_fsm"] if point is None else ["tests.support.crashkit", "--crash-at", str(point), "--"]
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", *module, *argv],
        cwd=ROOT,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"`{' '.join(argv)}` did not end within {WAIT:.0f} s")
    return proc.pid, CliResult(proc.returncode, out, err)


def kill_at(world: World, case: Case, forks: ForkServer, folder: Path) -> int:
    """Run the edge's command in a new process that SIGKILLs itself at the case's point;
    return the dead process's pid."""
    argv = world.cli_args(command(case.edge), DOOMED)
    pid, result = in_new_process(forks, case.point, argv, folder / "doomed", ordinary=ordinary(case))
    if result.code == NOT_REACHED:
        pytest.fail(f"the run never reached {case.point}: {result.stderr}")
    assert -signal.SIGKILL == result.code, result.stderr
    return pid


def resume(world: World, case: Case, forks: ForkServer, folder: Path) -> CliResult:
    """`resume --steal` in a new process."""
    argv = world.cli_args(["resume", "--steal"], RESCUER)
    return in_new_process(forks, None, argv, folder / "rescuer", ordinary=ordinary(case))[1]


def ordinary(case: Case) -> bool:
    """Whether the case's runs start new interpreters (`python -m ...`): the first point of
    each edge does; the others fork the warm server, a second less per run."""
    return case.point.kind == "after_claim"


def steps_when_killed(case: Case) -> list[str]:
    """The status of each step of the interrupted transition, as the crash point leaves it."""
    point, names = case.point, list(case.steps)
    if point.kind == "after_claim":
        return ["pending"] * len(names)
    if point.kind == "before_commit":
        return ["done"] * len(names)
    assert point.step is not None
    at = names.index(point.step)
    here = "started" if point.kind == "in_step" else "done"
    return ["done"] * at + [here] + ["pending"] * (len(names) - at - 1)


def assert_interrupted(world: World, case: Case, before: MigrationState) -> None:
    """The killed transition left the source phase, an intent row whose steps stopped at the
    crash point, and a journal that verifies."""
    state, journal = world.state()
    seq = before.last_seq + 1
    row = journal[-1]
    # A published pause bumps the version (journaled on the row), so workers see it.
    paused = "pause_consumers" in case.steps and steps_when_killed(case)[0] != "pending"
    assert [{"command": "pause", "side": giving_side(case.edge.source, case.edge.dest)}] * paused == [
        {"command": t["command"], "side": t.get("side")} for t in row.takeovers
    ]
    assert (case.edge.source, seq, before.version + paused) == (
        state.phase,
        state.in_progress_seq,
        state.version,
    )
    assert (seq, "intent", DOOMED) == (row.seq, row.status, row.actor)
    assert steps_when_killed(case) == [step.status for step in row.steps]
    if case.point.kind == "in_step":  # it dies after a checkpoint: resume continues from there
        [inside] = [step for step in row.steps if step.status == "started"]
        assert inside.checkpoint is not None
        assert not inside.checkpoint.get("done")
    assert case.edge.source == world.verify().phase


def assert_committed_once(
    world: World, case: Case, before: MigrationState, journal: list[JournalEntry], killed: int
) -> None:
    """The destination phase; one new journal row, committed as the killed run's, taken over
    once by another process; every older row as it was; the journal verifies; each step done,
    run twice only if the process died inside it."""
    edge = case.edge
    seq = before.last_seq + 1
    state, after = world.state()
    percent = percent_after(edge, requested=RAMP_TO if edge.trigger is Trigger.RAMP else None)
    row = after[-1]
    # The pause (published once: a resumed pause_consumers finds it in force) bumped the
    # version once; the commit clears it in its own bump.
    pauses = [t for t in row.takeovers if t["command"] == "pause"]
    assert len(pauses) == ("pause_consumers" in case.steps)
    assert not state.paused_side
    assert (edge.dest, percent, before.version + 1 + len(pauses), seq, None) == (
        state.phase,
        state.percent,
        state.version,
        state.last_seq,
        state.in_progress_seq,
    )
    verified = world.verify()
    assert (edge.dest, seq) == (verified.phase, verified.rows)
    assert [(e.seq, e.status, e.hash) for e in journal] == [(e.seq, e.status, e.hash) for e in after[:-1]]
    assert (seq, "committed", edge.trigger, edge.source, edge.dest, DOOMED, killed) == (
        row.seq,
        row.status,
        row.trigger,
        row.source,
        row.dest,
        row.actor,
        row.pid,
    )
    [takeover] = [t for t in row.takeovers if t["command"] != "pause"]
    assert ("resume", RESCUER, f"{DOOMED} [{socket.gethostname()}:{killed}]", True) == (
        takeover["command"],
        takeover["actor"],
        takeover["previous_holder"],
        takeover["stolen"],
    )
    assert killed != takeover["pid"]
    died_inside = case.point.step if case.point.kind == "in_step" else None
    assert [(name, "done", 2 if name == died_inside else 1) for name in case.steps] == [
        (s.name, s.status, s.attempts) for s in row.steps
    ]


def assert_tasks_as_after_one_run(world: World, case: Case, before: Sides, handed: Handed) -> None:
    """Both sides hold what one uninterrupted run of the steps gives from `before`: every
    task once, with the status and attempts the steps set; after a state transfer or a
    reverse sync, `validate` finds the sides equal but for the tasks handed over (cancelled
    on the giving side, pending with one more attempt on the receiving side)."""
    expected = after_steps(before, case.steps, handed, case.edge)
    assert {} == differences(expected, world.sides())
    for task_url, table in world.tables.values():
        rows, keys = row_counts(task_url, table)
        assert rows == keys
    if {"transfer_state", "reverse_sync"} & set(case.steps):
        report = world.validate()
        assert (0, 0, status_differs(expected), 0) == (
            report.missing,
            report.mismatched,
            report.status_differs,
            report.extra,
        )


@pytest.mark.parametrize("case", MATRIX, ids=[case.id for case in MATRIX])
def test_sigkill_then_resume_from_a_new_process(
    case: Case, world: World, tmp_path: Path, forks: ForkServer
) -> None:
    """A transition SIGKILLed here is finished once by `resume --steal`, losing and doubling nothing."""
    world.reach(case.edge)
    before, journal = world.state()
    assert (case.edge.source, None) == (before.phase, before.in_progress_seq)
    sides, handed = world.sides(), world.handed()

    killed = kill_at(world, case, forks, tmp_path)
    TRIED[world.backend] += 1
    assert_interrupted(world, case, before)

    resumed = resume(world, case, forks, tmp_path)
    assert 0 == resumed.code, resumed.stderr
    assert_committed_once(world, case, before, journal, killed)
    assert_tasks_as_after_one_run(world, case, sides, handed)


def test_the_matrix_covers_every_edge_and_every_step() -> None:
    """Every edge and every step configured on it (the default steps included) has its crash points."""
    for edge in EDGES:
        points = {str(case.point) for case in MATRIX if case.edge == edge}
        steps = edge_step_names(edge)
        assert steps
        expected = {"after_claim", "before_commit"}
        for step in steps:
            expected.add(f"in_step={step}#{IN_STEP_WRITES[step]}")
        expected |= {f"after_step={step}" for step in steps[:-1]}
        assert expected == points
    assert ("pause_consumers", "drain_old", "transfer_state") == edge_step_names(
        EDGES_BY_KEY["dual_write->cutover"]
    )
    assert ("retire_old",) == edge_step_names(EDGES_BY_KEY["cutover->cleanup"])
    assert ("retire_old",) == edge_step_names(EDGES_BY_KEY["cleanup->complete"])
    assert ("pause_consumers", "drain_new", "reverse_sync") == edge_step_names(
        EDGES_BY_KEY["cutover->dual_write"]
    )
    assert ("reverse_sync",) == edge_step_names(EDGES_BY_KEY["cleanup->cutover"])
    print(f"\ncrash matrix: {len(MATRIX)} crash points per backend")
