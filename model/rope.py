"""Rotary position embedding with DeepSeek's YaRN extension.

Shape legend: B batch, T tokens, H heads, R = rotary width (`ModelConfig.rope_dim`: MLA's qk_rope_head_dim,
the whole head for mha/gqa/mqa; even).

Layout: rotary pairs are *interleaved* — (x[2i], x[2i+1]) is rotated by angle pos * inv_freq[i] — as in
DeepSeek's own checkpoints and transformers' DeepseekV2 (which treats the pairs as complex numbers).
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_nope + qk_rope) (MLA; the head width otherwise), times mscale(factor, mscale_all_dim)^2 under
    YaRN (DeepSeek-V2 sec. 2.1)."""
    scale = (cfg.qk_head_dim if cfg.attention == "mla" else cfg.attn_head_dim) ** -0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.get("mscale_all_dim"):
        m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
        scale = scale * m * m
    return scale


def _yarn_inv_freq(cfg: ModelConfig, base_inv_freq: torch.Tensor) -> tuple[torch.Tensor, float]:
    rs = cfg.rope_scaling
    dim = cfg.rope_dim
    factor = float(rs["factor"])
    orig_len = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)

    def correction_dim(num_rotations: float) -> float:
        # the dimension index whose wavelength completes `num_rotations` turns over the original length
        return dim * math.log(orig_len / (num_rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1: keep the original frequency (high-frequency dims)
    inv_freq = base_inv_freq / factor * ramp + base_inv_freq * extrapolate
    # cos/sin are scaled by mscale / mscale_all_dim (1.0 when the two are equal, as in V2 and V3)
    attn_factor = yarn_mscale(factor, rs.get("mscale", 1.0)) / yarn_mscale(factor, rs.get("mscale_all_dim", 1.0)) \
        if rs.get("mscale") and rs.get("mscale_all_dim") else yarn_mscale(factor)
    return inv_freq, attn_factor


def inv_freq_and_scale(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies [R/2] (fp32, on CPU) and the cos/sin magnitude."""
    dim = cfg.rope_dim
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.rope_scaling is None:
        return base, 1.0
    return _yarn_inv_freq(cfg, base)


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, R/2] (fp32) for integer positions [T]."""
    inv_freq, scale = inv_freq_and_scale(cfg)
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, H, R] by cos/sin [T, R/2]; computed in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, R/2, 2)
    x_even, x_odd = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    out = torch.stack((x_even * c - x_odd * s, x_even * s + x_odd * c), dim=-1)
    return out.flatten(-2).type_as(x)
