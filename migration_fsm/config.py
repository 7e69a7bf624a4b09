"""Settings: a TOML file, overridden by `MIGRATION_FSM_*` environment variables,
overridden by command-line options; validated by pydantic (unknown keys are errors)."""

from __future__ import annotations

import getpass
import os
import socket
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .exceptions import ConfigError
from .fsm import EDGES_BY_KEY

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


def _check_edge_keys(value: dict[str, Any]) -> dict[str, Any]:
    for key in value:
        if key not in EDGES_BY_KEY:
            raise ValueError(f"'{key}' is not an edge (edges: {', '.join(EDGES_BY_KEY)})")
    return value


class Settings(BaseSettings):
    """Everything configurable; see `config/migration-fsm.toml` for a commented example."""

    model_config = SettingsConfigDict(
        env_prefix="MIGRATION_FSM_", extra="forbid", frozen=True, validate_default=True
    )

    database_url: str = DEFAULT_DATABASE_URL
    actor: str = Field(default_factory=default_actor, min_length=1)
    lease_seconds: float = Field(default=30.0, gt=0)
    heartbeat_seconds: float | None = Field(default=None, gt=0)
    min_soak_seconds: float = Field(default=0.0, ge=0)
    max_failure_rate: float = Field(default=0.01, ge=0, le=1)
    guards: dict[str, list[str]] = Field(default_factory=dict)
    steps: dict[str, list[str | StepSpec]] = Field(default_factory=dict)

    _check_guards = field_validator("guards")(_check_edge_keys)
    _check_steps = field_validator("steps")(_check_edge_keys)

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between lease renewals: the configured value, else a third of the lease."""
        return self.heartbeat_seconds or self.lease_seconds / 3

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


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
    token = _config_file.set(path)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, path)) from exc
    finally:
        _config_file.reset(token)


def describe_validation_error(exc: ValidationError, path: Path | None) -> str:
    """One line naming the first bad key and what is wrong with it."""
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    where = f" in {path}" if path else ""
    if error["type"] == "extra_forbidden":
        return f"config key '{key}'{where} is not a known setting: remove or rename it"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"config key '{key}'{where} is invalid: {message}"
