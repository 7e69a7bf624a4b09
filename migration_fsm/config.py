"""Settings: a TOML file, overridden by `MIGRATION_FSM_*` environment variables,
overridden by command-line options; validated by pydantic (unknown keys are errors)."""

from __future__ import annotations

import getpass
import os
import re
import socket
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from .exceptions import ConfigError
from .fsm import EDGES_BY_KEY, Trigger

DEFAULT_DATABASE_URL = "sqlite:///migration_fsm.db"

_config_file: ContextVar[Path | None] = ContextVar("migration_fsm_config_file", default=None)


def default_actor() -> str:
    """`user@host`, the actor recorded when none is given."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


class StepSpec(BaseModel):
    """A step and its compensation: `{ do = "pkg.mod:fn", undo = "pkg.mod:fn" }`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    do: str
    undo: str | None = None


TASK_FIELDS = (
    "key", "type", "payload", "status", "attempts", "created_at", "updated_at", "metadata", "run_at",
)  # fmt: skip
TASK_STATUSES = ("pending", "running", "completed", "failed", "cancelled")


class StoreConfig(BaseModel):
    """One side's task store: `[stores.old]` or `[stores.new]` (DESIGN.md section 6).

    `kind` is "sql", "memory" or "package.module:factory"; only a factory's table may hold
    keys of its own (they are passed to it as keyword arguments)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str
    url: str | None = None
    table: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    status_map: dict[str, str] = Field(default_factory=dict)
    #: stored task name -> the record's `type`; writes refuse a type it does not map.
    type_map: dict[str, str] = Field(default_factory=dict)
    #: column -> value written on insert to a column the record does not carry.
    constants: dict[str, str | int | float | bool] = Field(default_factory=dict)
    #: time field -> "s" or "ms": what an integer time column counts since 1970.
    epoch_units: dict[str, str] = Field(default_factory=dict)

    @property
    def is_factory(self) -> bool:
        return ":" in self.kind

    @property
    def options(self) -> dict[str, Any]:
        """The keys a factory receives."""
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _check(self) -> StoreConfig:
        if not self.is_factory:
            if self.kind not in ("sql", "memory"):
                raise ValueError(f"kind '{self.kind}' is not 'sql', 'memory' or 'package.module:factory'")
            if self.model_extra:
                raise ValueError(f"unknown key '{next(iter(self.model_extra))}' for kind '{self.kind}'")
        if self.kind == "sql" and (not self.url or not self.table):
            raise ValueError("a 'sql' store needs 'url' and 'table'")
        for field in self.columns:
            if field not in TASK_FIELDS:
                raise ValueError(f"columns: '{field}' is not a task field ({', '.join(TASK_FIELDS)})")
        for stored, status in self.status_map.items():
            if status not in TASK_STATUSES:
                raise ValueError(
                    f"status_map: '{stored}' maps to '{status}', not one of {', '.join(TASK_STATUSES)}"
                )
        self._check_sql_mappings()
        return self

    def _check_sql_mappings(self) -> None:
        """Only created_at and updated_at share a column; type_map names are non-empty; a
        constant is for a column no field is mapped to."""
        fields_of: dict[str, list[str]] = {}
        for field, column in self.columns.items():
            fields_of.setdefault(column, []).append(field)
        for column, fields in fields_of.items():
            if len(fields) > 1 and sorted(fields) != ["created_at", "updated_at"]:
                raise ValueError(
                    f"columns: column '{column}' is mapped to {' and '.join(fields)}; only created_at"
                    " and updated_at may share a column"
                )
        for field, unit in self.epoch_units.items():
            if field not in ("created_at", "updated_at", "run_at") or unit not in ("s", "ms"):
                raise ValueError(
                    f"epoch_units: {field} = '{unit}': name created_at, updated_at or run_at, and"
                    " 's' (seconds since 1970) or 'ms' (milliseconds)"
                )
        for stored, type_ in self.type_map.items():
            if not stored or not type_:
                raise ValueError(f"type_map: '{stored}' = '{type_}': both names must be non-empty")
        for column in self.constants:
            if column in self.columns.values():
                raise ValueError(
                    f"constants: column '{column}' is mapped to a task field in 'columns'; a constant"
                    " is for a column the record does not carry"
                )


#: The kinds of event a `[[notify]]` target may name in `events` (journal/outbox.py's
#: `EVENT_KINDS`, and `before`, sent to veto commands before a claim).
NOTIFY_EVENTS: Final = (
    "before", "init", "refused", "approved", "claimed", "takeover", "pause", "lift", "workers_gone",
    "step_done", "step_failed", "step_undone", "committed", "aborted", "held", "released",
    "watch_verdict", "watch_alert",
)  # fmt: skip
#: Kinds a target receives only when its `events` names them (journal/outbox.py's `FREQUENT_KINDS`).
FREQUENT_EVENTS: Final = ("watch_verdict",)


class NotifyTarget(BaseModel):
    """One `[[notify]]` target: an HTTP endpoint (`url`) or a command (`command`) that
    receives the migration's events (docs/OBSERVABILITY.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    url: str | None = None
    command: str | list[str] | None = None
    format: Literal["json", "slack"] = "json"
    events: list[str] | None = None
    timeout_seconds: float = Field(default=5.0, gt=0, le=600, allow_inf_nan=False)
    veto: bool = False

    @model_validator(mode="after")
    def _check(self) -> NotifyTarget:
        if (self.url is None) == (self.command is None):
            raise ValueError(f"target '{self.name}' needs exactly one of 'url' and 'command'")
        if self.url is not None and self.url.split(":", 1)[0].lower() not in ("http", "https"):
            raise ValueError(f"target '{self.name}': url must start with http:// or https://")
        if self.command is not None and not self.argv:
            raise ValueError(f"target '{self.name}': command is empty")
        if self.veto and self.command is None:
            raise ValueError(f"target '{self.name}': veto = true needs a 'command' target")
        if self.format == "slack" and self.url is None:
            raise ValueError(f"target '{self.name}': format 'slack' is for a 'url' target")
        for kind in self.events or []:
            if kind not in NOTIFY_EVENTS:
                raise ValueError(
                    f"target '{self.name}': '{kind}' is not an event (events: {', '.join(NOTIFY_EVENTS)})"
                )
        if self.url is not None and self.events is not None and "before" in self.events:
            raise ValueError(f"target '{self.name}': 'before' is sent to command targets only")
        return self

    @property
    def argv(self) -> list[str]:
        """The command as a list of arguments (a string is split like a shell would, but
        no shell runs it)."""
        import shlex

        if self.command is None:
            return []
        return shlex.split(self.command) if isinstance(self.command, str) else list(self.command)

    @property
    def kinds(self) -> list[str] | None:
        """The stored event kinds the target receives (None: every kind). Without `events`,
        every kind but `watch_verdict` (written every interval by `watch`)."""
        if self.events is None:
            if self.veto:
                return ["before"]
            return [kind for kind in NOTIFY_EVENTS if kind != "before" and kind not in FREQUENT_EVENTS]
        return [kind for kind in self.events if kind != "before"]

    def wants_before(self) -> bool:
        """Whether the target receives the `before` event of each edge."""
        return self.command is not None and (self.veto or "before" in (self.events or []))


