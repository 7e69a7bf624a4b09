"""The documents say what the code does."""

from __future__ import annotations

import re

from migration_fsm.fsm import mermaid
from tests.conftest import ROOT


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
