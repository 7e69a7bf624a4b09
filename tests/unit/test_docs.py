"""The documents say what the code does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from migration_fsm.config import load_settings
from migration_fsm.fsm import mermaid
from tests.support.cli import ROOT


def _fresh_migration(folder: Path) -> dict[str, str]:
    """`db upgrade` and `init` in `folder`, as a reader of the docs runs them first; returns
    the environment they ran in (ours without `MIGRATION_FSM_*`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATION_FSM_")}
    for args in (["db", "upgrade"], ["init"]):
        subprocess.run(
            [sys.executable, "-m", "migration_fsm", *args],
            cwd=folder,
            env=env,
            check=True,
            capture_output=True,
        )
    return env


def test_architecture_diagram_is_the_generated_one() -> None:
    """docs/ARCHITECTURE.md's Mermaid block equals `migration-fsm diagram` output."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```mermaid\n(.*?)```", text, flags=re.DOTALL)
    assert [mermaid()] == blocks


def test_readme_starts_with_demo_and_test() -> None:
    """The README's first two commands are `make demo` and `make test`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"^(make \w+)", text, flags=re.MULTILINE)
    assert ["make demo", "make test"] == commands[:2]


def test_example_config_loads() -> None:
    """config/migration-fsm.toml is a valid configuration."""
    from migration_fsm.config import load_settings

    settings = load_settings(ROOT / "config" / "migration-fsm.toml")
    assert 30 == settings.lease_seconds


def test_readme_backend_examples_run(tmp_path: Path) -> None:
    """The sync and asyncio examples of "Using it from your backend" run as written."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Using it from your backend", 1)[1].split("\n## ", 1)[0]
    blocks = [
        b for b in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL) if "prometheus" not in b
    ]
    assert 2 == len(blocks)
    env = _fresh_migration(tmp_path)
    outputs = [
        subprocess.run(
            [sys.executable, "-c", block],
            cwd=tmp_path,
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        for block in blocks
    ]
    assert "preparation old True" == outputs[0].strip()
    assert "{'old'} True" == outputs[1].strip()


def test_relative_links_in_the_docs_resolve() -> None:
    """Every relative link in README.md, CHANGELOG.md and docs/ names a file that exists."""
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in pages
        for target in link.findall(page.read_text(encoding="utf-8"))
        if "://" not in target and not (page.parent / target).exists()
    ]
    assert not broken
    assert (ROOT / "docs" / "PERFORMANCE.md").exists()


def _readme_python_blocks(heading: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def _run_python(code: str, cwd: Path) -> str:
    """Run `code` in a fresh interpreter in `cwd`, structlog's events sent to stderr; its stdout."""
    prelude = (
        "import sys, structlog\n"
        "structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATION_FSM_")}
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def test_readme_from_python_example_runs_and_prints_what_it_says(tmp_path: Path) -> None:
    """The `migration_fsm.commands` example of "From Python" runs on a fresh database and
    prints the lines the README says it prints."""
    [block] = _readme_python_blocks("From Python")
    assert [
        "planned preparation->dual_write",
        "committed dual_write 2",
        "old",
        "2 'ramp' is not allowed from phase 'dual_write' (allowed: advance, rollback)",
        "3 preparation",
    ] == _run_python(block, tmp_path).splitlines()


def test_readme_metrics_example_reads_the_writers_count_from_the_registry(tmp_path: Path) -> None:
    """The Prometheus example runs after the sync backend example and prints the count the
    default registry holds for the writer it makes."""
    sync, _, metrics = _readme_python_blocks("Using it from your backend")
    assert "prometheus_client" in metrics
    setup = "from migration_fsm.cli import main\nassert 0 == main(['db', 'upgrade']) == main(['init'])"
    _run_python(setup, tmp_path)
    out = _run_python(sync + metrics, tmp_path).splitlines()
    assert ["preparation old True", "1.0"] == out


def test_workers_page_example_runs(tmp_path: Path) -> None:
    """docs/WORKERS.md's worker runs as written on a fresh database and prints what it says."""
    text = (ROOT / "docs" / "WORKERS.md").read_text(encoding="utf-8")
    [block] = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    _fresh_migration(tmp_path)
    assert "['job-1', 'job-2'] 2" in text
    assert "['job-1', 'job-2'] 2" == _run_python(block, tmp_path).strip()


USER_DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "config" / "migration-fsm.toml",
]


def test_user_docs_never_send_a_reader_outside_the_repository() -> None:
    """No user doc names the design document (it is not in the repository), and every file a
    user doc points to exists."""
    for doc in USER_DOCS:
        text = doc.read_text(encoding="utf-8")
        assert "DESIGN.md" not in text, doc
        for target in re.findall(
            r"\b((?:docs|config|bench|tests|migration_fsm)/[\w./-]+\.(?:md|toml|py))", text
        ):
            assert (ROOT / target).exists(), (doc, target)


def test_the_reference_names_every_setting_guard_and_step() -> None:
    from migration_fsm.config import Settings
    from migration_fsm.plugins.defaults import GUARD_NAMES, STEP_NAMES
    from migration_fsm.plugins.registry import BUILTIN_GUARDS

    reference = (ROOT / "docs" / "REFERENCE.md").read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"`{name}`" in reference, name
        assert f"`MIGRATION_FSM_{name.upper()}`" in reference, name
    for name in {*GUARD_NAMES, *BUILTIN_GUARDS, *STEP_NAMES} - {"lift_pause"}:
        assert f"`{name}`" in reference, name


def test_the_whole_huey_move_is_the_glue_it_counts(tmp_path: Path) -> None:
    """docs/ADAPTERS.md's whole Huey -> Procrastinate move: its config loads, its Python is
    Python, and it is the number of lines it says (issue 13: under 50)."""
    text = (ROOT / "docs" / "ADAPTERS.md").read_text(encoding="utf-8")
    section = text.split("## A whole move, Huey -> Procrastinate", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(toml|python)\n(.*?)```", section, flags=re.DOTALL)
    counted = sum(1 for _, block in blocks for line in block.splitlines() if line.strip())
    claimed = int(re.findall(r"(\d+) lines", section)[0])
    assert counted == claimed < 50
    [config] = [block for kind, block in blocks if kind == "toml"]
    (tmp_path / "migration-fsm.toml").write_text(config, encoding="utf-8")
    settings = load_settings(tmp_path / "migration-fsm.toml")
    assert ("migration_fsm.adapters.huey:store", "migration_fsm.adapters.procrastinate:store") == (
        settings.stores["old"].kind,
        settings.stores["new"].kind,
    )
    for kind, block in blocks:
        if kind == "python":
            compile(block, "ADAPTERS.md", "exec")
