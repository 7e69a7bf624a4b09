"""Alembic glue: where the revisions are, a `Config` for them, and their head."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any


def migrations_dir() -> Path:
    """The Alembic revisions: inside the installed package, or `migrations/` of a checkout."""
    packaged = Path(str(resources.files("migration_fsm"))) / "_migrations"
    if (packaged / "env.py").is_file():
        return packaged
    # migration_fsm/journal/revisions.py -> the checkout's root is three levels up.
    return Path(__file__).resolve().parents[2] / "migrations"


def alembic_config() -> Any:
    """An Alembic `Config` pointing at our revisions (no ini file needed)."""
    from alembic.config import Config  # imported lazily: the backend client never needs it

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    return cfg


def head_revisions() -> set[str]:
    """The Alembic head revision(s) this code expects."""
    from alembic.script import ScriptDirectory

    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def known_revisions() -> set[str]:
    """Every revision this code knows (a database at another one was written by a newer version)."""
    from alembic.script import ScriptDirectory

    return {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
