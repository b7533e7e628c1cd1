"""Everything applied to a model to run it at scale. `parallelize` is the one place that wraps the model.

Implemented: data parallelism with FSDP2 (`fully_shard` per block, then the root), HSDP when
dp_replicate > 1, mixed precision (fp32 master weights, bf16 compute, fp32 reductions) and CPU offload.
Tensor, expert and pipeline parallelism are validated here but not yet built: asking for them is a
clear error rather than a silent single-device run.
"""

from __future__ import annotations

import torch
from torch import nn

from .dims import LayoutError, ParallelDims

__all__ = ["LayoutError", "ParallelDims", "parallelize", "dp_mesh"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dp_mesh(mesh):
    """The data-parallel sub-mesh: 2-D (replicate, shard) for HSDP, 1-D for FSDP."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def parallelize(model: nn.Module, mesh, dims: ParallelDims, param_dtype: str = "float32",
                reduce_dtype: str = "float32", cpu_offload: bool = False) -> nn.Module:
    """Apply the parallel layout to a model built on the meta device (before `to_empty`/`init_weights`)."""
    unsupported = {k: v for k, v in (("tp", dims.tp), ("ep", dims.ep), ("pp", dims.pp)) if v > 1}
    if unsupported:
        raise LayoutError(f"parallel sizes {unsupported} are not implemented yet; this build supports data "
                          f"parallelism (dp_shard, dp_replicate) only")
    if mesh is None or dims.dp == 1:
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kwargs = {"mesh": dp_mesh(mesh),
              "mp_policy": MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype])}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in model.layers.values():
        fully_shard(block, **kwargs)
    for module in model.mtp or []:
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    register_fsdp_forward_method(model, "forward_with_mtp")  # the root's params are gathered for it too
    return model
