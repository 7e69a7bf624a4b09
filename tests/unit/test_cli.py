"""The CLI as an operator runs it, on SQLite and PostgreSQL, held to the contract of
DESIGN.md sections 2-5 (JSON shapes, exit codes, one `error: ` line, nothing written on bad
input, config keys).

Most invocations run in this process through `migration_fsm.cli.main` (see `run_cli`), with
the environment, stdout and stderr a subprocess would get; the help and option-placement
test runs real `python -m migration_fsm` subprocesses. Invocations that cannot interfere are
written as run together (each on a migration of its own): in-process runs take turns.
Setup that is not under test goes through the library.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from migration_fsm.config import load_settings
from migration_fsm.fsm import Phase
from migration_fsm.journal import Journal
from migration_fsm.migration import Migration
from tests.support import PG_ADMIN_URL
from tests.support.cli import ROOT, CliResult, run_cli
from tests.support.steps import FAIL_ENV, GATE_ENV, MARKER_ENV

STATUS_KEYS = {"migration", "phase", "version", "percent", "routing", "interrupted", "allowed"}
#: Added by issue 12 (additive: the keys above keep their meaning): the paused side, the
#: workers per side and the execution ledger's counts.
STATUS_KEYS_WORKERS = {"paused", "workers", "ledger"}
#: Added by issue 14 (additive): each `[[notify]]` target's delivery state, the hold of `watch`.
STATUS_KEYS_NOTIFY = {"notify", "hold"}
ROUTING_KEYS = ("write_old", "write_new", "authoritative", "read_from", "read_fallback", "consume_from")
INTERRUPTED_KEYS = {"seq", "trigger", "source", "dest", "step"}
HISTORY_KEYS = {
    "seq",
    "trigger",
    "source",
    "dest",
    "status",
    "actor",
    "reason",
    "forced",
    "started_at",
    "finished_at",
    "guards",
    "steps",
    "error",
}
GUARD_KEYS = {"name", "passed", "detail"}
STEP_KEYS = {"name", "status", "attempts"}
JOURNAL_STATUSES = {"intent", "committed", "refused", "aborted"}

#: DESIGN.md section 2, the routing table (cutover's `read_from` depends on the percent).
ROUTING: dict[str, tuple[object, ...]] = {
    "preparation": (True, False, "old", "old", None, "old"),
    "dual_write": (True, True, "old", "old", None, "old"),
    "cutover": (True, True, "new", "?", "old", "new"),
    "cleanup": (False, True, "new", "new", "old", "new"),
    "complete": (False, True, "new", "new", None, "new"),
}
ALLOWED = {
    "preparation": ["advance"],
    "dual_write": ["advance", "rollback"],
    "cutover": ["advance", "ramp", "rollback"],
    "cleanup": ["advance", "rollback"],
    "complete": [],
}
#: DESIGN.md section 2, every edge as (trigger, source, dest).
EDGES = [
    ("advance", "preparation", "dual_write"),
    ("advance", "dual_write", "cutover"),
    ("advance", "cutover", "cleanup"),
    ("advance", "cleanup", "complete"),
    ("rollback", "dual_write", "preparation"),
    ("rollback", "cutover", "dual_write"),
    ("rollback", "cleanup", "cutover"),
    ("ramp", "cutover", "cutover"),
]
PASSWORD = "s3cretpw"  # noqa: S105 - a fake password the tests look for in any output
TABLES = ("alembic_version", "mfsm_migrations", "mfsm_journal", "mfsm_steps")
FLAKY = "tests.support.steps:flaky"
GATE = "tests.support.steps:gate"
_names = itertools.count(1)


# -- running the CLI ----------------------------------------------------------------------


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a CLI subprocess gets on top of our environment: `tests` importable, plus `extra`."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, **(extra or {})}


def mfsm(url: str, *args: str, env: Mapping[str, str] | None = None) -> CliResult:
    """Run the CLI on database `url`; `--db URL` goes after the command's options (before `--`)."""
    cut = args.index("--") if "--" in args else len(args)
    return run_cli(*args[:cut], "--db", url, *args[cut:], env=child_env(env))


