"""Activation checkpointing and per-block torch.compile.

Modes (`parallel.activation_checkpoint`):
  none       keep every activation.
  full       recompute each whole block (attention + MLP/MoE) in backward; only block inputs are kept.
  selective  DeepSeek-V3's choice: recompute every RMSNorm and the MLA up-projections (q_b_proj /
             q_proj, kv_b_proj) in backward, whose outputs are large (heads x head_dim per token) and
             cheap to recompute; for mha/gqa/mqa the q/k/v projections in their place; everything else
             is kept.

A recomputed module becomes an instance of a subclass of its own class (`Recomputed<Class>`, the way
torch.nn.utils.parametrize and FSDP2 change a module's class) whose forward runs the class's forward under
torch.utils.checkpoint (non-reentrant): no module is wrapped in a new one, so parameter names (and so
checkpoints) are unchanged, isinstance still holds, and torch.compile traces the checkpoint as it traces any
forward. (torch's composable checkpoint, forward hooks instead, gives compiled blocks whose saved tensors differ
from the recomputed ones under selective recomputation.) Recomputation reruns a MoE layer's forward inside
backward: the MoE skips its load statistics there (see `MoE._record`), and the expert all-to-alls run again, in
the same order on every rank (the backward order).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "full", "selective")


class Recomputed:
    """Placed before a module's class: its forward's activations are recomputed in backward, not kept."""

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


@functools.cache
def recomputed_class(cls: type) -> type:
    """`cls` with its forward recomputed in backward (one class per module class)."""
    return type(f"Recomputed{cls.__name__}", (Recomputed, cls), {})


def _recompute(module: nn.Module) -> None:
    if not isinstance(module, Recomputed):
        module.__class__ = recomputed_class(type(module))


def _selective_targets(block: nn.Module) -> list[nn.Module]:
    from model.layers import RMSNorm

    return [m for m in block.modules() if isinstance(m, RMSNorm)] + block.self_attn.up_projections()


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """In place, on every block of this model (part), MTP blocks included."""
    if mode not in MODES:
        raise ValueError(f"activation_checkpoint={mode!r}; expected one of {MODES}")
    if mode == "none":
        return
    for block in _blocks(model):
        for module in ([block] if mode == "full" else _selective_targets(block)):
            _recompute(module)


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each block (the routed-expert grouped GEMMs stay eager: see model.moe.grouped_mm)."""
    for block in _blocks(model):
        block.compile(backend=backend)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a model (part), those of its MTP depths included."""
    return list(model.layers.values()) + [m.block for m in getattr(model, "mtp", None) or []]
