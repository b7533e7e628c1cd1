"""Multi-head Latent Attention (DeepSeek-V2 sec. 2.1).

Shape legend: B batch, T new tokens, S cached tokens, H heads (local: read from tensor shapes so tensor
parallelism can shard the projections from outside), C = kv_lora_rank, R = qk_rope_head_dim,
N = qk_nope_head_dim, V = v_head_dim.

Training decompresses the latent into full keys/values and runs fused SDPA. Generation caches only the
normalised latent c_KV [B, S, C] and the rotated shared key k_R [B, S, R], and absorbs W_UK into the query
and W_UV into the output, so attention runs directly against the latent cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm
from .rope import apply_rope, softmax_scale


@dataclass
class LatentKVCache:
    """Per-layer latent cache: c_kv [B, max_len, C] and k_rope [B, max_len, R]."""

    c_kv: torch.Tensor
    k_rope: torch.Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device) -> "LatentKVCache":
        return cls(torch.zeros(batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device),
                   torch.zeros(batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device))

    def write(self, start: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens at [start, start+T) and return everything cached so far."""
        end = start + c_kv.shape[1]
        self.c_kv[:, start:end] = c_kv
        self.k_rope[:, start:end] = k_rope
        return self.c_kv[:, :end], self.k_rope[:, :end]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Fused causal SDPA: q, k [B, T, H, N+R], v [B, T, H, V] -> [B, T, H, V]."""
    dv = v.shape[-1]
    pad = q.shape[-1] - dv
    if pad > 0:  # fused (flash) SDPA kernels need equal q/k/v head widths: zero-pad v, slice the output
        v = F.pad(v, (0, pad))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, scale=scale)  # (B, H, T, N+R)
    return out[..., :dv].transpose(1, 2)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.num_attention_heads, cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        # joint KV down-projection plus the decoupled rotary key (shared by all heads), in one GEMM
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=False)
        self.scale = softmax_scale(cfg)
        # the attention core of the training path; context parallelism (parallel/context.py) swaps in one that
        # runs it on whole sequences for a share of the heads
        self.attend = causal_attention

    def _queries(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [B, T, H, N], rotated q_rope [B, T, H, R]."""
        if self.cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (-1, self.cfg.qk_head_dim))
        q_nope, q_rope = q.split([self.cfg.qk_nope_head_dim, self.cfg.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def _latent(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised latent c_KV [B, T, C] and the rotated shared key k_R [B, T, R]."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin).squeeze(2)
        return self.kv_a_layernorm(c_kv), k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over x [B, T, D] (training / full-sequence path)."""
        q_nope, q_rope = self._queries(x, cos, sin)
        c_kv, k_rope = self._latent(x, cos, sin)
        kv = self.kv_b_proj(c_kv).unflatten(-1, (-1, self.cfg.qk_nope_head_dim + self.cfg.v_head_dim))
        k_nope, v = kv.split([self.cfg.qk_nope_head_dim, self.cfg.v_head_dim], dim=-1)  # (B, T, H, N|V)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
        return self.o_proj(self.attend(q, k, v, self.scale).flatten(2))  # (B, T, H, V) -> (B, T, H*V)

    def decode(self, x: torch.Tensor, cos, sin, cache: LatentKVCache, start: int,
               pad: torch.Tensor | None = None) -> torch.Tensor:
        """Absorbed attention of new tokens x [B, T, D] at positions [start, start+T) against the latent cache."""
        q_nope, q_rope = self._queries(x, cos, sin)
        c_new, k_new = self._latent(x, cos, sin)
        c_kv, k_rope = cache.write(start, c_new, k_new)  # (B, S, C), (B, S, R)
        n, v = self.cfg.qk_nope_head_dim, self.cfg.v_head_dim
        w = self.kv_b_proj.weight.unflatten(0, (-1, n + v))  # (H, N+V, C)
        w_uk, w_uv = w[:, :n], w[:, n:]
        q_latent = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # W_UK folded into the query
        scores = torch.einsum("bthc,bsc->bhts", q_latent, c_kv) + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)
        t, s = x.shape[1], c_kv.shape[1]
        future = torch.ones(t, s, dtype=torch.bool, device=x.device).triu(start + 1)  # (T, S)
        if pad is not None:  # left padding (B,): hidden from every query but itself (no row is all -inf)
            keys = torch.arange(s, device=x.device)
            itself = keys[None, :] == (start + torch.arange(t, device=x.device))[:, None]  # (T, S)
            future = future | ((keys[None, None, :] < pad[:, None, None]) & ~itself)[:, None]  # (B, 1, T, S)
        probs = (scores.float() * self.scale).masked_fill(future, float("-inf")).softmax(-1).type_as(q_latent)
        o_latent = torch.einsum("bhts,bsc->bthc", probs, c_kv)
        out = torch.einsum("bthc,hvc->bthv", o_latent, w_uv)  # W_UV folded into the output
        return self.o_proj(out.flatten(2))
