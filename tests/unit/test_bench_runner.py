"""`make bench`'s runner (`bench/run_all.py`) runs a benchmark and tabulates its JSON.

Only the quickest benchmark runs here (the others are minutes long); the table's figures
are not checked against any time, only that they are read from the benchmark's JSON."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT


def test_runner_tabulates_the_routing_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--only", "routing", "--json", str(out)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    routing = results["routing"]
    assert routing["benchmark"] == "routing"
    median = routing["results"]["routing_key"]["median_ns"]
    assert "routing(key) from the cache" in done.stdout
    shown = f"{median:,.0f} ns" if median >= 1000 else f"{median:.3g} ns"
    assert shown in done.stdout  # the figure in the table is the JSON's
    assert set(results) >= {"cpus", "load_average_at_start", "routing"}
    assert "transition" not in results  # --only ran that one alone


@pytest.mark.postgres
@pytest.mark.slow
def test_adapters_benchmark_smoke_runs_and_tabulates(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench/adapters.py --quick` runs every move and old system against private PostgreSQL and
    Redis resources, and the runner's rows read its JSON (no time is checked)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "adapters.py"), "--quick"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert {
        "sql -> procrastinate",
        "huey -> procrastinate",
        "rq -> procrastinate",
        "celery -> procrastinate",
    } == set(result["dual_write"]["moves"])
    assert {"sql", "procrastinate", "huey", "rq", "celery"} == set(result["dual_write"]["systems"])
    assert {"sql", "huey", "rq", "celery"} == set(result["backfill"])
    assert 200 == result["backfill"]["huey"]["backfill"]["tasks"]
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "bench" / "run_all.py")
    assert spec is not None
    assert spec.loader is not None
    run_all = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "run_all", run_all)  # its dataclasses look their module up
    spec.loader.exec_module(run_all)
    rows = run_all.adapters_rows(result)
    assert 4 + 5 + 4 == len(rows)  # a row per move, per system alone, per old system's backfill


@pytest.mark.postgres
@pytest.mark.slow
def test_notify_benchmark_smoke_runs_and_tabulates(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench/notify.py --quick` delivers a backlog to its own receiver and command on SQLite and
    a private PostgreSQL database, times ramps with and without a target, and the runner's rows
    read its JSON (no time is checked)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "notify.py"), "--quick"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    for db in ("sqlite", "postgresql"):
        delivery = result[db]["delivery"]
        assert {"json", "slack", "command", "json_cursor_per_event"} == set(delivery)
        assert 20 == delivery["json"]["ours"]["events"]
        assert 3 == result[db]["transition"]["ramp_notify_on"]["n"]
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "bench" / "run_all.py")
    assert spec is not None
    assert spec.loader is not None
    run_all = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "run_all", run_all)  # its dataclasses look their module up
    spec.loader.exec_module(run_all)
    rows = run_all.notify_rows(result)
    assert 2 * (3 + 1 + 2) == len(rows)  # per database: a row per target, the per-event cursor, two ramps
