"""AdamW with DeepSeek's defaults and the learning-rate schedules (warmup + cosine, warmup + step decay)."""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import nn

from torch.distributed.tensor import DTensor

from model.config import TORCH_DTYPES

from .config import OptimConfig

log = logging.getLogger("train")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Decay matrices (attention, MLP, experts, router, head); not norms, biases or the embedding table."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embed_tokens" in name
        (no_decay if exempt and not cfg.decay_norms_and_embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class AdamWLowPrecisionMoments(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) whose moments are stored in `moment_dtype` (bf16, as
    DeepSeek-V3) while parameters stay fp32: each step reads the moments in fp32, updates, rounds them back.
    State keys are torch.optim.AdamW's, so checkpoints keep their layout."""

    def __init__(self, params, lr: float, betas: tuple, eps: float, weight_decay: float = 0.0,
                 moment_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.moment_dtype = moment_dtype

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts every state tensor to its parameter's dtype (fp32): cast the moments back, or a
        resumed run would keep fp32 moments (twice the memory, and no longer rounded as the run before)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moment_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, self.state[p], group)

    def _update(self, p: torch.Tensor, state: dict, group: dict) -> None:
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
        (b1, b2), lr, grad = group["betas"], group["lr"], p.grad.float()
        state["step"] += 1
        t = float(state["step"])
        m = state["exp_avg"].float().lerp_(grad, 1 - b1)
        v = state["exp_avg_sq"].float().mul_(b2).addcmul_(grad, grad, value=1 - b2)
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)
        p.mul_(1 - lr * group["weight_decay"])
        denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"])
        p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


def build_optimizer(model: nn.Module, cfg: OptimConfig, moment_dtype: str = "float32",
                    cpu_adam: bool = False) -> torch.optim.Optimizer:
    """AdamW over `model`'s parameter groups: with moments in `moment_dtype`, or by DeepSpeed's CPU kernel
    (`cpu_adam`: parameters offloaded to host memory, fp32 moments), or torch's; optim.name=muon: train/muon.py."""
    if cfg.name == "muon":
        from .muon import build_muon
        return build_muon(model, cfg, TORCH_DTYPES[moment_dtype])
    if cpu_adam and moment_dtype == "float32":
        from .cpu_adam import OffloadAdamW  # imports DeepSpeed
        return OffloadAdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if moment_dtype != "float32":
        return AdamWLowPrecisionMoments(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                        moment_dtype=TORCH_DTYPES[moment_dtype])
    # the fused kernel is several times faster than the foreach one on CPU (measured: 41 vs 349 ms per
    # step for the `small` preset); sharded (DTensor) parameters use foreach
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             **({"foreach": True} if sharded else {"fused": True}))


def _cpu_adam_usable() -> bool:
    """Whether DeepSpeed's CPU Adam kernel loads (built at first use); one warning when it does not."""
    try:
        from .cpu_adam import cpu_adam_problem
        problem = cpu_adam_problem()
    except Exception as e:  # DeepSpeed missing or broken
        problem = f"{type(e).__name__}: {e}".splitlines()[0]
    if problem:
        log.warning("parallel.cpu_offload: DeepSpeedCPUAdam is unavailable (%s); stepping with torch's AdamW", problem)
    return problem is None


def lr_factor(step: int, total: int, cfg: OptimConfig, position: Callable[[int], float] | None = None) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based) of `total`.

    Warmup counts steps (DeepSeek: "the first 2K steps"); everything after it is placed by `position(step)`, the
    tokens consumed before the step counted in steps of the final batch (train.schedule.RunPosition): the step
    itself when the batch is constant, less under a batch-size ramp-up, so that DeepSeek's fractions of the
    training tokens stay fractions of tokens.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    pos = position or float
    x, end = pos(step), pos(total)
    if cfg.schedule == "deepseek_step":
        # DeepSeek-V2: multiply by 0.316 after ~60% and again after ~90% of training
        return _step_decays(x, end, cfg)
    if cfg.schedule == "deepseek_v3":
        # DeepSeek-V3: constant, then a cosine to min_lr_ratio over cosine_span, constant again; the step decays
        # of its last tokens (2.2e-4 -> 2.2e-5 from 10T to 14.3T of 14.8T tokens, 7.3e-6 for the last 167B)
        start, stop = cfg.cosine_span[0] * end, cfg.cosine_span[1] * end
        progress = 0.0 if x < start else 1.0 if x >= stop else (x - start) / (stop - start)
        return _cosine(progress, cfg.min_lr_ratio) * _step_decays(x, end, cfg)
    first = pos(cfg.warmup_steps)
    return _cosine(min((x - first) / max(end - first, 1), 1.0), cfg.min_lr_ratio)


def _cosine(progress: float, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _step_decays(x: float, end: float, cfg: OptimConfig) -> float:
    return cfg.step_decay_factor ** sum(x >= frac * end for frac in cfg.step_decay_at)


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    position: Callable[[int], float] | None = None):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg, position))


class PartOptimizers:
    """One AdamW and one lr schedule per model part (a rank holds several parts under pipeline
    parallelism: its stages), stepped together. One optimizer per part keeps every optimizer's state keyed
    by its part's parameter names, which is what makes checkpoints layout-independent."""

    def __init__(self, parts: list[nn.Module], cfg: OptimConfig, total_steps: int, moment_dtype: str = "float32",
                 position: Callable[[int], float] | None = None, cpu_offload: bool = False):
        cpu_adam = cpu_offload and cfg.name == "adamw" and _cpu_adam_usable()
        self.optimizers = [build_optimizer(part, cfg, moment_dtype, cpu_adam) for part in parts]
        self.schedulers = [build_scheduler(opt, cfg, total_steps, position) for opt in self.optimizers]

    def step(self) -> None:
        for opt, sched in zip(self.optimizers, self.schedulers):
            opt.step()
            sched.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def last_lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0]

    def scheduler_state(self) -> dict:
        return self.schedulers[0].state_dict()  # the same schedule for every part

    def load_scheduler_state(self, state: dict) -> None:
        for sched in self.schedulers:
            sched.load_state_dict(state)

    def apply_config(self, cfg: OptimConfig) -> None:
        """`cfg`'s hyperparameters onto loaded state: a checkpoint brings back the param groups' lr, betas, eps
        and weight decay and the schedule's peak lr of the config it was written under. The schedule's shape
        already comes from `cfg` (it is code, not state); with an unchanged config this changes no value."""
        for opt, sched in zip(self.optimizers, self.schedulers):
            for i, group in enumerate(opt.param_groups):  # group 0 decays (param_groups), a second does not;
                # Muon's groups say it ("decay")
                group.update(betas=tuple(cfg.betas), eps=cfg.eps, initial_lr=cfg.lr,
                             weight_decay=cfg.weight_decay if group.get("decay", i == 0) else 0.0)
            sched.base_lrs = [cfg.lr] * len(opt.param_groups)
            for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * factor(sched.last_epoch)
            sched._last_lr = [group["lr"] for group in opt.param_groups]
