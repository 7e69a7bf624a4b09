"""`make bench`'s runner (`bench/run_all.py`) runs a benchmark and tabulates its JSON.

Only the quickest benchmark runs here (the others are minutes long); the table's figures
are not checked against any time, only that they are read from the benchmark's JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
