"""`build_store`: a `TaskStore` from a `[stores.old]` or `[stores.new]` config table."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from migration_fsm.exceptions import ConfigError, MigrationFSMError
from migration_fsm.tasks.memory import MemoryTaskStore
from migration_fsm.tasks.records import TaskStore

if TYPE_CHECKING:
    from migration_fsm.config import StoreConfig

#: The keys of a store table that only `kind = "sql"` reads.
_SQL_KEYS = ("url", "table", "columns", "status_map", "type_map", "constants", "epoch_units")


def build_store(config: StoreConfig, name: str) -> TaskStore:
    """The store `config` describes, named `name` ("old" or "new").

    `kind = "sql"` is a `SqlTaskStore` (its table is reflected now), `"memory"` an empty
    `MemoryTaskStore`, and `"package.module:factory"` whatever that callable returns when
    called with the table's other keys as keyword arguments. A bad table, a factory that
    cannot be imported or refuses its keys, or a result that is not a `TaskStore` is a
    `ConfigError` (exit 2) naming the store and the key.
    """
    if config.kind == "memory":
        for key in _SQL_KEYS:
            if getattr(config, key):
                raise _bad(name, key, "a 'memory' store takes no such key: remove it")
        return MemoryTaskStore(name=name)
    if config.kind == "sql":
        from migration_fsm.tasks.sql import SqlTaskStore  # SQLAlchemy reflection only when needed

        if not config.url or not config.table:  # StoreConfig checks this; a constructed one may not
            raise _bad(name, "table" if config.url else "url", "a 'sql' store needs 'url' and 'table'")
        return SqlTaskStore(
            config.url,
            config.table,
            name=name,
            columns=config.columns,
            status_map=config.status_map,
            type_map=config.type_map,
            constants=config.constants,
            epoch_units=config.epoch_units,
        )
    return _from_factory(config, name)


def _from_factory(config: StoreConfig, name: str) -> TaskStore:
    factory = _import(config.kind, name)
    options: dict[str, Any] = config.model_dump(exclude={"kind"}, exclude_unset=True)
    try:
        store = factory(**options)
    except MigrationFSMError:
        raise
    except TypeError as exc:  # an unexpected or missing keyword argument
        keys = ", ".join(f"'{key}'" for key in options) or "none"
        raise _bad(name, "kind", f"{config.kind} does not accept these keys ({keys}): {exc}") from exc
    except (ValueError, LookupError) as exc:
        raise _bad(name, "kind", f"{config.kind} refused its keys: {exc}") from exc
    if not isinstance(store, TaskStore):
        missing = [
            attr
            for attr in ("name", "scan", "get", "put", "put_many", "count_by_status")
            if not hasattr(store, attr)
        ]
        raise _bad(
            name,
            "kind",
            f"{config.kind} returned {type(store).__name__}, which is not a TaskStore"
            f" (missing: {', '.join(missing)})",
        )
    return store


def _import(path: str, name: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise _bad(name, "kind", f"'{path}' is not 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _bad(name, "kind", f"cannot import module '{module_name}': {exc}") from exc
    factory = module
    for part in attr.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError as exc:
            raise _bad(name, "kind", f"module '{module_name}' has no attribute '{attr}'") from exc
    if not callable(factory):
        raise _bad(name, "kind", f"'{path}' is not callable")
    return factory


def _bad(name: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"config key 'stores.{name}.{key}' is invalid: {message}")