class Approvals(BaseModel):
    """`[approvals]`: the edges that need an operator's approval (`migration-fsm approve`)
    by someone other than the operator who takes them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    edges: list[str] = Field(default_factory=list)
    #: An approval lapses this long after it was given, and when the phase changes.
    approval_ttl_seconds: float = Field(default=86_400.0, gt=0, le=7 * 86_400, allow_inf_nan=False)

    @field_validator("edges")
    @classmethod
    def _check_edges(cls, value: list[str]) -> list[str]:
        for key in value:
            edge = EDGES_BY_KEY.get(key)
            if edge is None or edge.trigger not in (Trigger.ADVANCE, Trigger.ROLLBACK):
                wanted = ", ".join(k for k, e in EDGES_BY_KEY.items() if e.trigger is not Trigger.RAMP)
                raise ValueError(f"'{key}' is not an advance or rollback edge (edges: {wanted})")
        return value


#: The built-in guards' names, which a metric guard may not take (`plugins.registry` checks at
#: import that this is exactly its table; this leaf module cannot import it).
BUILTIN_GUARD_NAMES: Final = frozenset({
    "approval", "backfill_complete", "backup_exists", "checksums_match", "completion_rate_ok",
    "counts_match", "failure_rate_ok", "min_soak", "no_double_execution", "old_drained",
    "percent_is_100", "repair_log_empty", "stores_reachable",
})  # fmt: skip
#: What a metric guard measures: a Prometheus query, a query on a store's database, or the new
#: side's tasks that finished since the phase was entered (what `failure_rate_ok` and
#: `completion_rate_ok` measure).
METRIC_KINDS: Final = ("prometheus", "sql", "failure_rate", "completion_rate")
_METRIC_KEYS: Final = {
    "prometheus": {"url", "query", "step_seconds"},
    "sql": {"store", "query"},
    "failure_rate": set(),
    "completion_rate": set(),
}
_GUARD_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class MetricGuard(BaseModel):
    """`[metric_guards.NAME]`: a guard that measures a number and holds it to `min` and/or `max`
    (DESIGN.md section 11); named in `[guards]` lists like a built-in guard."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["prometheus", "sql", "failure_rate", "completion_rate"]
    #: prometheus: the base URL of the Prometheus HTTP API (`http://prometheus:9090`).
    url: str | None = None
    #: prometheus: PromQL; sql: a SELECT returning one number.
    query: str | None = None
    #: sql: the store (`old` or `new`) whose database the query reads.
    store: Literal["old", "new"] | None = None
    min: float | None = Field(default=None, allow_inf_nan=False)
    max: float | None = Field(default=None, allow_inf_nan=False)
    #: prometheus: the condition holds over the last this many seconds (every sample of a
    #: range query); 0: one instant query.
    for_seconds: float = Field(default=0.0, ge=0, le=7 * 86_400, allow_inf_nan=False)
    #: prometheus: the range query's resolution (raised so that no series has over 10,000 samples).
    step_seconds: float | None = Field(default=None, gt=0, le=86_400, allow_inf_nan=False)
    timeout_seconds: float = Field(default=5.0, gt=0, le=300, allow_inf_nan=False)
    #: Record the verdict without ever refusing ("dry run: would refuse: ...").
    dry_run: bool = False

    @model_validator(mode="after")
    def _check(self) -> MetricGuard:
        if self.min is None and self.max is None:
            raise ValueError("a metric guard needs 'min', 'max' or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}: no value could pass")
        given = {key for key in ("url", "query", "store", "step_seconds") if getattr(self, key) is not None}
        if self.for_seconds and self.kind != "prometheus":
            given.add("for_seconds")
        extra = sorted(given - _METRIC_KEYS[self.kind])
        if extra:
            raise ValueError(f"kind '{self.kind}' takes no '{extra[0]}'")
        if self.kind in ("prometheus", "sql") and not (self.query or "").strip():
            raise ValueError(f"a '{self.kind}' metric guard needs a non-empty 'query'")
        if self.kind == "prometheus":
            from urllib.parse import urlsplit

            parts = urlsplit(self.url or "")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"url '{self.url or ''}' is not an http:// or https:// URL of the Prometheus HTTP API"
                    " (e.g. http://prometheus:9090)"
                )
        if self.kind == "sql" and self.store is None:
            raise ValueError("a 'sql' metric guard needs 'store' (\"old\" or \"new\"): the database it reads")
        return self


