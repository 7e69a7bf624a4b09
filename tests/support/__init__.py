"""What the tests share: the CLI runner (`cli`), task records and tables (`datatools`), the
steps and guards that configs name (`steps`), the one fork server for process tests
(`forkserver`), the SIGKILL tripwire (`crashkit`), a TCP proxy (`proxy`) and the
hypothesis model's strategies (`strategies`)."""

from __future__ import annotations

import os
from pathlib import Path

#: The repository's root folder.
ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
#: The PostgreSQL server the tests create their own databases in.
PG_ADMIN_URL = os.environ.get("MIGRATION_FSM_TEST_POSTGRES_URL", DEFAULT_PG)