def ok(url: str, *args: str, env: Mapping[str, str] | None = None) -> CliResult:
    """Run the CLI and insist that it exits 0."""
    result = mfsm(url, *args, env=env)
    assert 0 == result.code, f"{args} exited {result.code}:\n{result.stderr}"
    return result


def fails(
    url: str, code: int, *args: str, says: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> CliResult:
    """Run the CLI and insist on exit `code` and exactly one `error: ` line containing `says`."""
    result = mfsm(url, *args, env=env)
    assert code == result.code, f"{args} exited {result.code}:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    line = result.error_line
    for words in says:
        assert words in line, line
    return result


def together(*jobs: Callable[[], CliResult]) -> list[CliResult]:
    """Run invocations that cannot interfere, at the same time when they are subprocesses (in
    this process they take turns); results in the order given."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda job: job(), jobs))


@dataclass(frozen=True)
class Case:
    """A command that must fail: exit `code`, one `error: ` line containing every `says`."""

    args: tuple[str, ...]
    code: int
    says: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    db: str | None = None  # instead of the database the cases run on


def violations(url: str, cases: Sequence[Case]) -> list[str]:
    """Run `cases` concurrently on `url`; what each did against the contract (empty if nothing)."""
    results = together(*(partial(mfsm, case.db or url, *case.args, env=case.env) for case in cases))
    problems = []
    for case, result in zip(cases, results, strict=True):
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        what = f"{' '.join(case.args)} -> exit {result.code}: {result.stderr.strip()!r}"
        if case.code != result.code:
            problems.append(f"expected exit {case.code}: {what}")
        elif len(errors) != 1 or "Traceback" in result.stderr:
            problems.append(f"expected exactly one error line: {what}")
        elif missing := [words for words in case.says if words not in errors[0]]:
            problems.append(f"error line lacks {missing}: {what}")
        elif result.stdout:
            problems.append(f"expected nothing on stdout, got {result.stdout!r}: {what}")
        elif PASSWORD in result.stderr:
            problems.append(f"the password is printed: {what}")
    return problems


# -- reading what the CLI printed -----------------------------------------------------------


def status_doc(result: CliResult) -> dict[str, Any]:
    """The one JSON object `status --json` printed, checked against the contract's keys."""
    assert 0 == result.code, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    assert STATUS_KEYS | STATUS_KEYS_WORKERS | STATUS_KEYS_NOTIFY == set(doc)
    assert set(ROUTING_KEYS) == set(doc["routing"])
    assert doc["interrupted"] is None or INTERRUPTED_KEYS == set(doc["interrupted"])
    return doc


def history_rows(result: CliResult) -> list[dict[str, Any]]:
    """The one JSON list `history --json` printed, every row checked against the contract."""
    assert 0 == result.code, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    for row in rows:
        assert HISTORY_KEYS == set(row), row
        assert row["status"] in JOURNAL_STATUSES
        datetime.fromisoformat(row["started_at"])
        assert all(GUARD_KEYS == set(guard) for guard in row["guards"]), row
        assert all(STEP_KEYS == set(step) for step in row["steps"]), row
    return rows


def routing(phase: str, percent: int) -> dict[str, object]:
    """The routing DESIGN.md's table gives `phase` at `percent`."""
    row = list(ROUTING[phase])
    if phase == "cutover":
        row[3] = "old" if percent == 0 else "new" if percent == 100 else "split"
    return dict(zip(ROUTING_KEYS, row, strict=True))


# -- the database, directly -----------------------------------------------------------------


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every migration-fsm table that exists, read directly."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            present = set(inspect(conn).get_table_names())
            return {
                name: sorted((tuple(row) for row in conn.execute(text(f"SELECT * FROM {name}"))), key=repr)
                for name in TABLES
                if name in present
            }
    finally:
        engine.dispose()


def stored(url: str, name: str) -> tuple[str, int, int]:
    """(phase, percent, version) of migration `name`, read directly from its table."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT phase, percent, version FROM mfsm_migrations WHERE name = :n"), {"n": name}
            ).one()
    finally:
        engine.dispose()
    return (row[0], row[1], row[2])


def prepare(
    url: str, to: Phase, *, percent: int | None = None, reenter: bool = False, name: str | None = None
) -> str:
    """Create a migration in-process (setup, not under test) and advance it to `to`: at
    `percent` in cutover, or back from cleanup when `reenter`. Returns its name."""
    name = name or f"{to}-{next(_names)}"
    with Journal.open(url) as store:
        engine = Migration(store, load_settings(None, database_url=url, actor="setup"), name)
        engine.init()
        target = Phase.CLEANUP if reenter else to
        while (state := store.get(name)).phase is not target:
            if state.phase is Phase.CUTOVER and state.percent != 100:
                engine.ramp(100)
            engine.advance()
        if reenter:
            engine.rollback(reason="setup: back to cutover")
        if percent is not None:
            engine.ramp(percent)
    return name


def write_config(path: Path, body: str) -> str:
    """Write a TOML config file and return its path."""
    path.write_text(body, encoding="utf-8")
    return str(path)


# -- the JSON contract ----------------------------------------------------------------------


def test_status_json_follows_the_routing_table_in_every_phase(upgraded_url: str) -> None:
    """`status -m NAME --db URL --json` prints one object with the contract's keys and routing."""
    url = upgraded_url
    states = [
        ("preparation", 0, 1, prepare(url, Phase.PREPARATION)),
        ("dual_write", 0, 2, prepare(url, Phase.DUAL_WRITE)),
        ("cutover", 0, 3, prepare(url, Phase.CUTOVER)),
        ("cutover", 50, 4, prepare(url, Phase.CUTOVER, percent=50)),
        ("cutover", 100, 4, prepare(url, Phase.CUTOVER, percent=100)),
        ("cleanup", 100, 5, prepare(url, Phase.CLEANUP)),
        ("cutover", 100, 6, prepare(url, Phase.CUTOVER, reenter=True)),
    ]  # `complete` is checked at the end of the walk
    results = together(
        *(partial(run_cli, "status", "-m", name, "--db", url, "--json") for *_, name in states)
    )
    for (phase, percent, version, name), result in zip(states, results, strict=True):
        doc = status_doc(result)
        assert {
            "migration": name,
            "phase": phase,
            "version": version,
            "percent": percent,
            "routing": routing(phase, percent),
            "interrupted": None,
        } == {key: value for key, value in doc.items() if key in STATUS_KEYS - {"allowed"}}
        assert ALLOWED[phase] == sorted(doc["allowed"])
    assert ["old", "split", "new"] == [status_doc(r)["routing"]["read_from"] for r in results[2:5]]


def test_walk_every_phase_by_cli_then_verify_and_replay_history(upgraded_url: str, tmp_path: Path) -> None:
    """Every edge by CLI with MIGRATION_FSM_* env vars; `verify` exits 0 and `history --json` replays."""
    url = upgraded_url
    config = write_config(
        tmp_path / "walk.toml", 'actor = "carol"\n[guards]\n"cutover->cleanup" = ["min_soak"]\n'
    )
    env = child_env(
        {"MIGRATION_FSM_DATABASE_URL": url, "MIGRATION_FSM_CONFIG": config, "MIGRATION_FSM_ACTOR": "bob"}
    )

    def walk(*args: str) -> CliResult:
        result = run_cli(*args, "-m", "walk", env=env)
        assert 0 == result.code, f"{args} exited {result.code}:\n{result.stderr}"
        return result

    created = walk("init", "--actor", "alice")  # the option beats the env var, which beats the file
    assert "preparation" in created.stdout
    for command, dest in [
        (("advance",), "dual_write"),
        (("advance",), "cutover"),
        (("ramp", "50", "--reason", "half the keys"), "cutover"),
        (("ramp", "100"), "cutover"),
        (("advance",), "cleanup"),
        (("rollback", "--reason", "recheck cutover"), "cutover"),
        (("advance",), "cleanup"),
        (("advance",), "complete"),
    ]:
        result = walk(*command)
        assert f"-> {dest}" in result.stdout
        assert '"event": "transition"' in result.stderr  # logs go to stderr, as JSON lines
        assert "event" not in result.stdout

    verified, history, status = together(
        partial(walk, "verify"),
        partial(walk, "history", "--json"),
        partial(walk, "status", "--json"),
    )
    assert "verified" in verified.stdout
    assert {
        "migration": "walk",
        "phase": "complete",
        "version": 9,
        "percent": 100,
        "routing": routing("complete", 100),
        "interrupted": None,
        "allowed": [],
    } == {key: value for key, value in status_doc(status).items() if key in STATUS_KEYS}
    rows = history_rows(history)
    assert [
        ("init", None, "preparation"),
        ("advance", "preparation", "dual_write"),
        ("advance", "dual_write", "cutover"),
        ("ramp", "cutover", "cutover"),
        ("ramp", "cutover", "cutover"),
        ("advance", "cutover", "cleanup"),
        ("rollback", "cleanup", "cutover"),
        ("advance", "cutover", "cleanup"),
        ("advance", "cleanup", "complete"),
    ] == [(r["trigger"], r["source"], r["dest"]) for r in rows]
    assert list(range(1, 10)) == [r["seq"] for r in rows]
    assert {"committed"} == {r["status"] for r in rows}
    assert {False} == {r["forced"] for r in rows}
    assert ["alice"] + ["bob"] * 8 == [r["actor"] for r in rows]
    assert ["half the keys", "recheck cutover"] == [r["reason"] for r in rows if r["reason"]]
    assert all(r["finished_at"] and r["error"] is None and r["steps"] == [] for r in rows)
    for row in (rows[5], rows[7]):  # the always-on guard, then the configured one
        assert [("percent_is_100", True), ("min_soak", True)] == [
            (g["name"], g["passed"]) for g in row["guards"]
        ]
    replayed: str | None = None
    for row in rows:
        assert replayed == row["source"] or row["trigger"] == "init"
        replayed = row["dest"]
    assert "complete" == replayed


# -- bad input: exit 2, one error line, nothing written ------------------------------------


def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(upgraded_url: str, tmp_path: Path) -> None:
    """Each bad input that reaches the database exits 2 with one `error: ` line and writes nothing."""
    url = upgraded_url
    unknown_guard = write_config(
        tmp_path / "guard.toml", '[guards]\n"preparation->dual_write" = ["no_such_guard"]\n'
    )
    prep, cut, done = Phase.PREPARATION, Phase.CUTOVER, Phase.COMPLETE
    cases = [
        Case(("advance", "-m", "nope"), 2, ("no migration named 'nope'", "init -m nope")),
        Case(("init", "-m", prepare(url, prep)), 2, ("already exists",)),
        Case(("init", "-m", "x" * 201), 2, ("1 to 200 characters",)),  # PostgreSQL's column would fail
        Case(
            ("rollback", "-m", prepare(url, prep), "--reason", "r"),
            2,
            ("'rollback' is not allowed", "phase 'preparation'"),
        ),
        Case(("ramp", "-m", prepare(url, prep), "50"), 2, ("'ramp' is not allowed", "phase 'preparation'")),
        Case(("advance", "-m", prepare(url, done)), 2, ("'advance' is not allowed", "phase 'complete'")),
        Case(("ramp", "-m", prepare(url, cut, percent=50), "101"), 2, ("0 to 100", "101")),
        Case(("ramp", "-m", prepare(url, cut, percent=50), "--", "-1"), 2, ("0 to 100", "-1")),
        Case(("advance", "-m", prepare(url, prep), "--force"), 2, ("--force needs a reason", "--reason")),
        Case(
            ("advance", "-m", prepare(url, prep), "--config", unknown_guard),
            2,
            ('guards."preparation->dual_write"', "no_such_guard"),
        ),
    ]
    before = snapshot(url)
    assert [] == violations(url, cases)
    assert before == snapshot(url)


def test_bad_input_is_refused_before_the_database_is_opened(tmp_path: Path) -> None:
    """Malformed config, missing reasons and unparsable arguments exit 2 before opening the database."""
    # These never reach a backend, so one run covers both: the SQLite file is never created.
    missing = tmp_path / "never.db"
    configs = {
        name: write_config(tmp_path / f"{name}.toml", body)
        for name, body in {
            "unknown_key": "lease_seconds = 30\nbogus_key = 1\n",
            "bad_value": "lease_seconds = -1\n",
            "unknown_edge": '[guards]\n"cutover->complete" = ["min_soak"]\n',
            "not_toml": "lease_seconds = \n",
        }.items()
    }
    cases = [
        Case(("rollback",), 2, ("--reason",)),
        Case(("abort",), 2, ("--reason",)),
        Case(("init", "--actor", "a" * 201), 2, ("'actor'", "200 characters")),
        Case(("ramp", "abc"), 2, ("0 to 100", "abc")),
        Case(("rollback", "--reason", "r", "--to", "nowhere"), 2, ("unknown phase 'nowhere'", "cutover")),
        Case(("advance", "--config", configs["unknown_key"]), 2, ("'bogus_key'", "not a known setting")),
        Case(("advance", "--config", configs["bad_value"]), 2, ("'lease_seconds'", "greater than 0")),
        Case(("status",), 2, ("'lease_seconds'",), {"MIGRATION_FSM_LEASE_SECONDS": "abc"}),
        Case(("advance", "--config", configs["unknown_edge"]), 2, ("guards", "'cutover->complete'")),
        Case(("advance", "--config", configs["not_toml"]), 2, ("not valid TOML",)),
        Case(("advance", "--config", str(tmp_path / "absent.toml")), 2, ("does not exist",)),
    ]
    assert [] == violations(f"sqlite:///{missing}", cases)
    assert not missing.exists()


# -- guards: refusal, dry run, force --------------------------------------------------------


def test_guard_refusal_dry_run_and_force(upgraded_url: str, tmp_path: Path) -> None:
    """Refusal exits 1 and is journaled; --dry-run writes nothing; --force beats all but percent_is_100."""
    url = upgraded_url
    config = write_config(tmp_path / "gate.toml", f'[guards]\n"preparation->dual_write" = ["{GATE}"]\n')
    closed, opened = {GATE_ENV: "closed"}, {GATE_ENV: "open"}
    gated = prepare(url, Phase.PREPARATION, name="gated")
    other = prepare(url, Phase.PREPARATION, name="other")
    cut = prepare(url, Phase.CUTOVER, name="cut")

    before = snapshot(url)
    would_refuse, would_pass = together(
        partial(mfsm, url, "advance", "-m", gated, "--config", config, "--dry-run", env=closed),
        partial(mfsm, url, "advance", "-m", other, "--config", config, "--dry-run", env=opened),
    )
    assert (1, 0) == (would_refuse.code, would_pass.code), would_refuse.stderr + would_pass.stderr
    assert "would be refused" in would_refuse.stdout  # the plan says which guard and why
    assert "gate is closed" in would_refuse.stdout
    assert "would be taken" in would_pass.stdout
    assert before == snapshot(url)

    together(
        partial(
            fails, url, 1, "advance", "-m", gated, "--config", config, env=closed, says=(GATE, "--force")
        ),
        partial(
            fails,
            url,
            1,
            "advance",
            "-m",
            cut,
            "--config",
            config,
            "--force",
            "--reason",
            "try anyway",
            says=("percent_is_100", "cannot be forced", "ramp 100"),
        ),
    )
    assert [("preparation", 0, 1), ("cutover", 0, 3)] == [stored(url, gated), stored(url, cut)]

    forced = ok(url, "advance", "-m", gated, "--config", config, "--force", "--reason", "checked", env=closed)
    assert "forced" in forced.stdout
    assert ("dual_write", 0, 2) == stored(url, gated)

    gated_rows, cut_rows = map(
        history_rows,
        together(
            partial(ok, url, "history", "-m", gated, "--json"),
            partial(ok, url, "history", "-m", cut, "--json"),
        ),
    )
    assert [
        ("init", "committed", False, None),
        ("advance", "refused", False, None),
        ("advance", "committed", True, "checked"),
    ] == [(r["trigger"], r["status"], r["forced"], r["reason"]) for r in gated_rows]
    assert [{"name": GATE, "passed": False, "detail": "gate is closed"}] == gated_rows[1]["guards"]
    assert gated_rows[1]["guards"] == gated_rows[2]["guards"]
    assert ("advance", "cutover", "cleanup", "refused", False) == tuple(
        cut_rows[-1][k] for k in ("trigger", "source", "dest", "status", "forced")
    )
    assert [("percent_is_100", False)] == [(g["name"], g["passed"]) for g in cut_rows[-1]["guards"]]


# -- an interrupted transition: exit 3 until resume or abort --------------------------------


def test_interrupted_transition_needs_resume_or_abort(upgraded_url: str, tmp_path: Path) -> None:
    """A failing step exits 1 and interrupts; other writes exit 3; resume finishes; abort undoes."""
    url = upgraded_url
    marker = tmp_path / "marker.txt"
    config = write_config(
        tmp_path / "steps.toml",
        "[steps]\n"
        f'"preparation->dual_write" = ["{FLAKY}"]\n'
        '"dual_write->cutover" = [\n'
        '    { do = "tests.support.steps:record", undo = "tests.support.steps:unrecord" },\n'
        f'    "{FLAKY}",\n'
        "]\n",
    )
    m = ("-m", "default", "--config", config)
    failing = {FAIL_ENV: "1", MARKER_ENV: str(marker)}
    working = {MARKER_ENV: str(marker)}
    prepare(url, Phase.PREPARATION, name="default")

    fails(url, 1, "advance", *m, env=failing, says=(FLAKY, "injected failure", "resume", "abort"))
    before = snapshot(url)
    status, conflict = together(
        partial(mfsm, url, "status", *m, "--json"),
        partial(mfsm, url, "advance", *m, env=working),
    )
    doc = status_doc(status)
    assert ("preparation", 1, []) == (doc["phase"], doc["version"], doc["allowed"])
    assert {"seq": 2, "trigger": "advance", "source": "preparation", "dest": "dual_write", "step": FLAKY} == (
        doc["interrupted"]
    )
    assert 3 == conflict.code, conflict.stderr
    assert all(words in conflict.error_line for words in ("interrupted", "resume", "abort"))
    assert before == snapshot(url)

    assert "committed #2" in ok(url, "resume", *m, env=working).stdout
    assert ("dual_write", 0, 2) == stored(url, "default")

    fails(url, 1, "advance", *m, env=failing, says=(FLAKY, "injected failure"))
    aborter = {**working, "MIGRATION_FSM_ACTOR": "carol"}
    assert "aborted #3" in ok(url, "abort", *m, "--reason", "cannot fix it today", env=aborter).stdout
    assert ("dual_write", 0, 2) == stored(url, "default")
    assert ["do dual_write->cutover", "undo dual_write->cutover"] == marker.read_text().splitlines()

    verified, history = together(partial(ok, url, "verify", *m), partial(ok, url, "history", *m, "--json"))
    assert "verified" in verified.stdout
    rows = history_rows(history)
    assert ["committed", "committed", "aborted"] == [r["status"] for r in rows]
    assert [{"name": FLAKY, "status": "done", "attempts": 2}] == rows[1]["steps"]
    assert [
        {"name": "tests.support.steps:record", "status": "undone", "attempts": 1},
        {"name": FLAKY, "status": "failed", "attempts": 1},
    ] == rows[2]["steps"]
    assert "injected failure" in rows[2]["error"]
    # The aborted row says who aborted it and why (issue: the reason was only in the takeover).
    assert ("carol", "cannot fix it today") == (rows[2]["actor"], rows[2]["reason"])
    assert "cannot fix it today" in ok(url, "history", *m).stdout


# -- environment: exit 4 ---------------------------------------------------------------------


def test_missing_schema_exits_4_until_db_upgrade_which_is_idempotent(db_url: str) -> None:
    """Without a schema commands exit 4 and create nothing; `db upgrade` twice exits 0 both times."""
    url = db_url
    sqlite_file = Path(make_url(url).database or "") if url.startswith("sqlite") else None
    cases = [
        Case(("status", "--json"), 4, ("db upgrade",)),
        Case(("init", "-m", "other"), 4, ("db upgrade",)),
    ]
    assert [] == violations(url, cases)
    if sqlite_file is not None:
        assert not sqlite_file.exists()
    else:
        assert {} == snapshot(url)

    assert "upgraded" in ok(url, "db", "upgrade").stdout
    assert "already" in ok(url, "db", "upgrade").stdout
    assert ["alembic_version", "mfsm_journal", "mfsm_migrations", "mfsm_steps"] == sorted(snapshot(url))


def test_verify_detects_an_edited_and_a_deleted_journal_row(upgraded_url: str) -> None:
    """`verify` exits 4 and names the problem when a row's reason was edited or the last row deleted."""
    url = upgraded_url
    for name in ("edited", "truncated"):
        prepare(url, Phase.CUTOVER, name=name)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            ids = {row[0]: row[1] for row in conn.execute(text("SELECT name, id FROM mfsm_migrations"))}
            conn.execute(
                text("UPDATE mfsm_journal SET reason = 'edited' WHERE migration_id = :id AND seq = 2"),
                {"id": ids["edited"]},
            )
            conn.execute(
                text("DELETE FROM mfsm_journal WHERE migration_id = :id AND seq = 3"),
                {"id": ids["truncated"]},
            )
    finally:
        engine.dispose()
    cases = [
        Case(("verify", "-m", "edited"), 4, ("does not verify", "#2")),
        Case(("verify", "-m", "truncated"), 4, ("does not verify", "deleted")),
    ]
    assert [] == violations(url, cases)


def test_unreachable_database_exits_4_and_never_shows_the_password() -> None:
    """A closed port, a missing database and a malformed URL fail cleanly, the password masked."""
    closed_port = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/x"
    missing_db = make_url(PG_ADMIN_URL).set(password=PASSWORD, database="mfsm_no_such_database")
    bad_port = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:notaport/x"
    cases = [
        Case(("status", "--json"), 4, ("unavailable", "postgres:***@")),
        Case(("advance", "-m", "a"), 4, ("unavailable", "postgres:***@")),
        Case(("db", "upgrade"), 4, ("unavailable", "postgres:***@")),
        Case(("verify",), 4, ("mfsm_no_such_database",), db=missing_db.render_as_string(hide_password=False)),
        Case(("status",), 2, ("not a valid", "postgres:***@"), db=bad_port),
    ]
    assert [] == violations(closed_port, cases)


# -- help, diagram, where options go ---------------------------------------------------------


def test_help_diagram_and_option_placement() -> None:
    """--help works, `diagram` prints every edge as Mermaid, options before the command are refused."""
    process = partial(run_cli, subprocess=True)  # the module and its entry point, for real
    main_help, status_help, diagram, misplaced = together(
        partial(process, "--help"),
        partial(process, "status", "--help"),
        partial(process, "diagram"),
        partial(process, "-m", "x", "status"),
    )
    assert 0 == main_help.code, main_help.stderr
    for command in ("db", "init", "status", "advance", "rollback", "ramp", "resume", "abort", "history"):
        assert f"  {command} " in main_help.stdout, command
    assert 0 == status_help.code, status_help.stderr
    for option in ("--migration", "--db", "--config", "--actor", "--json", "--watch"):
        assert option in status_help.stdout, option

    assert 0 == diagram.code, diagram.stderr
    lines = [line.strip() for line in diagram.stdout.splitlines()]
    assert "stateDiagram-v2" == lines[0]
    for trigger, source, dest in EDGES:
        assert any(line.startswith(f"{source} --> {dest}") and trigger in line for line in lines), trigger

    assert 2 == misplaced.code
    assert "-m" in misplaced.error_line
