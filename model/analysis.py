"""Analytic counts for a ModelConfig: parameters (total / activated), KV-cache size, training FLOPs.

Everything here is arithmetic on the config (no model is built), so the planner and the MFU meter can
use it for any preset; tests check each number against a direct count on a built model.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    """Weights of one attention layer (norm scales included) for cfg.attention."""
    h, d = cfg.num_attention_heads, cfg.hidden_size
    if cfg.attention != "mla":  # q, k, v, o
        return 2 * d * h * cfg.attn_head_dim + 2 * d * cfg.kv_heads * cfg.attn_head_dim
    if cfg.q_lora_rank is None:
        q = d * h * cfg.qk_head_dim
    else:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + h * cfg.v_head_dim * d


def mlp_params(dim: int, hidden: int) -> int:
    return 3 * dim * hidden


@dataclass(frozen=True)
class ParamCounts:
    total: int  # main model, without MTP
    # parameters one token touches, DeepSeek's convention: the input embedding table is not counted
    # (a lookup, not compute); the output head is. This reproduces the papers' 21B (V2) and 37B (V3).
    active: int
    routed_experts: int
    mtp: int  # the multi-token-prediction modules (their embedding/head are shared, not counted)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d = cfg.hidden_size
    norms = 2 * d
    dense_layer = attention_params(cfg) + mlp_params(d, cfg.intermediate_size) + norms
    expert = mlp_params(d, cfg.moe_intermediate_size)
    routed = cfg.n_routed_experts * expert
    moe_fixed = attention_params(cfg) + cfg.n_shared_experts * expert + cfg.n_routed_experts * d + norms
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    n_dense = cfg.num_hidden_layers - n_moe
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    outer = cfg.vocab_size * d + head + d
    total = outer + n_dense * dense_layer + n_moe * (moe_fixed + routed)
    active = outer - cfg.vocab_size * d + n_dense * dense_layer + n_moe * (moe_fixed + cfg.num_experts_per_tok * expert)
    mtp_block = moe_fixed + routed if cfg.is_moe_layer(cfg.num_hidden_layers) else dense_layer
    mtp = cfg.num_nextn_predict_layers * (mtp_block + 2 * d * d + 3 * d)
    return ParamCounts(total, active, n_moe * routed, mtp)


KV_CACHES = ("mla", "mla_decompressed", "mha", "gqa", "mqa")


def kv_cache_elements(cfg: ModelConfig, kind: str | None = None) -> int:
    """Cached elements per token per layer of cfg's attention (kind None) or of `kind`: mla C + R (the absorbed
    latent cache), mla_decompressed H * (N + R + V), mha/gqa/mqa 2 * K/V heads * head width."""
    kind = kind or cfg.attention
    if kind == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    if kind == "mla_decompressed":
        return cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    if kind not in KV_CACHES:
        raise ValueError(f"KV cache kind must be one of {KV_CACHES}, got {kind!r}")
    return 2 * cfg.kv_heads * cfg.attn_head_dim


def attention_core_widths(cfg: ModelConfig) -> tuple[int, int]:
    """(query/key, value) width per head in the attention core: MLA N + R and V, the head width otherwise."""
    if cfg.attention == "mla":
        return cfg.qk_head_dim, cfg.v_head_dim
    return cfg.attn_head_dim, cfg.attn_head_dim


def kv_cache_elements_per_token(cfg: ModelConfig) -> tuple[int, int]:
    """(MLA, MHA of the same shape) cached elements per token per layer: C + R vs 2 * heads * head_dim."""
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim, 2 * cfg.num_attention_heads * cfg.v_head_dim


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2) -> tuple[int, int]:
    """(MLA, MHA) KV-cache bytes per token over all layers (BF16 by default)."""
    mla, mha = kv_cache_elements_per_token(cfg)
    n = cfg.num_hidden_layers * bytes_per_element
    return mla * n, mha * n


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token: 2 x (activated matmul weights, router and head included) + attention scores.

    Attention: QK^T and PV cost 2*H*(query/key + value width) per attended key; a causal token attends
    (T+1)/2 keys on average (`causal=False` counts all T, as a dense kernel does).
    """
    p = param_counts(cfg)
    d = cfg.hidden_size
    latent_norms = cfg.kv_lora_rank + (cfg.q_lora_rank or 0) if cfg.attention == "mla" else 0
    norms = d + cfg.num_hidden_layers * 2 * d + cfg.num_hidden_layers * latent_norms
    matmul_params = p.active - norms  # (the embedding is already excluded from `active`; norms are not GEMMs)
    keys = (seq_len + 1) / 2 if causal else seq_len
    attn = 2 * cfg.num_attention_heads * sum(attention_core_widths(cfg)) * keys * cfg.num_hidden_layers
    return 2.0 * matmul_params + attn


def training_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward + backward (2x forward) FLOPs per trained token; MTP depths add one block + head each."""
    fwd = forward_flops_per_token(cfg, seq_len, causal)
    if cfg.num_nextn_predict_layers:
        per_depth = forward_flops_per_token(cfg.replace(num_hidden_layers=1, first_k_dense_replace=0,
                                                        num_nextn_predict_layers=0), seq_len, causal)
        fwd += cfg.num_nextn_predict_layers * (per_depth + 2 * 2 * cfg.hidden_size ** 2)
    return 3.0 * fwd
