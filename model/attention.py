"""Multi-head Latent Attention (DeepSeek-V2 sec. 2.1), and the MHA / GQA / MQA it is compared with.

Shape legend: B batch, T new tokens, S cached tokens, H heads, K K/V heads (local: both read from tensor
shapes so tensor parallelism can shard the projections from outside), G = H / K query heads per K/V head,
C = kv_lora_rank, R = qk_rope_head_dim, N = qk_nope_head_dim, V = v_head_dim, D head width (mha/gqa/mqa).

Training decompresses the latent into full keys/values and runs fused SDPA. Generation caches only the
normalised latent c_KV [B, S, C] and the rotated shared key k_R [B, S, R], and absorbs W_UK into the query
and W_UV into the output, so attention runs directly against the latent cache. `KVCache` holds decompressed
keys and values instead: the cache of MHA/GQA/MQA, and of MLA without absorption (for comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


@dataclass
class KVCache:
    """Per-layer cache of keys k [B, K, max_len, Dk] and values v [B, K, max_len, Dv] (head-major, so attention
    reads each head's cached tokens as one matrix)."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, batch: int, max_len: int, heads: int, k_dim: int, v_dim: int, dtype: torch.dtype,
              device) -> "KVCache":
        return cls(torch.zeros(batch, heads, max_len, k_dim, dtype=dtype, device=device),
                   torch.zeros(batch, heads, max_len, v_dim, dtype=dtype, device=device))

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new tokens' k [B, T, K, Dk], v [B, T, K, Dv] at [start, start+T); return everything cached so far."""
        end = start + k.shape[1]
        self.k[:, :, start:end] = k.transpose(1, 2)
        self.v[:, :, start:end] = v.transpose(1, 2)
        return self.k[:, :, :end], self.v[:, :, :end]


