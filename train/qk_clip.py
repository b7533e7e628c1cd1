"""QK-clip (Kimi K2's MuonClip, arXiv 2507.20534): after the optimizer step, every attention head whose largest
pre-softmax logit in the step's forward passes exceeded tau has its query and key projections scaled down by
gamma = tau / max_logit, so the same inputs give logits at most tau.

MLA (no QK-norm possible: keys are never materialised per head at inference): the head's compressed query rows
(q_b_proj or q_proj, no-RoPE part) and key rows (kv_b_proj, k_nope part) by sqrt(gamma) each, its RoPE query rows
by gamma, the shared RoPE key (kv_a_proj_with_mqa) untouched: q_nope.k_nope and q_rope.k_rope both scale by gamma.
MHA/GQA/MQA: the query rows of head h by sqrt(gamma_h), the rows of a key head by sqrt of the smallest gamma of
the query heads sharing it (so every head ends at most tau; heads sharing a key with a clipped head are clipped a
little too).

The logits are measured in the training forward by the attention core, on the whole sequences it attends over
(model/attention.py `max_logits`: an extra no-grad q.k^T in blocks). Where a rank holds a share of the heads
(tensor parallelism; context parallelism's Ulysses core, whole sequences for H/cp heads), the shares are
gathered in head order (`head_group`); the maximum is taken over the ranks with other tokens (`token_group`).
A sharded weight is gathered whole, rescaled and re-split, on the steps where a head clips.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from model.attention import MLA, Attention

from .muon import shard_of


def attention_modules(parts: list[nn.Module]) -> list[nn.Module]:
    return [m for part in parts for m in part.modules() if isinstance(m, (MLA, Attention))]


def track_max_logits(parts: list[nn.Module], on: bool) -> None:
    for m in attention_modules(parts):
        m.track_max_logits = on
        m.max_logits = None


def _scale_rows(weight: torch.Tensor, scale: torch.Tensor) -> None:
    """weight [out, in] *= scale [out] per row, in place; a DTensor gathered whole, scaled and re-split."""
    if not isinstance(weight, DTensor):
        weight.mul_(scale[:, None].to(weight.dtype))
        return
    whole = weight.full_tensor() * scale[:, None].to(weight.dtype)
    weight.to_local().copy_(shard_of(whole, weight))


def mla_row_scales(gamma: torch.Tensor, nope: int, rope: int, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query rows [H*(N+R)], key/value rows [H*(N+V)]) scale factors of per-head gamma [H]."""
    root = gamma.sqrt()[:, None]
    q = torch.cat([root.expand(-1, nope), gamma[:, None].expand(-1, rope)], dim=1)
    kv = torch.cat([root.expand(-1, nope), torch.ones_like(root).expand(-1, v)], dim=1)
    return q.flatten(), kv.flatten()


def rescale(module: nn.Module, gamma: torch.Tensor) -> None:
    """Scale one attention module's query/key projections for per-head gamma [H] (1 = untouched)."""
    cfg = module.cfg
    if isinstance(module, MLA):
        q_rows, kv_rows = mla_row_scales(gamma, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
        q_proj = module.q_proj if cfg.q_lora_rank is None else module.q_b_proj
        _scale_rows(q_proj.weight, q_rows)
        _scale_rows(module.kv_b_proj.weight, kv_rows)
        return
    hd, kv_heads = cfg.attn_head_dim, cfg.kv_heads
    key_gamma = gamma.view(kv_heads, -1).amin(dim=1)  # query head i reads key head i // G
    _scale_rows(module.q_proj.weight, gamma.sqrt().repeat_interleave(hd))
    _scale_rows(module.k_proj.weight, key_gamma.sqrt().repeat_interleave(hd))


def _all_heads(logits: torch.Tensor, head_group) -> torch.Tensor:
    """(layers, H/n) of this rank's heads -> (layers, H): the n ranks of `head_group` hold consecutive heads."""
    if head_group is None:
        return logits
    shares = [torch.empty_like(logits) for _ in range(dist.get_world_size(head_group))]
    dist.all_gather(shares, logits, group=head_group)
    return torch.cat(shares, dim=1)


@torch.no_grad()
def qk_clip(parts: list[nn.Module], tau: float, token_group=None, pp_group=None, head_group=None) -> float:
    """Clip every head over tau after the optimizer step (see the module's doc); the step's largest logit over
    this rank's stages (and the pipeline: `pp_group`). Resets the measurements."""
    modules = [m for m in attention_modules(parts) if m.max_logits is not None]
    if not modules:
        return float("nan")
    logits = _all_heads(torch.stack([m.max_logits for m in modules]), head_group)  # (layers, H)
    if token_group is not None:
        dist.all_reduce(logits, op=dist.ReduceOp.MAX, group=token_group)
    for module, row in zip(modules, logits):
        module.max_logits = None
        gamma = torch.where(row > tau, tau / row, torch.ones_like(row))
        if bool((gamma < 1).any()):
            rescale(module, gamma)
    largest = logits.max().reshape(1)
    if pp_group is not None:
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=pp_group)
    return float(largest)

