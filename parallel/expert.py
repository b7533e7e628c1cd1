"""Expert parallelism: routed experts sharded by expert over the `ep` mesh axis, tokens moved by all-to-all.

The model's MoE layer sorts each chunk of its (token, expert) assignments by global expert id and hands the
chunks to its dispatcher (model/moe.py `LocalDispatcher`). Expert parallelism installs `AllToAllDispatcher`:

  dispatch  counts [E] of every chunk -> per-rank send sizes; one all-to-all of all chunks' counts (how many
            rows of each of my local experts every rank will send me), then each chunk's rows.
  compute   reorder a chunk's received rows (source rank major) to local-expert major, run the grouped GEMMs,
            undo the reorder and start the all-to-all that returns the results to the ranks owning the tokens.
  combine   the returned rows.

With `overlap` the row all-to-alls are asynchronous (torch's functional collectives: the result is waited for
at its first use, and so is the gradient's all-to-all in backward): the layer computes its shared experts while
the dispatch is in flight, chunk c's expert GEMMs run while chunk c+1's rows travel, and chunk c's results travel
back while chunk c+1 computes. Without it every all-to-all blocks. Both are autograd functions (backward is the
reverse all-to-all); sizes may be uneven or zero. Rank r owns experts [r*E/ep, (r+1)*E/ep): with group-limited
routing and n_group a multiple of ep, a group never spans two ranks, so a token reaches at most `topk_group`
ranks (DeepSeek-V2's device-limited routing).

Expert weights become DTensors sharded on dim 0 over `ep`; `GroupedExperts` runs on their local part.
Their gradients sum the contributions of every rank's tokens, so data-parallel averaging must divide by the
whole data-parallel degree, not just the ranks that hold copies of the same experts (see `parallelize`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
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


@dataclass
class Flight:
    """One chunk between dispatch and combine on this rank."""
    rows: torch.Tensor  # the rows received for this rank's experts; after `compute`, the results sent back
    recv: list[int]  # rows from each rank
    send: list[int]  # rows to each rank
    recv_counts: torch.Tensor  # [ep, n_local]: rows per (source rank, local expert)


class AllToAllDispatcher:
    """The token dispatcher of one MoE layer under expert parallelism (see the module's docstring)."""

    def __init__(self, group, n_experts: int, overlap: bool = False, chunks: int = 1, label: str = ""):
        self.group = group
        self.label = label  # "MoE layer 3": what a report of a failed all-to-all names (train/watch.py)
        self.ep = dist.get_world_size(group)
        self.n_local = n_experts // self.ep
        self.overlap = overlap
        self.chunks = chunks if overlap else 1
        self.sent_rows = 0  # rows this rank has sent to other ranks' experts so far (for the benchmarks)

    def _exchange(self, x: torch.Tensor, recv: list[int], send: list[int]) -> torch.Tensor:
        if self.overlap:
            return funcol.all_to_all_single_autograd(x.contiguous(), recv, send, self.group)
        return all_to_all(x, recv, send, self.group, self.label)

    def dispatch(self, xs: list[torch.Tensor], counts: list[torch.Tensor]) -> list[Flight]:
        sent = torch.stack(counts).to(torch.int64)  # [chunks, E]
        got = torch.empty_like(sent.t().contiguous())  # [E, chunks] from each rank: (source, local expert) rows
        dist.all_to_all_single(got, sent.t().contiguous(), group=self.group)
        me = dist.get_rank(self.group)
        flights = []
        for c, x in enumerate(xs):
            send = sent[c].view(self.ep, -1).sum(1).tolist()
            recv_counts = got[:, c].view(self.ep, self.n_local)
            recv = recv_counts.sum(1).tolist()
            flights.append(Flight(self._exchange(x, recv, send), recv, send, recv_counts))
            self.sent_rows += sum(send) - send[me]
        return flights

    def compute(self, experts: nn.Module, flights: list[Flight]) -> list[Flight]:
        for f in flights:
            local_expert = torch.arange(self.n_local, device=f.recv_counts.device).repeat(self.ep)
            order = torch.repeat_interleave(local_expert, f.recv_counts.flatten()).argsort(stable=True)
            out = experts(f.rows[order], f.recv_counts.sum(0))
            by_source = torch.empty_like(out).index_copy(0, order, out)  # back to source-rank-major order
            f.rows = self._exchange(by_source, f.send, f.recv)
        return flights

    def combine(self, flights: list[Flight]) -> list[torch.Tensor]:
        return [f.rows for f in flights]


def apply_ep(model: nn.Module, ep_mesh, overlap: bool = False, chunks: int = 1) -> list[AllToAllDispatcher]:
    """Shard every routed-expert stack of `model` by expert over `ep_mesh` and install the all-to-all dispatcher
    in each MoE layer (`overlap`, `chunks`: see the module's docstring)."""
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
        module.dispatcher = AllToAllDispatcher(ep_mesh.get_group(), module.cfg.n_routed_experts, overlap, chunks,
                                               label)
        dispatchers.append(module.dispatcher)
    return dispatchers


def reduce_loads_over(group):
    """A `MoE.reduce_counts` function: the sum of a count vector over the data-parallel ranks."""
    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t
    return reduce_sum
