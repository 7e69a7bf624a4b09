"""Task stores over SQL tables: `SqlTaskStore` (any existing table, through a `TableMapping`)
and `RowCopy` (tasks copied between two such tables as rows).

`columns` (`ColumnKind`, value conversions, integer keys) -> `mapping` (fields, columns,
status and type maps) -> `dialects` (SQLite and PostgreSQL
specifics) -> `statements` (compiled once) -> `store` -> `rowcopy`; `layout` is the default
task table, every field in the column of its name.
"""

from migration_fsm.tasks.sql.columns import ColumnKind, Reader, Writer
from migration_fsm.tasks.sql.layout import default_task_table
from migration_fsm.tasks.sql.mapping import FIELDS, OPTIONAL_FIELDS, MappedField, TableMapping
from migration_fsm.tasks.sql.rowcopy import RowCopy
from migration_fsm.tasks.sql.statements import Statements
from migration_fsm.tasks.sql.store import KEY_LOOKUP_CHUNK, SqlTaskStore

__all__ = [
    "FIELDS",
    "KEY_LOOKUP_CHUNK",
    "OPTIONAL_FIELDS",
    "ColumnKind",
    "MappedField",
    "Reader",
    "RowCopy",
    "SqlTaskStore",
    "Statements",
    "TableMapping",
    "Writer",
    "default_task_table",
]
