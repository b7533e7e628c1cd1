"""Loss spikes and non-finite losses.

Every step's losses are checked. A non-finite one (the training loss or a balance loss) or a training loss above
`train.spike.factor` x the mean of the last `train.spike.window` ones is a spike. Without rollbacks
(`train.spike.max_rollbacks: 0`) a spike of a non-finite loss ends the run: one line naming the step, the loss
and the last good checkpoint, exit 1, nothing saved (the weights that produced it are already updated). With
rollbacks the run goes back to its newest checkpoint and skips the next `skip_batches` batches of data (PaLM's
remedy), at most `max_rollbacks` times. The window of recent losses and the rollback history are part of every
checkpoint, so a killed and resumed run sees the same spikes and takes the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, no rollbacks left): one line for the console."""


@dataclass
class SpikeGuard:
    factor: float  # a loss above factor x the running mean is a spike; 0: only non-finite losses are
    window: int  # losses in the running mean
    max_rollbacks: int
    recent: list = field(default_factory=list)  # the last `window` training losses that were not spikes
    rollbacks: list = field(default_factory=list)  # {"step", "to_step", "reason"} of each rollback so far

    def problem(self, losses: dict[str, float]) -> str | None:
        """Why these losses are a spike, or None. `losses`: {"loss": ..., "aux/expert": ..., ...}."""
        for name, value in losses.items():
            if not math.isfinite(value):
                return f"{name} is {value}"
        loss = losses["loss"]
        if self.factor > 0 and len(self.recent) == self.window:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.factor * mean:
                return f"loss {loss:.4f} is above {self.factor:g} x its running mean {mean:.4f}"
        return None

    def observe(self, loss: float) -> None:
        self.recent = (self.recent + [loss])[-self.window:]

    def can_roll_back(self) -> bool:
        return len(self.rollbacks) < self.max_rollbacks

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "rollbacks": list(self.rollbacks)}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.recent = list(state.get("recent", []))[-self.window:]
        self.rollbacks = list(state.get("rollbacks", []))
