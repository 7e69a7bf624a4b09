"""`Settings`: where each value comes from, and one clear line for each kind of bad config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from migration_fsm.config import DEFAULT_DATABASE_URL, StepSpec, load_settings
from migration_fsm.exceptions import BadInput, ConfigError
from tests.support.cli import CliResult


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the MIGRATION_FSM_* variables of the shell running the tests."""
    import os

    for name in list(os.environ):
        if name.startswith("MIGRATION_FSM_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "migration-fsm.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file() -> None:
    settings = load_settings(None)
    assert (DEFAULT_DATABASE_URL, 30.0, 10.0, "requeue") == (
        settings.database_url,
        settings.lease_seconds,
        settings.heartbeat_interval,
        settings.drain_policy,
    )
    assert "@" in settings.actor


def test_arguments_beat_the_environment_which_beats_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, 'actor = "from-file"\nlease_seconds = 12\nmin_soak_seconds = 7\n')
    monkeypatch.setenv("MIGRATION_FSM_ACTOR", "from-env")
    monkeypatch.setenv("MIGRATION_FSM_LEASE_SECONDS", "20")
    settings = load_settings(path, actor="from-argument", lease_seconds=None)
    assert ("from-argument", 20.0, 7.0) == (settings.actor, settings.lease_seconds, settings.min_soak_seconds)


