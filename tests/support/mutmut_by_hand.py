"""Run mutmut's mutants by hand, when `mutmut run`'s stats run dies (docs/MUTATION.md).

Run from a `mutants/` folder mutmut made (`.mutants-pg/mutants/` for `make mutate-pg`), with
this repository's virtualenv: each name of NAMES_FILE (one mutant a line, as `mutmut results`
names them) is run in this one process, one `pytest.main` after the other, with
`MUTANT_UNDER_TEST` set to it (mutmut 3's trampolines read it at every call), `-x` and the
PostgreSQL selection's `-m "not slow" -k postgresql` over TEST_FILES. One JSON line per
mutant is appended to OUT_FILE (`rc` 0: survived, 1: killed, 5: no tests; the first failed
test; whether it failed by pytest-timeout's `--timeout=90`); names already there are skipped,
so a stopped run goes on where it was.

    cd .mutants-pg/mutants
    nice -n 19 ../../.venv/bin/python ../../tests/support/mutmut_by_hand.py NAMES_FILE OUT_FILE TEST_FILES...

A name that is no mutant (`none`) runs the unmutated code: run it first, it must pass.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest


class _Failures:
    """The failed tests of one `pytest.main`, and whether one failed by timeout."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.timeout = False

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.failed:
            self.failed.append(report.nodeid)
            self.timeout = self.timeout or "Timeout" in str(report.longrepr)[:20000]


def main(names_file: Path, out_file: Path, test_files: list[str]) -> None:
    done = set()
    if out_file.exists():
        done = {json.loads(line)["mutant"] for line in out_file.read_text("utf-8").splitlines() if line}
    for name in names_file.read_text("utf-8").split():
        if name in done:
            continue
        os.environ["MUTANT_UNDER_TEST"] = name
        failures, began = _Failures(), time.monotonic()
        args = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--timeout=90"]
        rc = pytest.main([*args, "-m", "not slow", "-k", "postgresql", *test_files], plugins=[failures])
        result = {
            "mutant": name,
            "rc": int(rc),
            "failed": failures.failed[:1],
            "timeout": failures.timeout,
            "s": round(time.monotonic() - began, 1),
        }
        with out_file.open("a", encoding="utf-8") as out:
            out.write(json.dumps(result) + "\n")
        print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
