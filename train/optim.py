"""AdamW with DeepSeek's defaults and the learning-rate schedules (warmup + cosine, warmup + step decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


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


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # the fused kernel is several times faster than the foreach one on CPU (measured: 41 vs 349 ms per
    # step for the `small` preset); sharded (DTensor) parameters use foreach
    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             **({"foreach": True} if sharded else {"fused": True}))


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based) of `total`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "deepseek_step":
        # DeepSeek-V2: multiply by 0.316 after ~60% and again after ~90% of training
        passed = sum(step >= frac * total for frac in cfg.step_decay_at)
        return cfg.step_decay_factor ** passed
    span = max(total - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))


class PartOptimizers:
    """One AdamW and one lr schedule per model part (a rank holds several parts under pipeline
    parallelism: its stages), stepped together. One optimizer per part keeps every optimizer's state keyed
    by its part's parameter names, which is what makes checkpoints layout-independent."""

    def __init__(self, parts: list[nn.Module], cfg: OptimConfig, total_steps: int):
        self.optimizers = [build_optimizer(part, cfg) for part in parts]
        self.schedulers = [build_scheduler(opt, cfg, total_steps) for opt in self.optimizers]

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
