"""Activation checkpointing and per-block torch.compile.

Modes (`parallel.activation_checkpoint`):
  none       keep every activation.
  full       recompute each whole block (attention + MLP/MoE) in backward; only block inputs are kept.
  selective  DeepSeek-V3's choice: recompute every RMSNorm and the MLA up-projections (q_b_proj /
             q_proj, kv_b_proj) in backward, whose outputs are large (heads x head_dim per token) and
             cheap to recompute; for mha/gqa/mqa the q/k/v projections in their place; everything else
             is kept.

Recomputation is torch's composable activation checkpointing: forward hooks on the module instances, which
neither wrap them in new modules nor replace their forward, so parameter names (and so checkpoints) are
unchanged. Recomputation reruns a MoE layer's forward inside backward: the MoE skips its load statistics
there (see `MoE._record`), and the expert all-to-alls run again, in the same order on every rank (the backward
order).
"""

from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint

MODES = ("none", "full", "selective")


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
            checkpoint(module)


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each block (the routed-expert grouped GEMMs stay eager: see model.moe.grouped_mm)."""
    for block in _blocks(model):
        block.compile(backend=backend)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a model (part), those of its MTP depths included."""
    return list(model.layers.values()) + [m.block for m in getattr(model, "mtp", None) or []]
