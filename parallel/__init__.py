"""Everything applied to a model to run it at scale. `parallelize` is the one place that wraps the model.

Order (on a model whose weights are initialised whole, or on meta): FP8 GEMMs (parallel/fp8.py), expert
parallelism (shard the expert stacks over "ep", install the all-to-all hooks), tensor + sequence parallelism
(parallel/tensor.py), context parallelism (parallel/context.py), global balance loads, then FSDP2 per block
and the root: dense weights over dp_shard (x cp; HSDP with dp_replicate), expert weights over what dp_shard
leaves after ep (x cp).
Mixed precision: fp32 master weights, `param_dtype` compute, `reduce_dtype` gradient reductions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from torch.distributed.tensor import DTensor

from model.config import TORCH_DTYPES

from .context import apply_cp
from .dims import LayoutError, ParallelDims
from .expert import ExpertDispatch, apply_ep, reduce_loads_over
from .fp8 import Fp8Recipe, convert_to_fp8
from .recompute import apply_activation_checkpointing, apply_compile
from .tensor import apply_tp, tp_loss

__all__ = ["LayoutError", "ParallelDims", "Fp8Recipe", "parallelize", "dp_mesh", "clip_grad_norm_", "tp_loss",
           "micro_batch_sync", "end_of_step"]



def dp_mesh(mesh):
    """The mesh dense weights are sharded over: 2-D (replicate, shard) for HSDP, 1-D for FSDP; the shard axis
    includes the context-parallel ranks."""
    shard = "dp_shard_cp" if mesh["cp"].size() > 1 else "dp_shard"
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", shard]
    return mesh[shard]


def expert_dp_mesh(mesh):
    """The mesh expert weights are sharded over once split by expert over "ep" (and the context-parallel ranks)."""
    shard = "efsdp_cp" if mesh["cp"].size() > 1 else "efsdp"
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", shard]
    return mesh[shard]


def parallelize(model: nn.Module, mesh, dims: ParallelDims, *, param_dtype: str = "float32",
                reduce_dtype: str = "float32", cpu_offload: bool = False, activation_checkpoint: str = "none",
                compile: bool = False, fp8: Fp8Recipe | None = None,
                ep_dispatch: ExpertDispatch = ExpertDispatch()) -> nn.Module:
    """Apply the parallel layout to this process's model (part); activation_checkpoint and compile: see
    parallel/recompute.py; fp8: parallel/fp8.py; ep_dispatch: parallel/expert.py. FSDP wraps every
    distributed model, also with dp == 1 (then it is only the mixed-precision policy)."""
    if fp8 is not None:
        convert_to_fp8(model, fp8)
    if mesh is not None and dims.ep > 1:
        apply_ep(model, mesh, ep_dispatch)
    if mesh is not None and dims.tp > 1:
        apply_tp(model, mesh["tp"], sequence_parallel=True, loss_parallel=True)
    if mesh is not None and dims.cp > 1:
        apply_cp(model, mesh["cp"])
    apply_activation_checkpointing(model, activation_checkpoint)  # after TP/EP, before FSDP
    if compile:
        apply_compile(model)
    if mesh is None:
        return model
    if dims.dp * dims.cp > 1:  # f from every token of the step (all data-parallel and context-parallel ranks)
        reduce = reduce_loads_over(ep_dispatch.on(mesh).route(mesh["dp_cp"].get_group()))
        for moe in model.moe_layers().values():
            moe.reduce_counts = reduce
    _fully_shard(model, mesh, dims, param_dtype, reduce_dtype, cpu_offload)
    return model


def _fully_shard(model, mesh, dims, param_dtype, reduce_dtype, cpu_offload) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=TORCH_DTYPES[param_dtype], reduce_dtype=TORCH_DTYPES[reduce_dtype])
    kwargs = {"mp_policy": policy}
    if cpu_offload:
        # pinned host memory for the copies to and from the GPU; a CPU-only mesh (tests) has nothing to pin for
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu")
    # Under pipeline parallelism, modules stay gathered from their first forward to the end of the step (as
    # in torchtitan): one all-gather per step instead of one per microbatch, and the zero-bubble schedules
    # (ZBV, DualPipeV) need it: their weight-gradient pass runs after FSDP's backward hooks, against the
    # parameters registered then (measured: with resharding, their gradients were wrong).
    kwargs["reshard_after_forward"] = dims.pp == 1
    if param_dtype != "float32":
        _fully_shard_routers(model, mesh, kwargs)
    if dims.ep > 1:
        for moe in model.moe_layers().values():
            experts = fully_shard(moe.experts, mesh=expert_dp_mesh(mesh), **kwargs)
            # an expert's gradient already sums every ep rank's tokens: average over the whole dp (x cp) degree
            experts.set_gradient_divide_factor(float(dims.dp * dims.cp))
            if mesh.device_type == "cpu" and mesh["efsdp_cp" if dims.cp > 1 else "efsdp"].size() > 1:
                # gloo has no PREMUL_SUM, which a divide factor other than the shard group's size needs: sum, then
                # divide (over one shard rank FSDP divides without it; forcing the sum there loses the division)
                experts.set_force_sum_reduction_for_comms(True)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh(mesh), **kwargs)
    for module in model.mtp or []:  # its block; its norms and eh_proj stay with the root, gathered with the head for
        # forward_with_mtp / heads_from_labels, which apply the depth's final norm outside the depth's forward
        fully_shard(module.block, mesh=dp_mesh(mesh), **kwargs)
    kwargs.pop("reshard_after_forward")  # the root keeps FSDP's root default
    fully_shard(model, mesh=dp_mesh(mesh), **kwargs)
    for method in ("forward_with_mtp", "heads_from_labels"):  # the root's params are gathered for these too
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)


def _fully_shard_routers(model, mesh, kwargs) -> None:
    """Each router its own FSDP unit whose parameters are gathered and computed in fp32 (DeepSeek-V3 keeps
    the gating in high precision): under the block's low-precision policy its weight would be rounded to
    bf16 before the fp32 router math. One more (small: experts x hidden) all-gather per MoE layer."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    fp32 = dict(kwargs, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32,
                                                        reduce_dtype=kwargs["mp_policy"].reduce_dtype))
    for moe in model.moe_layers().values():
        fully_shard(moe.gate, mesh=dp_mesh(mesh), **fp32)


