"""Small building blocks: RMSNorm and the SwiGLU feed-forward used by dense layers and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, then scaled (transformers' DeepseekV2RMSNorm order). The output has
    the input's dtype: a bf16 input under autocast gives the bf16 product that autocast would hand the next
    GEMM anyway, without an fp32 copy in between."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return (self.weight * normed).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Separate gate/up so tensor parallelism shards them column-wise."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
