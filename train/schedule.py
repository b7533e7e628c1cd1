"""What a run changes as it goes, besides the learning rate: the batch size and DeepSeek's recipe switches.

DeepSeek writes its schedules in tokens: V2 grows the batch from 2,304 to 9,216 sequences over the first 225B
tokens and decays the learning rate after ~60% and ~90% of the tokens; V3 grows the batch from 3,072 to 15,360
over the first 469B tokens, lowers the MTP loss weight from 0.3 to 0.1 after 10T of 14.8T tokens and stops the
expert-bias update for the last 500B. With a constant batch, tokens and steps are proportional; under a
ramp-up they are not, so every fraction of a run here is a fraction of its tokens (`RunPosition`).

The batch size at each step is a function of the configuration alone (no state), so the data stream, the
learning rate and a resumed run all agree on it under any parallel layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .config import ConfigError, LoopConfig


@dataclass(frozen=True)
class BatchSchedule:
    """Sequences per optimizer step: `final` (train.global_batch_size) throughout, or DeepSeek's ramp-up.

    Ramp-up (Megatron's `--rampup-batch-size` rule, counted in tokens): the first steps take `start` sequences;
    the batch grows by `increment` each time another ramp_tokens / n tokens have been consumed, n = (final -
    start) / increment increments, so it is `final` once `ramp_tokens` tokens have been consumed."""

    final: int
    seq_len: int
    start: int = 0  # 0: no ramp-up
    increment: int = 0
    ramp_tokens: float = 0.0

    @classmethod
    def of(cls, t: LoopConfig, seq_len: int) -> "BatchSchedule":
        return cls(t.global_batch_size, seq_len, t.rampup_batch_size, t.rampup_increment, t.rampup_tokens)

    @property
    def ramps(self) -> bool:
        return 0 < self.start < self.final

    def size_after(self, tokens: int) -> int:
        """The batch of the step that starts once `tokens` tokens have been consumed."""
        if not self.ramps:
            return self.final
        per_increment = self.ramp_tokens / ((self.final - self.start) // self.increment)
        return min(self.final, self.start + int(tokens // per_increment) * self.increment)

    @cached_property
    def _ramp(self) -> list[int]:
        """Sequences consumed before each step of the ramp-up, up to the first step of `final` sequences."""
        before = [0]
        while (size := self.size_after(before[-1] * self.seq_len)) < self.final:
            before.append(before[-1] + size)
        return before

    def sequences_before(self, step: int) -> int:
        """Sequences consumed by steps 0 .. step-1 (step counts from 0)."""
        ramp = self._ramp
        if step < len(ramp):
            return ramp[step]
        return ramp[-1] + (step - len(ramp) + 1) * self.final

    def size(self, step: int) -> int:
        """Sequences of step `step` (from 0)."""
        return self.sequences_before(step + 1) - self.sequences_before(step)

    def seconds_left(self, start: int, step: int, total: int, elapsed: float) -> float:
        """ETA of a run of `total` steps after `step`, at the speed (sequences per second) of the `elapsed`
        seconds since `start`; under a ramp-up later steps are larger, so counting steps would underestimate."""
        done = self.sequences_before(step) - self.sequences_before(start)
        return elapsed / max(done, 1) * (self.sequences_before(total) - self.sequences_before(step))


@dataclass(frozen=True)
class RunPosition:
    """Where a step stands in a run of `total` steps, as DeepSeek's schedules measure it: by the tokens consumed
    before it, counted in steps of the final batch (`run(s)`: exactly s when the batch is constant; less under a
    ramp-up). Fractions of the run compare against `run(total)`."""

    batches: BatchSchedule
    total: int

    def __call__(self, step: int) -> float:
        return self.batches.sequences_before(step) / self.batches.final

    def reached(self, step: int, fraction: float) -> bool:
        """Whether `fraction` of the run's tokens has been consumed before step `step`."""
        return self(step) >= fraction * self(self.total)

    def mtp_loss_weight(self, step: int, t: LoopConfig, base: float) -> float:
        """model.mtp_loss_weight (`base`), or train.mtp_loss_weight_after's weight once its fraction is reached
        (DeepSeek-V3: 0.3 for the first 10T of 14.8T tokens, then 0.1)."""
        after = t.mtp_loss_weight_after
        return float(after[1]) if after and self.reached(step, after[0]) else base

    def bias_updates(self, step: int, t: LoopConfig) -> bool:
        """Whether the auxiliary-loss-free expert bias moves after step `step` (DeepSeek-V3: gamma 0.001 for the
        first 14.3T of 14.8T tokens, 0 for the rest)."""
        return not self.reached(step, t.bias_update_until)


def check_batch_split(t: LoopConfig, dp: int) -> None:
    """Every batch of the run splits evenly over `dp` data-parallel ranks in micro-batches (ConfigError)."""
    for name, size in (("global_batch_size", t.global_batch_size), ("rampup_batch_size", t.rampup_batch_size),
                       ("rampup_increment", t.rampup_increment)):
        if size % (dp * t.micro_batch_size):
            raise ConfigError(f"train.{name}={size} is not divisible by data-parallel ranks x micro_batch_size = "
                              f"{dp} x {t.micro_batch_size}: every step's batch must split into whole micro-batches "
                              f"on every rank")