#: The phases `watch` watches: those a rollback can leave (`preparation` has nothing to soak,
#: `complete` is final).
WATCHED_PHASES: Final = ("dual_write", "cutover", "cleanup")
#: Built-in guards `watch` can evaluate besides `[metric_guards]`: they measure a number.
WATCH_BUILTINS: Final = ("failure_rate_ok", "completion_rate_ok")


class Watch(BaseModel):
    """`[watch]`: the guards `migration-fsm watch` evaluates every `interval_seconds` while a
    phase soaks, and what it does after `failure_limit` failed (or inconclusive) verdicts of
    one guard in a row (DESIGN.md section 11, docs/OBSERVABILITY.md "Watch")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Guards watched in every watched phase without an entry in `phases`.
    guards: list[str] = Field(default_factory=list)
    #: phase -> its guards (replacing `guards` in that phase; an empty list watches nothing).
    phases: dict[str, list[str]] = Field(default_factory=dict)
    interval_seconds: float = Field(default=60.0, gt=0, le=86_400, allow_inf_nan=False)
    failure_limit: int = Field(default=3, ge=1, le=10_000)
    on_failure: Literal["pause", "rollback", "notify"] = "pause"
    on_inconclusive: str = "notify"

    @field_validator("phases")
    @classmethod
    def _check_phases(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for phase in value:
            if phase not in WATCHED_PHASES:
                raise ValueError(f"'{phase}' is not a phase watch watches ({', '.join(WATCHED_PHASES)})")
        return value

    @field_validator("on_inconclusive")
    @classmethod
    def _check_inconclusive(cls, value: str) -> str:
        if value == "rollback":
            raise ValueError("an inconclusive verdict never rolls back: 'pause' or 'notify'")
        if value not in ("pause", "notify"):
            raise ValueError(f"'{value}' is not 'pause' or 'notify'")
        return value

    def guards_for(self, phase: str) -> list[str]:
        """The guards watched in `phase` (none outside `WATCHED_PHASES`)."""
        if phase not in WATCHED_PHASES:
            return []
        return list(self.phases.get(phase, self.guards))

    @property
    def named(self) -> list[str]:
        """Every guard named, once each."""
        names = [*self.guards, *(g for gs in self.phases.values() for g in gs)]
        return list(dict.fromkeys(names))


def _check_edge_keys(value: dict[str, Any]) -> dict[str, Any]:
    for key in value:
        if key not in EDGES_BY_KEY:
            raise ValueError(f"'{key}' is not an edge (edges: {', '.join(EDGES_BY_KEY)})")
    return value


#: Upper bounds of durations are in days: a finite, representable time (`1e308` seconds is not).
_DAY: Final = 86_400


class Settings(BaseSettings):
    """Everything configurable; see `config/migration-fsm.toml` for a commented example."""

    model_config = SettingsConfigDict(
        env_prefix="MIGRATION_FSM_", extra="forbid", frozen=True, validate_default=True
    )

    database_url: str = DEFAULT_DATABASE_URL
    actor: str = Field(default_factory=default_actor, min_length=1, max_length=200)  # journal column
    lease_seconds: float = Field(default=30.0, gt=0, le=_DAY, allow_inf_nan=False)
    heartbeat_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    min_soak_seconds: float = Field(default=0.0, ge=0, le=365 * _DAY, allow_inf_nan=False)
    max_failure_rate: float = Field(default=0.01, ge=0, le=1, allow_inf_nan=False)
    min_completion_rate: float = Field(default=0.99, ge=0, le=1, allow_inf_nan=False)
    guards: dict[str, list[str]] = Field(default_factory=dict)
    steps: dict[str, list[str | StepSpec]] = Field(default_factory=dict)
    stores: dict[Literal["old", "new"], StoreConfig] = Field(default_factory=dict)
    backfill_batch_size: int = Field(default=1000, gt=0, le=1_000_000)
    drain_timeout_seconds: float = Field(default=300.0, ge=0, le=7 * _DAY, allow_inf_nan=False)
    drain_policy: Literal["requeue", "fail"] = "requeue"
    validate_sample_size: int = Field(default=20, ge=0, le=100_000)
    backup_path: str | None = None
    # Workers and the execution ledger (DESIGN.md section 10).
    worker_ttl_seconds: float = Field(default=30.0, gt=0, le=_DAY, allow_inf_nan=False)
    pause_timeout_seconds: float = Field(default=120.0, gt=0, le=7 * _DAY, allow_inf_nan=False)
    ledger_url: str | None = None
    # Events out (DESIGN.md section 11, docs/OBSERVABILITY.md).
    notify: list[NotifyTarget] = Field(default_factory=list)
    # Operators' approvals (DESIGN.md section 11).
    approvals: Approvals = Field(default_factory=Approvals)
    # Metric guards (DESIGN.md section 11), named in [guards] lists like built-in guards.
    metric_guards: dict[str, MetricGuard] = Field(default_factory=dict)
    # Watching a soaking phase (DESIGN.md section 11); declared after metric_guards, which it names.
    watch: Watch = Field(default_factory=Watch)

    _check_guards = field_validator("guards")(_check_edge_keys)
    _check_steps = field_validator("steps")(_check_edge_keys)

    @field_validator("notify")
    @classmethod
    def _check_notify_names(cls, value: list[NotifyTarget]) -> list[NotifyTarget]:
        seen: set[str] = set()
        for target in value:
            if target.name in seen:
                raise ValueError(f"two targets are named '{target.name}': each needs a name of its own")
            seen.add(target.name)
        return value

    @field_validator("metric_guards")
    @classmethod
    def _check_metric_guards(
        cls, value: dict[str, MetricGuard], info: ValidationInfo
    ) -> dict[str, MetricGuard]:
        stores = info.data.get("stores", {})  # validated first (declared first); absent if bad
        for name, guard in value.items():
            if name in BUILTIN_GUARD_NAMES:
                raise ValueError(f"'{name}' is the name of a built-in guard: give the metric guard another")
            if not _GUARD_NAME.fullmatch(name):
                raise ValueError(f"'{name}' is not a guard name (letters, digits and _, not first a digit)")
            if guard.kind in ("failure_rate", "completion_rate") and "new" not in stores:
                raise ValueError(
                    f"{name}: kind '{guard.kind}' counts the new side's tasks: configure [stores.new]"
                )
            if guard.store is None:
                continue
            store = stores.get(guard.store)
            url = None if store is None else store.url or store.options.get("url")
            if not isinstance(url, str):
                raise ValueError(
                    f"{name}: store '{guard.store}' has no database URL to read: configure"
                    f" [stores.{guard.store}] with kind 'sql'"
                )
        return value

    @field_validator("watch")
    @classmethod
    def _check_watch(cls, value: Watch, info: ValidationInfo) -> Watch:
        metric = info.data.get("metric_guards", {})  # validated first; absent if bad
        stores = info.data.get("stores", {})
        for name in value.named:
            if name in WATCH_BUILTINS:
                if "new" not in stores:
                    raise ValueError(f"'{name}' counts the new side's tasks: configure [stores.new]")
            elif name not in metric:
                known = ", ".join([*metric, *WATCH_BUILTINS])
                raise ValueError(
                    f"'{name}' is not a metric guard of [metric_guards] nor one of"
                    f" {', '.join(WATCH_BUILTINS)} (watchable: {known})"
                )
        return value

    @field_validator("ledger_url")
    @classmethod
    def _check_ledger_url(cls, value: str | None) -> str | None:
        if value is not None and value.split(":", 1)[0].split("+", 1)[0] not in ("sqlite", "postgresql"):
            raise ValueError("the ledger is a SQLite or PostgreSQL database (sqlite:// or postgresql:// URL)")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if value.split(":", 1)[0].split("+", 1)[0] not in ("sqlite", "postgresql"):
            raise ValueError(
                "the migration database is a SQLite or PostgreSQL database (sqlite:// or postgresql:// URL)"
            )
        return value

    @field_validator("heartbeat_seconds")
    @classmethod
    def _check_heartbeat(cls, value: float | None, info: ValidationInfo) -> float | None:
        lease = info.data.get("lease_seconds")  # validated first (declared first); absent if bad
        if value is not None and lease is not None and value > lease / 2:
            raise ValueError(
                f"{value:g} must be at most half of lease_seconds ({lease:g}), so the lease is"
                " renewed before it expires; leave it out to renew every third of the lease"
            )
        return value

    @property
    def ledger_database_url(self) -> str:
        """Where the execution ledger lives: `ledger_url`, else the migration database."""
        return self.ledger_url or self.database_url

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between lease renewals: the configured value, else a third of the lease;
        never more than half of the lease (settings made without validation, such as
        `model_copy(update=...)`, cannot make the heartbeat outlive the lease)."""
        return min(self.heartbeat_seconds or self.lease_seconds / 3, self.lease_seconds / 2)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003  pydantic-settings passes it by name; no .env
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003  ... nor secrets directory
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file.get()
        if path is not None:
            sources.append(_ConfigFileSource(settings_cls, toml_file=path))
        return tuple(sources)