def test_steps_accept_a_name_or_a_step_with_its_undo(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[steps]\n"preparation->dual_write" = ["a.b:c", { do = "a.b:d", undo = "a.b:e" }]\n',
    )
    steps = load_settings(path).steps["preparation->dual_write"]
    assert ["a.b:c", StepSpec(do="a.b:d", undo="a.b:e")] == steps


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("colour = 1\n", "config key 'colour' in {path} is not a known setting: remove or rename it"),
        (
            "lease_seconds = 0\n",
            "config key 'lease_seconds' in {path} is invalid: Input should be greater than 0",
        ),
        (
            '[guards]\n"preparation->cutover" = []\n',
            "config key 'guards' in {path} is invalid: 'preparation->cutover' is not an edge",
        ),
        (
            'drain_policy = "retry"\n',
            "config key 'drain_policy' in {path} is invalid: Input should be 'requeue'",
        ),
        (
            '[stores.old]\nkind = "sql"\nurl = "sqlite://"\n',
            "config key 'stores.old' in {path} is invalid: a 'sql' store needs 'url' and 'table'",
        ),
        (
            '[stores.old]\nkind = "memory"\nstatus_map = { done = "finished" }\n',
            "status_map: 'done' maps to 'finished', not one of pending",
        ),
        (
            '[stores.old]\nkind = "memory"\ncolumns = { body = "x" }\n',
            "columns: 'body' is not a task field",
        ),
        (
            '[stores.old]\nkind = "memory"\ncolumns = { created_at = "ts", type = "ts" }\n',
            "columns: column 'ts' is mapped to created_at and type; only created_at and updated_at may share",
        ),
        (
            '[stores.old]\nkind = "memory"\ntype_map = { "app.send" = "" }\n',
            "type_map: 'app.send' = '': both names must be non-empty",
        ),
        (
            '[stores.old]\nkind = "memory"\ncolumns = { type = "name" }\nconstants = { name = "x" }\n',
            "constants: column 'name' is mapped to a task field",
        ),
        (
            '[stores.old]\nkind = "memory"\nconstants = { queue = [1] }\n',
            "config key 'stores.old.constants.queue.str' in {path} is invalid",
        ),
        ('[stores.old]\nkind = "redis"\n', "kind 'redis' is not 'sql', 'memory' or 'package.module:factory'"),
        ('[stores.old]\nkind = "memory"\nurl = "x"\ncolour = 1\n', "unknown key 'colour' for kind 'memory'"),
        ("lease_seconds = [\n", "is not valid TOML"),
        (
            "worker_ttl_seconds = 0\n",
            "config key 'worker_ttl_seconds' in {path} is invalid: Input should be greater than 0",
        ),
        ("pause_timeout_seconds = -1\n", "config key 'pause_timeout_seconds' in {path} is invalid"),
        (
            "lease_seconds = 10\nheartbeat_seconds = 10\n",
            "config key 'heartbeat_seconds' in {path} is invalid: 10 must be at most half of lease_seconds",
        ),
        (
            "lease_seconds = 10\nheartbeat_seconds = 30\n",
            "config key 'heartbeat_seconds' in {path} is invalid: 30 must be at most half of lease_seconds",
        ),
        (
            'ledger_url = "mysql://x/y"\n',
            "config key 'ledger_url' in {path} is invalid: the ledger is a SQLite",
        ),
    ],
)
def test_a_bad_config_is_one_line_naming_the_key(tmp_path: Path, text: str, says: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert "\n" not in message
    assert says.format(path=path) in message
    assert isinstance(caught.value, BadInput)  # exit 2


def test_real_queue_mappings_are_read(tmp_path: Path) -> None:
    """run_at, one column for both timestamps, a type map and constants of each kind."""
    path = write(
        tmp_path,
        '[stores.old]\nkind = "sql"\nurl = "sqlite:///x.db"\ntable = "jobs"\n'
        'columns = { created_at = "ts", updated_at = "ts", run_at = "scheduled_at" }\n'
        '[stores.old.type_map]\n"app.tasks.send_mail" = "send_mail"\n'
        '[stores.old.constants]\nqueue_name = "default"\npriority = 0\nlocked = false\n',
    )
    store = load_settings(path).stores["old"]
    assert {"app.tasks.send_mail": "send_mail"} == store.type_map
    assert {"queue_name": "default", "priority": 0, "locked": False} == store.constants
    assert bool is type(store.constants["locked"])
    assert "ts" == store.columns["updated_at"] == store.columns["created_at"]


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope\.toml does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_a_bad_override_names_the_key_without_a_file() -> None:
    with pytest.raises(ConfigError, match=r"^config key 'max_failure_rate' is invalid: "):
        load_settings(None, max_failure_rate=2)


def test_the_ledger_defaults_to_the_migration_database() -> None:
    settings = load_settings(None, database_url="sqlite:///m.db")
    assert (settings.worker_ttl_seconds, settings.pause_timeout_seconds, settings.ledger_url) == (
        30,
        120,
        None,
    )
    assert settings.ledger_database_url == "sqlite:///m.db"
    other = load_settings(None, database_url="sqlite:///m.db", ledger_url="postgresql+psycopg://h/app")
    assert other.ledger_database_url == "postgresql+psycopg://h/app"


def test_the_settings_are_frozen() -> None:
    settings = load_settings(None)
    with pytest.raises(ValueError, match="frozen"):
        settings.lease_seconds = 1


def test_the_heartbeat_never_outlives_the_lease(tmp_path: Path) -> None:
    """Half the lease is accepted; settings made without validation are clamped to it."""
    settings = load_settings(write(tmp_path, "lease_seconds = 10\nheartbeat_seconds = 5\n"))
    assert 5.0 == settings.heartbeat_interval
    unchecked = settings.model_copy(update={"heartbeat_seconds": 60.0})
    assert 5.0 == unchecked.heartbeat_interval


@pytest.mark.parametrize("command", [("status",), ("advance",), ("backfill",), ("validate",)])
def test_the_cli_refuses_memory_stores_and_changes_nothing(
    upgraded_url: str, cli: Callable[..., CliResult], tmp_path: Path, command: tuple[str, ...]
) -> None:
    """Each CLI process would see its own empty memory store, so every data guard would pass
    having checked nothing: bad input (exit 2), one line, the database as it was."""
    path = write(
        tmp_path,
        '[stores.old]\nkind = "memory"\n[stores.new]\nkind = "sql"\nurl = "sqlite://"\ntable = "jobs"\n',
    )
    assert 0 == cli("init", "--db", upgraded_url).code
    before = cli("history", "--json", "--db", upgraded_url).stdout
    result = cli(*command, "--db", upgraded_url, "--config", str(path))
    assert 2 == result.code, result.stderr
    assert "stores.old" in result.error_line
    assert "memory" in result.error_line
    assert before == cli("history", "--json", "--db", upgraded_url).stdout


def test_relative_sqlite_paths_in_a_config_file_are_relative_to_its_folder(
    tmp_path: Path, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator who runs the CLI from another folder reaches the same journal (not a second,
    empty one `db upgrade` would create there); a missing file is named by its absolute path."""
    ops = tmp_path / "ops"
    (ops / "data").mkdir(parents=True)
    config = ops / "migration-fsm.toml"
    config.write_text(
        'database_url = "sqlite:///journal.db"\nledger_url = "sqlite:///data/ledger.db"\n'
        'backup_path = "backups/old.jsonl.gz"\n'
        '[stores.old]\nkind = "sql"\nurl = "sqlite:///old.db"\ntable = "runs"\n',
        encoding="utf-8",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(config)
    assert f"sqlite:///{ops / 'journal.db'}" == settings.database_url
    assert f"sqlite:///{ops / 'data' / 'ledger.db'}" == settings.ledger_url
    assert f"sqlite:///{ops / 'old.db'}" == settings.stores["old"].url
    assert str(ops / "backups" / "old.jsonl.gz") == settings.backup_path
    missing = cli("status", "--config", str(config))
    assert 4 == missing.code, missing.stderr
    assert str(ops / "journal.db") in missing.error_line
    assert 0 == cli("db", "upgrade", "--config", str(config)).code
    assert 0 == cli("init", "--config", str(config)).code
    assert (ops / "journal.db").exists()
    assert [] == list(elsewhere.iterdir())  # nothing created where the command ran
    # A URL given on the command line or in the environment is relative to where it runs.
    assert "sqlite:///x.db" == load_settings(config, database_url="sqlite:///x.db").database_url
