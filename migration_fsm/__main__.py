"""`python -m migration_fsm`."""

from .cli import run

run()
