"""`make mutate-pg`: a copy of the tree for mutmut whose test selection is the PostgreSQL half.

mutmut 3 reads its configuration from `[tool.mutmut]` in the `pyproject.toml` of the folder it
runs in, and nothing else. This copies the repository's files (tracked and untracked, not
ignored: the working tree as it is) into TARGET, keeping TARGET's `mutants/` and mutmut's state,
and rewrites the copy's `[tool.mutmut]` test selection to
`[tool.migration-fsm.mutmut-postgresql]`'s. Only files that changed are copied again, with
their times kept (mutmut compares them to know a mutated file from a stale one).

    python tests/support/mutmut_postgresql.py TARGET
"""

from __future__ import annotations

import filecmp
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
KEY = "pytest_add_cli_args_test_selection"


def selection(pyproject: str) -> str:
    """`pyproject` with `[tool.mutmut]`'s test selection replaced by the PostgreSQL one."""
    wanted = tomllib.loads(pyproject)["tool"]["migration-fsm"]["mutmut-postgresql"][KEY]
    section = re.search(r"^\[tool\.mutmut\]\n(?:(?!^\[).*\n)*", pyproject, flags=re.MULTILINE)
    assert section is not None, "no [tool.mutmut] in pyproject.toml"
    old = re.compile(rf"^{KEY} = \[\n(?:.*\n)*?\]\n", flags=re.MULTILINE)
    body = section.group(0)
    assert old.search(body) is not None, f"no multi-line {KEY} in [tool.mutmut]"
    lines = "".join(f"    {json.dumps(arg)},\n" for arg in wanted)
    new_body = old.sub(lambda _: f"{KEY} = [\n{lines}]\n", body, count=1)
    rewritten = pyproject[: section.start()] + new_body + pyproject[section.end() :]
    assert tomllib.loads(rewritten)["tool"]["mutmut"][KEY] == wanted
    return rewritten


def main(target: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    target.mkdir(exist_ok=True)
    for name in filter(None, listed.decode().split("\0")):
        source, copy = ROOT / name, target / name
        if not source.is_file() or Path(name).parts[0] == target.name:
            continue  # deleted in the working tree, or the copy itself
        if copy.exists() and filecmp.cmp(source, copy, shallow=False):
            continue
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, copy)
    pyproject = target / "pyproject.toml"
    pyproject.write_text(selection((ROOT / "pyproject.toml").read_text("utf-8")), "utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