def _hidden_mask(t: int, s: int, start: int, device, pad: torch.Tensor | None = None) -> torch.Tensor:
    """[T, S] True where new token i (at position start + i) would read a later position. With left padding
    pad [B] (row b's first pad[b] positions): [B, 1, T, S], the padding also hidden from every query but itself
    (so no row is all -inf)."""
    hidden = torch.ones(t, s, dtype=torch.bool, device=device).triu(start + 1)
    if pad is None:
        return hidden
    keys = torch.arange(s, device=device)
    itself = keys[None, :] == (start + torch.arange(t, device=device))[:, None]  # (T, S)
    return hidden | ((keys[None, None, :] < pad[:, None, None]) & ~itself)[:, None]  # (B, 1, T, S)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start: int,
                     pad: torch.Tensor | None = None) -> torch.Tensor:
    """New tokens' queries q [B, T, H, Dk] at positions [start, start+T) against cached k [B, K, S, Dk] and
    v [B, K, S, Dv] -> [B, T, H, Dv]; query head i reads K/V head i // G (softmax in fp32); pad as _hidden_mask."""
    b, t, h, _ = q.shape
    kv, s = k.shape[1], k.shape[2]
    qg = q.unflatten(2, (kv, h // kv)).permute(0, 2, 3, 1, 4).flatten(2, 3)  # (B, K, G*T, Dk): rows g-major
    scores = (qg @ k.transpose(-1, -2)).float() * scale  # (B, K, G*T, S)
    hidden = _hidden_mask(t, s, start, q.device, pad)
    hidden = hidden.repeat(h // kv, 1) if pad is None else hidden.repeat(1, 1, h // kv, 1)
    scores = scores.masked_fill(hidden, float("-inf"))
    out = scores.softmax(-1).type_as(q) @ v  # (B, K, G*T, Dv)
    return out.unflatten(2, (h // kv, t)).permute(0, 3, 1, 2, 4).flatten(2, 3)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Fused causal SDPA: q [B, T, H, Dk], k [B, T, K, Dk], v [B, T, K, V] -> [B, T, H, V]; K divides H and query
    head i reads K/V head i // G (grouped-query; MLA and MHA have K = H). `observe(q, k)`, when given, sees the
    queries and keys first (QK-clip's measurement)."""
    if observe is not None:
        observe(q, k)
    group = q.shape[2] // k.shape[2]
    if group > 1:  # each K/V head repeated for its G query heads (contiguous, as the projections' head order)
        k, v = (x.unsqueeze(3).expand(-1, -1, -1, group, -1).flatten(2, 3) for x in (k, v))
    dv = v.shape[-1]
    pad = q.shape[-1] - dv
    if pad > 0:  # fused (flash) SDPA kernels need equal q/k/v head widths: zero-pad v, slice the output
        v = F.pad(v, (0, pad))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, scale=scale)  # (B, H, T, N+R)
    return out[..., :dv].transpose(1, 2)


@torch.no_grad()
def max_logits(q: torch.Tensor, k: torch.Tensor, scale: float, block: int = 256) -> torch.Tensor:
    """The largest causal pre-softmax logit scale * q.k of each query head [H] over the batch: q [B, T, H, D],
    k [B, T, K, D] (query head i reads K/V head i // G). Query rows in blocks of `block` against the keys up to the
    block's end, in fp32: B*H*block*T floats at a time, about half the FLOPs of the attention's q.k^T."""
    t, group = q.shape[1], q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2).float()  # (B, H, T, D)
    kh = k.transpose(1, 2).float().repeat_interleave(group, 1)  # (B, H, T, D)
    best = torch.full((q.shape[2],), float("-inf"), device=q.device)
    for start in range(0, t, block):
        end = min(start + block, t)
        scores = qh[:, :, start:end] @ kh[:, :, :end].transpose(-1, -2)  # (B, H, b, end)
        hidden = torch.ones(end - start, end, dtype=torch.bool, device=q.device).triu(start + 1)
        best = torch.maximum(best, scores.masked_fill(hidden, float("-inf")).amax(dim=(0, 2, 3)) * scale)
    return best


def _observer(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """While the module tracks them (QK-clip), what its attention core calls with the q, k it attends over: keeps
    the running maximum over a step's forwards of each of those heads' largest logit. None otherwise."""
    if not module.track_max_logits:
        return None

    def observe(q: torch.Tensor, k: torch.Tensor) -> None:
        m = max_logits(q, k, module.scale)
        module.max_logits = m if module.max_logits is None else torch.maximum(module.max_logits, m)
    return observe


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
        self.attend: Callable[..., torch.Tensor] = causal_attention
        # QK-clip (MuonClip): the training forward records each head's largest logit [H] while this is set
        self.track_max_logits = False
        self.max_logits: torch.Tensor | None = None

    def up_projections(self) -> list[nn.Linear]:
        """The projections whose outputs are per head (large, cheap to recompute): query and KV up-projections."""
        return [self.q_proj if self.cfg.q_lora_rank is None else self.q_b_proj, self.kv_b_proj]

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
        k, v = self._decompressed(*self._latent(x, cos, sin))
        q = torch.cat([q_nope, q_rope], dim=-1)
        return self.o_proj(self.attend(q, k, v, self.scale, _observer(self)).flatten(2))  # (B,T,H,V) -> (B,T,H*V)

    def _decompressed(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys [B, T, H, N+R] and values [B, T, H, V] from the latent and the shared rotary key."""
        kv = self.kv_b_proj(c_kv).unflatten(-1, (-1, self.cfg.qk_nope_head_dim + self.cfg.v_head_dim))
        k_nope, v = kv.split([self.cfg.qk_nope_head_dim, self.cfg.v_head_dim], dim=-1)  # (B, T, H, N|V)
        return torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)], dim=-1), v

    def decode(self, x: torch.Tensor, cos, sin, cache: LatentKVCache | KVCache, start: int,
               pad: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of new tokens x [B, T, D] at positions [start, start+T) against the cache: absorbed against a
        LatentKVCache, or against decompressed keys/values in a KVCache (more memory, the same numbers); pad [B]:
        left padding of each row (_hidden_mask)."""
        q_nope, q_rope = self._queries(x, cos, sin)
        c_new, k_new = self._latent(x, cos, sin)
        if isinstance(cache, KVCache):
            k, v = cache.write(start, *self._decompressed(c_new, k_new))
            out = cached_attention(torch.cat([q_nope, q_rope], dim=-1), k, v, self.scale, start, pad)
            return self.o_proj(out.flatten(2))
        c_kv, k_rope = cache.write(start, c_new, k_new)  # (B, S, C), (B, S, R)
        n, v = self.cfg.qk_nope_head_dim, self.cfg.v_head_dim
        w = self.kv_b_proj.weight.unflatten(0, (-1, n + v))  # (H, N+V, C)
        w_uk, w_uv = w[:, :n], w[:, n:]
        q_latent = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # W_UK folded into the query
        scores = torch.einsum("bthc,bsc->bhts", q_latent, c_kv) + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)
        future = _hidden_mask(x.shape[1], c_kv.shape[1], start, x.device, pad)
        probs = (scores.float() * self.scale).masked_fill(future, float("-inf")).softmax(-1).type_as(q_latent)
        o_latent = torch.einsum("bhts,bsc->bthc", probs, c_kv)
        out = torch.einsum("bthc,hvc->bthv", o_latent, w_uv)  # W_UV folded into the output
        return self.o_proj(out.flatten(2))


class Attention(nn.Module):
    """Multi-head (mha), grouped-query (gqa) and multi-query (mqa) attention: q/k/v/o projections (Llama-style
    names), RoPE over the whole head, scores scaled by 1/sqrt(D); K/V heads cfg.kv_heads (H, K, 1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, kv, hd, d = cfg.num_attention_heads, cfg.kv_heads, cfg.attn_head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        self.scale = softmax_scale(cfg)
        self.attend: Callable[..., torch.Tensor] = causal_attention  # the extension slot of MLA.attend
        self.track_max_logits = False  # as MLA's
        self.max_logits: torch.Tensor | None = None

    def up_projections(self) -> list[nn.Linear]:
        """The projections whose outputs are per head: query, key and value."""
        return [self.q_proj, self.k_proj, self.v_proj]

    def _qkv(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q [B, T, H, D], rotated k [B, T, K, D], v [B, T, K, D]."""
        hd = self.cfg.attn_head_dim
        q, k, v = (proj(x).unflatten(-1, (-1, hd)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over x [B, T, D] (training / full-sequence path)."""
        q, k, v = self._qkv(x, cos, sin)
        return self.o_proj(self.attend(q, k, v, self.scale, _observer(self)).flatten(2))

    def decode(self, x: torch.Tensor, cos, sin, cache: KVCache, start: int,
               pad: torch.Tensor | None = None) -> torch.Tensor:
        """New tokens x [B, T, D] at positions [start, start+T) against the K/V cache (pad: _hidden_mask)."""
        q, k_new, v_new = self._qkv(x, cos, sin)
        k, v = cache.write(start, k_new, v_new)
        return self.o_proj(cached_attention(q, k, v, self.scale, start, pad).flatten(2))


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MLA(cfg) if cfg.attention == "mla" else Attention(cfg)


def new_layer_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device,
                    latent: bool = True) -> LatentKVCache | KVCache:
    """One layer's generation cache: MLA's latent cache (or, latent=False, its decompressed keys/values), or the
    K/V cache of mha/gqa/mqa."""
    if cfg.attention != "mla":
        hd = cfg.attn_head_dim
        return KVCache.empty(batch, max_len, cfg.kv_heads, hd, hd, dtype, device)
    if latent:
        return LatentKVCache.empty(cfg, batch, max_len, dtype, device)
    return KVCache.empty(batch, max_len, cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim, dtype, device)