class _ConfigFileSource(TomlConfigSettingsSource):
    """The TOML file, with its relative SQLite paths made relative to the file's folder (not
    to wherever the operator runs the command from): `database_url`, `ledger_url`, each
    store's `url`, and `backup_path`."""

    def __init__(self, settings_cls: type[BaseSettings], toml_file: Path) -> None:
        super().__init__(settings_cls, toml_file=toml_file)
        self.folder = toml_file.resolve().parent

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        for key in ("database_url", "ledger_url"):
            if isinstance(data.get(key), str):
                data[key] = resolve_sqlite_url(data[key], self.folder)
        stores = data.get("stores")
        if isinstance(stores, dict):
            for store in stores.values():
                if isinstance(store, dict) and isinstance(store.get("url"), str):
                    store["url"] = resolve_sqlite_url(store["url"], self.folder)
        backup = data.get("backup_path")
        if isinstance(backup, str) and backup and not Path(backup).is_absolute():
            data["backup_path"] = str(self.folder / backup)
        return data


def resolve_sqlite_url(url: str, folder: Path) -> str:
    """`url` with a relative SQLite file path made relative to `folder` (any other URL as it is)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return url  # reported as invalid where it is used
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
        return url
    if Path(database).is_absolute():
        return url
    return parsed.set(database=str(folder / database)).render_as_string(hide_password=False)


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from the TOML file `config` (if any), the environment and `overrides`.

    Overrides that are None are ignored. Raises `ConfigError` naming the offending key.
    """
    path = Path(config) if config else None
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    _check_environment()
    token = _config_file.set(path)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, path)) from exc
    except SettingsError as exc:  # an environment variable that is not valid JSON, say
        cause = first_line_of(str(exc.__cause__ or exc))
        field = re.search(r'field "(\w+)"', str(exc))
        if field is None:
            raise ConfigError(f"{first_line_of(str(exc))}: {cause}") from exc
        raise ConfigError(
            f"environment variable MIGRATION_FSM_{field.group(1).upper()} is invalid: {cause}"
            " (a table such as stores or guards is given as JSON)"
        ) from exc
    finally:
        _config_file.reset(token)


