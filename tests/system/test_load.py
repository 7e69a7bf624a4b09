"""The load run (`bench/load.py`), scaled down: a whole migration on PostgreSQL under traffic
loses nothing and runs nothing twice, and reports every figure it promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import PG_ADMIN_URL, ROOT

PHASE_NAMES = ["preparation", "dual_write", "cutover", "cleanup", "complete"]


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.xdist_group("many_pg_connections")  # never beside test_exactly_once (connections)
def test_load_run_loses_nothing_and_runs_nothing_twice(pg_database: str) -> None:
    """A few seconds of the load run on the shared PostgreSQL report lost 0 and duplicated 0."""
    # `pg_database` only proves the server is reachable (or skips); the run makes its own four.
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "load.py"),
            *("--postgres", PG_ADMIN_URL),
            *("--seconds", "8", "--rate", "50", "--clients", "4", "--producers", "2", "--workers", "3"),
            # A `validate` re-reads each status difference: on a busy machine it may not outrun
            # even this traffic; then the run stops the traffic after this long and says so.
            *("--stall-seconds", "60"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert 0 == proc.returncode, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert {
        "scheduled",
        "executed",
        "lost",
        "duplicated",
        "executed_twice",
        "refused_executions",
        "achieved_rate",
        "write_latency_ms",
        "fallback_reads",
        "repair_entries",
        "phases",
        "baseline",
        "clients",
        "traffic_stopped_early",
    } <= set(report)
    assert (0, 0) == (report["lost"], report["duplicated"])
    assert report["scheduled"] == report["executed"] == report["executions"] > 0
    # The gated workers claimed every execution in the execution ledger; no key succeeded twice.
    assert 0 == report["executed_twice"] == report["ledger"]["executed_twice"]
    assert report["executed"] == report["ledger"]["succeeded"]
    assert report["refused_executions"] >= 0  # measured: a refusal is the ledger doing its job
    assert [] == report["workers"]["errors"]
    assert report["executions_by_side"].get("new", 0) == report["workers"]["new"]["executed"]
    assert report["pauses"], "consumption moved only after an acknowledged pause"
    assert all(pause["acknowledged"] == 1 and pause["gone"] == [] for pause in report["pauses"])
    assert 0 == report["executions_of_unscheduled_keys"]
    assert "old" in report["executions_by_side"]
    if report["traffic_stopped_early"] is None:  # else old may have run every task before cutover
        assert {"old", "new"} == set(report["executions_by_side"])  # both systems did real work
    assert (True, True, True, 2) == (
        report["crash_resumed"],
        report["validations_ok"],
        report["journal_verified"],
        report["rollbacks"],
    )
    assert PHASE_NAMES == list(report["phases"])
    assert PHASE_NAMES == list(report["write_latency_ms"])
    for phase in PHASE_NAMES[:-1]:  # traffic stops before `complete`
        figures = report["write_latency_ms"][phase]
        assert figures["n"] > 0, phase
        assert figures["p50"] <= figures["p99"], phase
    assert 0 == report["clients"]["disagreements_at_same_version"]
    assert 4 == report["clients"]["count"]
    assert report["clients"]["routing_calls"] > 0
    for when in ("before", "after"):
        baseline = report["baseline"][when]
        assert {"insert_commit_ms", "copy_rows_per_s"} == set(baseline)
        assert baseline["insert_commit_ms"]["n"] > 0
