"""Expert parallelism: routed experts sharded by expert over the `ep` mesh axis, tokens moved by all-to-all.

The model's MoE sorts its (token, expert) assignments by global expert id and calls
`experts(x_sorted, counts_per_expert)`. Expert parallelism wraps exactly that call with two hooks, so the
model code is unchanged:

  pre-hook   counts [E] -> per-rank send sizes; all-to-all the counts (how many rows of each of my local
             experts every rank will send me), then the rows themselves; reorder the received rows
             (source rank major) to local-expert major for the grouped GEMM.
  post-hook  undo the reorder and all-to-all the results back to the ranks that own the tokens.

Both all-to-alls are autograd functions (backward is the reverse all-to-all), sizes may be uneven or zero.
Rank r owns experts [r*E/ep, (r+1)*E/ep): with group-limited routing and n_group a multiple of ep, a group
never spans two ranks, so a token reaches at most `topk_group` ranks (DeepSeek-V2's device-limited routing).

Expert weights become DTensors sharded on dim 0 over `ep`; `GroupedExperts` runs on their local part.
Their gradients sum the contributions of every rank's tokens, so data-parallel averaging must divide by the
whole data-parallel degree, not just the ranks that hold copies of the same experts (see `parallelize`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllToAll(torch.autograd.Function):
    """Rows of x split by `send` sizes to each rank; returns rows received, `recv` sizes from each rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int], group, label: str) -> torch.Tensor:
        ctx.sizes, ctx.group, ctx.label = (recv, send), group, label  # label: a failure report names it
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        recv, send = ctx.sizes
        dx = grad.new_empty(sum(send), *grad.shape[1:])
        dist.all_to_all_single(dx, grad.contiguous(), send, recv, group=ctx.group)
        return dx, None, None, None, None


def all_to_all(x: torch.Tensor, recv: list[int], send: list[int], group, label: str = "") -> torch.Tensor:
    return _AllToAll.apply(x, recv, send, group, label)


class ExpertDispatch:
    """The pre/post forward hooks of one GroupedExperts module under expert parallelism.

    The state between pre and post (split sizes, permutation) belongs to the call in flight; a module's
    forward is never re-entered, and activation-checkpoint recomputation reruns pre before post.
    """

    def __init__(self, group, n_experts: int, label: str = ""):
        self.group = group
        self.label = label  # "MoE layer 3": what a report of a failed all-to-all names (train/watch.py)
        self.ep = dist.get_world_size(group)
        self.n_local = n_experts // self.ep
        self._pending: tuple[list[int], list[int], torch.Tensor] | None = None
        self.sent_rows = 0  # rows this rank has sent to other ranks' experts so far (for the bench)

    def pre(self, module: nn.Module, args: tuple) -> tuple:
        x, counts = args
        counts = counts.to(torch.int64)
        recv_counts = torch.empty_like(counts)  # [ep * n_local]: rows per (source rank, local expert)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send = counts.view(self.ep, -1).sum(1).tolist()
        recv_by_src = recv_counts.view(self.ep, self.n_local)
        recv = recv_by_src.sum(1).tolist()
        rows = all_to_all(x, recv, send, self.group, self.label)
        local_expert = torch.arange(self.n_local, device=x.device).repeat(self.ep)
        order = torch.repeat_interleave(local_expert, recv_counts).argsort(stable=True)
        self._pending = (recv, send, order)
        me = dist.get_rank(self.group)
        self.sent_rows += sum(send) - send[me]
        return rows[order], recv_by_src.sum(0)

    def post(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        recv, send, order = self._pending
        self._pending = None
        by_source = torch.empty_like(out).index_copy(0, order, out)  # back to source-rank-major order
        return all_to_all(by_source, send, recv, self.group, self.label)


def apply_ep(model: nn.Module, ep_mesh) -> list[ExpertDispatch]:
    """Shard every routed-expert stack of `model` by expert over `ep_mesh` and install the dispatch hooks."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from model.moe import MoE

    dispatchers = []
    for path, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        label = f"MoE layer {path.split('.')[1]}" if path.startswith("layers.") else f"MoE {path}"
        experts = module.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)])
            experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        dispatch = ExpertDispatch(ep_mesh.get_group(), module.cfg.n_routed_experts, label)
        experts.register_forward_pre_hook(dispatch.pre)
        experts.register_forward_hook(dispatch.post)
        dispatchers.append(dispatch)
    return dispatchers


def reduce_loads_over(group):
    """A `MoE.reduce_counts` function: the sum of a count vector over the data-parallel ranks."""
    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t
    return reduce_sum
