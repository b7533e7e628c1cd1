"""The parts of the training loop that decide for themselves when to act: the train state a checkpoint holds
(a `Stateful`), validation and logging, each with its own `should_*`. The checkpointer's cadence is
`Checkpointer.should_save` (train/checkpoint.py), the spike guard's `SpikeGuard.problem` (train/spike.py).
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from .config import to_dict
from .metrics import MetricsWriter, format_progress
from .moe_stats import gathered_expert_bias
from .runtime import Runtime
from .spike import SpikeGuard
from .step import Step, all_mean
from .straggler import Stragglers

log = logging.getLogger(__name__)


class TrainState:
    """What a checkpoint holds beside the model and optimizer states: the step, the learning-rate schedule, the
    data position, the spike guard and the resolved configuration (torch.distributed.checkpoint's `Stateful`).
    Loading keeps the optimizer settings the configuration gives, not the ones the checkpoint held."""

    def __init__(self, rt: Runtime, spike: SpikeGuard):
        self.rt, self.spike = rt, spike
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "scheduler": self.rt.optimizers.scheduler_state(),
                "loader": self.rt.loader.state_dict(), "config": to_dict(self.rt.cfg),
                "spike": self.spike.state_dict(), "layout": self.layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.rt.optimizers.load_scheduler_state(state["scheduler"])
        self.rt.optimizers.apply_config(self.rt.cfg.optim)
        self.spike.load_state_dict(state.get("spike"))
        self.rt.loader.load_state_dict(state["loader"])
        line = layout_change(state["step"], state.get("layout"), self.layout())
        if line and self.rt.env.rank == 0:
            log.warning(line)

    def layout(self) -> dict[str, int]:
        """The ranks, data-parallel ranks and micro-batches a rank accumulates over at this step."""
        dp, mb = self.rt.groups.dp_world, self.rt.cfg.train.micro_batch_size
        return {"world": self.rt.env.world, "dp": dp, "accumulation": self.rt.batches.size(self.step) // (dp * mb)}


def layout_change(step: int, saved: Optional[dict], now: dict) -> Optional[str]:
    """One line for a resume on another number of ranks than the checkpoint was written with (a job that re-formed
    with fewer hosts): what the data-parallel degree and gradient accumulation became; None when the world is the
    same. The global batch, and so the losses, are those of the configuration either way."""
    if not saved or saved["world"] == now["world"]:
        return None
    plural = "s" if now["world"] != 1 else ""
    return (f"resumed step {step} on {now['world']} rank{plural} (was {saved['world']}): data-parallel "
            f"{saved['dp']} -> {now['dp']}, gradient accumulation {saved['accumulation']} -> {now['accumulation']}")


class Validator:
    """The held-out loss every `train.val_every` steps and at the last step (train.val_every=0: never)."""

    def __init__(self, rt: Runtime, step: Step, metrics: MetricsWriter):
        self.rt, self.step_fn, self.metrics = rt, step, metrics
        self.every, self.last = rt.cfg.train.val_every, rt.cfg.train.steps

    def should_validate(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.last)

    def __call__(self, step: int) -> Optional[float]:
        """The validation loss after `step` steps, logged and printed (rank 0); None when there is no batch."""
        cfg, g = self.rt.cfg, self.rt.groups
        # held-out batches of the training step's size, whatever the layout; each is the mean of its micro-batches
        local = cfg.train.global_batch_size // g.dp_world
        batches = self.step_fn.sequence_part(self.rt.val_loader.val_batches(cfg.data.val_batches, local))
        losses = self.step_fn.losses(batches, step)
        if not losses:
            return None
        val = all_mean(torch.stack(losses).mean(), g.token_world, g.token_group).item()
        self.metrics.log(step, {"step": step, "val_loss": val})
        if self.rt.env.rank == 0:
            print(f"step {step} | val_loss {val:.4f}", flush=True)
        return val


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def max_over_ranks(value: float, device: torch.device, world: int) -> float:
    """The largest of every rank's `value` (the fullest rank's peak memory: pipeline stages differ)."""
    x = torch.tensor([value], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x)


class ProgressLog:
    """A step's metrics (metrics.jsonl, TensorBoard, the console line) every `log.every` steps and at the last,
    timed over the steps since the previous record; the MoE histograms every `log.moe_every` steps."""

    def __init__(self, rt: Runtime, step: Step, metrics: MetricsWriter, flops_per_token: float, peak_flops: float,
                 start: int):
        self.rt, self.step_fn, self.metrics = rt, step, metrics
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.start, self.t0 = start, time.perf_counter()
        lg, env = rt.cfg.log, rt.env
        self.stragglers = (Stragglers(env.rank, env.world, env.device, lg.straggler_factor, lg.straggler_window)
                           if env.world > 1 else None)
        self._restart_window()

    def _restart_window(self) -> None:
        self.window_t, self.window_steps, self.window_tokens = time.perf_counter(), 0, 0

    def count(self, step: int) -> None:
        """Optimizer step `step` (0-based) ran: its tokens count towards the next record's throughput."""
        self.window_tokens += self.rt.batches.size(step) * self.rt.cfg.data.seq_len
        self.window_steps += 1

    def should_log(self, step: int) -> bool:
        return step % self.rt.cfg.log.every == 0 or step == self.rt.cfg.train.steps

    def should_log_moe(self, step: int) -> bool:
        return step % self.rt.cfg.log.moe_every == 0 and self.step_fn.moe_stats is not None

    def __call__(self, step: int, result: dict) -> None:
        """Record the metrics of the `step`-th step (`result`: what Step returned)."""
        rt, cfg = self.rt, self.rt.cfg
        elapsed = time.perf_counter() - self.window_t
        tps = self.window_tokens / elapsed
        mfu = self.flops_per_token * tps / (self.peak_flops * rt.env.world)
        record = {"step": step, "loss": result["loss"], "lr": rt.optimizers.last_lr(),
                  "grad_norm": result["grad_norm"], "tokens_per_sec": tps, "mfu": mfu,
                  "step_time": elapsed / self.window_steps,
                  "peak_mem_gb": max_over_ranks(peak_memory_gb(rt.env.device), rt.env.device, rt.env.world),
                  "batch_size": rt.batches.size(step - 1),
                  "tokens": rt.batches.sequences_before(step) * cfg.data.seq_len}
        record.update({k: v for k, v in result.items() if k not in record})
        if self.stragglers is not None:
            record.update(self.stragglers.record(step, record["step_time"]))
        self.metrics.log(step, record)
        if rt.env.rank == 0:
            left = rt.batches.seconds_left(self.start, step, cfg.train.steps, time.perf_counter() - self.t0)
            print(format_progress(step, cfg.train.steps, result["loss"], tps, mfu, left), flush=True)
        self._restart_window()

    def close(self) -> None:
        """Stop the straggler sampler's thread."""
        if self.stragglers is not None:
            self.stragglers.close()

    def moe(self, step: int) -> None:
        """The routing histograms of the `step`-th step (and the expert biases, where the run moves them)."""
        rt, stats = self.rt, self.step_fn.moe_stats
        bias = None
        if rt.cfg.model.aux_loss_free_bias:
            bias = gathered_expert_bias(rt.moe_layers(), rt.cfg.model, rt.groups.stats)
        self.metrics.log_moe(step, stats.loads, stats.layer_ids, bias)