#: `MIGRATION_FSM_*` variables that are not settings: the CLI reads them itself.
_CLI_VARIABLES: Final = frozenset({"MIGRATION_FSM_CONFIG", "MIGRATION_FSM_SERVE_TOKEN"})
#: Variables of this project's own test suite and benchmarks (`MIGRATION_FSM_TEST_POSTGRES_URL`).
_TEST_PREFIX: Final = "MIGRATION_FSM_TEST_"


def _check_environment() -> None:
    """An unknown `MIGRATION_FSM_*` variable is an error, like an unknown config key (a typo
    such as `MIGRATION_FSM_LEASE_SECOND` would otherwise be ignored in silence)."""
    known = {f"MIGRATION_FSM_{name.upper()}" for name in Settings.model_fields} | _CLI_VARIABLES
    for name in sorted(os.environ):
        upper = name.upper()
        if upper.startswith("MIGRATION_FSM_") and upper not in known and not upper.startswith(_TEST_PREFIX):
            raise ConfigError(
                f"environment variable {name} is not a known setting: remove or rename it"
                " (every setting has one: MIGRATION_FSM_ and its config key in capitals)"
            )


def first_line_of(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def refuse_process_local_stores(settings: Settings) -> None:
    """Raise `ConfigError` for a `kind = "memory"` store: each process would see its own empty
    store, so every data guard would pass having checked nothing. The CLI calls this; memory
    stores are for tests and the Python API."""
    for side, store in settings.stores.items():
        if store.kind == "memory":
            raise ConfigError(
                f"config key 'stores.{side}' is invalid for the CLI: a 'memory' store lives in one"
                " process and every command would see it empty; use kind 'sql' or a"
                " 'package.module:factory' (memory stores are for tests and the Python API)"
            )


def describe_validation_error(exc: ValidationError, path: Path | None) -> str:
    """One line naming the first bad key and what is wrong with it."""
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    where = f" in {path}" if path else ""
    if error["type"] == "extra_forbidden":
        return f"config key '{key}'{where} is not a known setting: remove or rename it"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"config key '{key}'{where} is invalid: {message}"