def micro_batch_sync(parts: list[nn.Module], dims: ParallelDims, first: bool, last: bool, keep_unsharded: bool) -> None:
    """FSDP2's gradient sync for the next micro-batch of a step (gradient accumulation without pipelining;
    under pipelining torch's schedule defers all of it to the end of the step by itself).

    By default every micro-batch reduce-scatters into the gradient shards, so memory stays sharded, and HSDP's
    all-reduce across replicas waits for the last micro-batch: FSDP2 adds the micro-batches' shards up and
    all-reduces the sum once (the same sum; one all-reduce per step instead of one per micro-batch).
    keep_unsharded (`parallel.accumulate_unsharded`): the blocks stay gathered from the step's first forward
    and the gradients accumulate unsharded (in the reduce dtype) until the last micro-batch: one all-gather
    and one reduce-scatter per step instead of per micro-batch, for the memory of the part's unsharded
    weights and gradients. `end_of_step` restores resharding after forward."""
    for part in parts:
        if keep_unsharded:
            part.set_requires_gradient_sync(last)
            part.set_reshard_after_backward(last)
            for block in _fsdp_blocks(part) if first else ():
                block.set_reshard_after_forward(False, recurse=False)
        if dims.dp_replicate > 1:
            part.set_requires_all_reduce(last)


def end_of_step(parts: list[nn.Module], keep_unsharded: bool) -> None:
    """Back to resharding every block after its forward (evaluation, the next step), after `micro_batch_sync`."""
    if keep_unsharded:
        for part in parts:
            for block in _fsdp_blocks(part):
                block.set_reshard_after_forward(True, recurse=False)


def _fsdp_blocks(part: nn.Module) -> list[nn.Module]:
    """The FSDP units under a model part's root (the root keeps FSDP's own default)."""
    from torch.distributed.fsdp import FSDPModule
    return [m for m in part.modules() if isinstance(m, FSDPModule) and m is not part]


def clip_grad_norm_(parameters, max_norm: float, pp_group=None, duplicates=()) -> float:
    """Global gradient-norm clipping for a mix of plain tensors and DTensors on different meshes
    (dense weights on the dp mesh, experts on (efsdp, ep)): one norm per mesh/placement group, combined,
    then over the pipeline ranks (each holds different layers). `duplicates` (a tied copy of a parameter held
    elsewhere too) are clipped but not counted in the norm."""
    parameters = list(parameters)
    skip = {id(p) for p in duplicates}
    groups: dict = {}
    for p in parameters:
        if p.grad is not None and id(p) not in skip:
            key = (getattr(p.grad, "device_mesh", None), tuple(getattr(p.grad, "placements", ())))
            groups.setdefault(key, []).append(p)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.stack([n.float() for n in norms]).norm() if norms else torch.zeros((), device=_device(groups))
    if pp_group is not None:
        total = total.pow(2)
        dist.all_reduce(total, group=pp_group)
        total = total.sqrt()
    if max_norm != float("inf"):
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        copies = [p for p in parameters if id(p) in skip and p.grad is not None]
        if copies:
            torch.nn.utils.clip_grads_with_norm_(copies, max_norm, total)
    return float(total)


def _device(groups: dict) -> torch.device | None:
    return next((p.device for group in groups.values() for p in group), None)
