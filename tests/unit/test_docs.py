"""The documents say what the code does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from migration_fsm.fsm import mermaid
from tests.support.cli import ROOT


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
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATION_FSM_")}
    for args in (["db", "upgrade"], ["init"]):
        subprocess.run(
            [sys.executable, "-m", "migration_fsm", *args],
            cwd=tmp_path,
            env=env,
            check=True,
            capture_output=True,
        )
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
