"""bf16 GEMMs computed in fp32 on CPUs without bf16 matrix units (`precision.bf16_gemm_emulate=true`).

A bf16 GEMM on a GPU multiplies bf16 operands, accumulates the products in fp32 and rounds the result to bf16.
The product of two bf16 numbers (8-bit significands) is exact in fp32, so the same GEMM computed by an fp32
kernel on the bf16 operands, rounded to bf16, gives the same numbers up to the order of the fp32 summation.
CPUs without AVX512-BF16 or AMX run torch's bf16 GEMMs some 60x slower than fp32 (a 4096x512 @ 512x1408 mm:
2.5 s against 0.037 s on the 2-core development machine), which puts bf16 training runs out of reach there;
under this mode they run at fp32 GEMM speed. Only the GEMMs change: norms, softmax, the attention core and
every elementwise op still compute in bf16, and the autocast / FSDP casts that put operands in bf16 are the
same as without the mode.

The mode works at the dispatcher (below autograd), so it sees the backward GEMMs (dgrad, wgrad) as well as
the forward ones, provided backward runs inside it. DTensor operands (tensor parallelism) are upcast as
DTensors, so the local GEMM runs in fp32; other tensor subclasses (torchao's FP8 tensors, alone or as a DTensor's
local shard) are handed to their own dispatch, whose GEMMs on plain tensors then reach the mode.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
GEMMS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                   aten._grouped_mm.default})


def _wraps_subclass(x) -> bool:
    """A DTensor whose local shard is itself a tensor subclass (tensor parallelism around torchao's FP8)."""
    return isinstance(x, DTensor) and type(x._local_tensor) is not torch.Tensor


def _upcast(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x


class Bf16GemmEmulation(TorchDispatchMode):
    """Within the context every GEMM with bf16 operands computes in fp32 and returns its result rounded to bf16."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in GEMMS:
            return func(*args, **kwargs)
        if FakeTensor in types:  # shapes only (DTensor's sharding propagation): nothing to compute
            return func(*args, **kwargs)
        if any(t not in (torch.Tensor, DTensor) for t in types) or any(map(_wraps_subclass, args)):
            return NotImplemented  # e.g. torchao's FP8 tensors (also inside DTensors under tensor parallelism):
            # their own GEMMs on plain tensors come back here
        if not any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            return func(*args, **kwargs)
        out_dtype = kwargs.pop("out_dtype", None) or torch.bfloat16
        result = func(*[_upcast(a) for a in args], **kwargs)
        return result.to(out_dtype)
