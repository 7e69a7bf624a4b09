"""What a guard or step receives (`ctx`) and what a guard may return."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from ..config import Settings
    from ..fsm import Phase
    from ..journal import Journal, MigrationState


@dataclass(frozen=True, slots=True)
class GuardVerdict:
    """A guard's verdict and a short human explanation (shown by `advance` and `history`)."""

    passed: bool
    detail: str = ""


@dataclass(slots=True)
class Context:
    """The `ctx` handed to guards and steps (DESIGN.md section 5).

    Guards get `seq` None and cannot save checkpoints; steps get their own checkpoint back
    after a crash, so they can continue where they stopped.
    """

    migration: str
    seq: int | None
    source: Phase
    dest: Phase
    settings: Settings
    log: Any
    state: MigrationState
    store: Journal
    percent: int
    checkpoint: dict[str, Any] | None = None
    _save: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)
    _beat: Callable[[], None] | None = field(default=None, repr=False)

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Persist `checkpoint` (a JSON object) for this step; `resume` hands it back."""
        if self._save is None:
            raise RuntimeError("guards cannot save checkpoints")
        if not isinstance(checkpoint, dict):
            raise TypeError("a checkpoint is a dict")
        json.dumps(checkpoint)  # fail here, not in the driver, when it is not JSON
        self._save(checkpoint)
        self.checkpoint = checkpoint

    def heartbeat(self) -> None:
        """Renew the lease now (a background thread also renews it)."""
        if self._beat is not None:
            self._beat()


GuardFn: TypeAlias = Callable[[Context], "bool | GuardVerdict"]
StepFn: TypeAlias = Callable[[Context], None]
