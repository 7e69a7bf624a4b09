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
    """A guard's verdict, a short human explanation (shown by `advance` and `history`) and,
    optionally, the number it measured (`value`, journaled with the verdict when finite)."""

    passed: bool
    detail: str = ""
    value: float | None = None


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
    _pause: Callable[[str], int] | None = field(default=None, repr=False)
    _lift: Callable[[], int] | None = field(default=None, repr=False)
    _gone: Callable[[dict[str, Any], str, list[str]], None] | None = field(default=None, repr=False)

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Persist `checkpoint` (a JSON object) for this step; `resume` hands it back."""
        if self._save is None:
            raise RuntimeError("guards cannot save checkpoints")
        if not isinstance(checkpoint, dict):
            raise TypeError("a checkpoint is a dict")
        json.dumps(checkpoint)  # fail here, not in the driver, when it is not JSON
        self._save(checkpoint)
        self.checkpoint = checkpoint

    def record_workers_gone(self, side: str, workers: list[str], checkpoint: dict[str, Any]) -> None:
        """Save `checkpoint` and, with it, the `workers_gone` event naming `workers` of `side`
        (built-in `pause_consumers`)."""
        if self._gone is None:
            self.save_checkpoint(checkpoint)
            return
        json.dumps(checkpoint)
        self._gone(checkpoint, side, workers)
        self.checkpoint = checkpoint

    def heartbeat(self) -> None:
        """Renew the lease now (a background thread also renews it)."""
        if self._beat is not None:
            self._beat()

    def pause(self, side: str) -> int:
        """Publish the pause of `side`'s consumers through the transition's lease (a version
        bump that `PhaseClient`s and `WorkerGate`s see, journaled on the transition's row);
        the version every live worker of that side must acknowledge. Idempotent. Steps only:
        the commit clears the pause, `abort` lifts it."""
        if self._pause is None:
            raise RuntimeError("only a step of a claimed transition can pause consumers")
        return self._pause(side)

    def lift(self) -> int:
        """Withdraw this transition's pause (if any); the migration's version afterwards."""
        if self._lift is None:
            raise RuntimeError("only a step of a claimed transition can lift a pause")
        return self._lift()


GuardFn: TypeAlias = Callable[[Context], "bool | GuardVerdict"]
StepFn: TypeAlias = Callable[[Context], None]
