"""Expert parallelism: routed experts sharded by expert over the `ep` mesh axis, tokens moved by all-to-all.

The model's MoE layer sorts each chunk of its (token, expert) assignments by global expert id and hands the
chunks to its dispatcher (model/moe.py `LocalDispatcher`). Expert parallelism installs `AllToAllDispatcher`:

  dispatch  counts [E] of every chunk -> per-rank send sizes; one all-to-all of all chunks' counts (how many
            rows of each of my local experts every rank will send me), then each chunk's rows.
  compute   reorder a chunk's received rows (source rank major) to local-expert major (a counting pass over the
            counts, no sort), run the grouped GEMMs, undo the reorder and start the all-to-all that returns the
            results to the ranks owning the tokens.
  combine   the returned rows.

With `overlap` the row all-to-alls are asynchronous (torch's functional collectives: the result is waited for
at its first use): the layer computes its shared experts while the dispatch is in flight, chunk c's expert GEMMs
run while chunk c+1's rows travel, and chunk c's results travel back while chunk c+1 computes. The exchanges start
outside autograd and join it (`_Exchanged`) after the compute that hides them, so that in backward, where autograd's
engine runs the ready node created last first, each gradient exchange starts before that compute's backward: the
returns of all chunks as one node after the last chunk's GEMMs (their gradients travel while the GEMMs' backward
runs chunk by chunk), each chunk's dispatch just before its own GEMMs (its gradient travels while the previous
chunk's GEMMs' backward runs, the first chunk's while the shared experts' does). Without `overlap` every all-to-all
blocks. Both ways are autograd functions (backward is the reverse all-to-all); sizes may be uneven or zero. Rank r
owns experts [r*E/ep, (r+1)*E/ep): with group-limited routing and n_group a multiple of ep, a group never spans two
ranks, so a token reaches at most `topk_group` ranks (DeepSeek-V2's device-limited routing).

Across hosts (`parallel.ep_dispatch=hierarchical`, `HierarchicalDispatcher`) a token crosses the link between hosts
once per host that holds any of its experts, not once per expert: to the rank of that host with the sender's place
on its own host, which fans the rows out to its host's ranks by the flat dispatch above, weights and sums their
outputs per token, and sends one row per (token, host) back. Routing groups map to hosts (n_group a multiple of the
hosts), so group-limited routing is node-limited: a token reaches at most `topk_group` hosts (DeepSeek-V3).

Expert weights become DTensors sharded on dim 0 over `ep`; `GroupedExperts` runs on their local part.
Their gradients sum the contributions of every rank's tokens, so data-parallel averaging must divide by the
whole data-parallel degree, not just the ranks that hold copies of the same experts (see `parallelize`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
import torch.nn.functional as F

from model.moe import Chunk


class Lane:
    """Marks the thread that runs the backward half of a pipeline's paired forward and backward (parallel/pipeline.py,
    DualPipeV's overlapped actions). The collectives a `Route` carries go over its twin group on that thread, so each
    process group sees its collectives in the same order on every rank however the two threads interleave."""

    def __init__(self):
        self._here = threading.local()

    @contextmanager
    def backward(self):
        self._here.on = True
        try:
            yield
        finally:
            self._here.on = False

    def active(self) -> bool:
        return getattr(self._here, "on", False)


@dataclass(frozen=True)
class Route:
    """A process group and, where forward and backward run at once on two threads (`Lane`), a twin of it (the same
    ranks) for the backward's thread. Calling it gives the group for the calling thread."""
    group: object
    twin: object = None
    lane: Lane | None = None

    def __call__(self):
        return self.twin if self.lane is not None and self.lane.active() else self.group


def _pg(group):
    """The process group of `group`, a Route or a group."""
    return group() if isinstance(group, Route) else group


class _AllToAll(torch.autograd.Function):
    """Rows of x split by `send` sizes to each rank; returns rows received, `recv` sizes from each rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int], group, label: str) -> torch.Tensor:
        ctx.sizes, ctx.group, ctx.label = (recv, send), group, label  # label: a failure report names it
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=_pg(group))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        recv, send = ctx.sizes
        dx = grad.new_empty(sum(send), *grad.shape[1:])
        dist.all_to_all_single(dx, grad.contiguous(), send, recv, group=_pg(ctx.group))
        return dx, None, None, None, None


def all_to_all(x: torch.Tensor, recv: list[int], send: list[int], group, label: str = "",
               overlap: bool = False) -> torch.Tensor:
    """Rows of x split by `send` sizes to each rank of `group` (a group or a `Route`), `recv` rows back from each, with
    autograd: blocking, or (`overlap`) asynchronous, waited for at first use in forward and backward (torch's
    functional collective, on the group of the forward's thread)."""
    if overlap:
        return funcol.all_to_all_single_autograd(x.contiguous(), recv, send, _pg(group))
    return _AllToAll.apply(x, recv, send, group, label)


def block_transpose_order(counts: torch.Tensor, total: int) -> torch.Tensor:
    """The row order that turns rows stored in (source, expert) blocks, source-major, into (expert, source) blocks,
    expert-major; rows keep their order within a block (what a stable sort by expert gives). counts [S, E]: the
    rows of each block; total: their sum. A counting pass: each block moves by the difference of its two starts."""
    sizes = counts.flatten()
    start = (sizes.cumsum(0) - sizes).view_as(counts).t().flatten()  # each block's first row as stored
    sizes_t = counts.t().flatten()
    shift = start - (sizes_t.cumsum(0) - sizes_t)  # minus its first row in expert-major order
    return torch.repeat_interleave(shift, sizes_t, output_size=total) + torch.arange(total, device=counts.device)


class _Exchanged(torch.autograd.Function):
    """The all-to-alls of a layer's chunks, started on the values of `sent` (outside autograd) and still in flight
    (`pending`), joined to autograd as one node. Forward hands back the exchanges' outputs, waited for at first use;
    backward starts every chunk's reverse exchange at once, each waited for at first use. The node is created where
    it is applied, not where the exchanges started: autograd's engine runs, of the nodes ready, the one created last
    in forward first, so a node applied after the compute that should hide its backward exchanges (the shared
    experts, the other chunks' expert GEMMs) starts them before that compute's backward runs. One node per chunk,
    created where its exchange starts, has its gradient's consumer run right after it, which waits at once."""

    @staticmethod
    def forward(ctx, group, label: str, sizes: list, pending: list, *sent: torch.Tensor):
        ctx.group, ctx.label, ctx.sizes = group, label, sizes  # sizes: each chunk's (recv, send) in forward
        return tuple(pending)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        # last chunk first: the engine runs the later chunk's consumer first (it was created later)
        back = [funcol.all_to_all_single(g.contiguous(), send, recv, _pg(ctx.group))
                for g, (recv, send) in zip(grads[::-1], ctx.sizes[::-1])]
        return (None, None, None, None, *back[::-1])


def _joins_later(overlap: bool) -> bool:
    """Overlapped exchanges start outside autograd and join it later (`_Exchanged`), in eager; traced by
    torch.compile, each is its own functional collective with autograd, as blocking ones."""
    return overlap and not torch.compiler.is_compiling()


def _started(x: torch.Tensor, recv: list[int], send: list[int], group) -> torch.Tensor:
    """An asynchronous all-to-all of x's values (no autograd), waited for at first use."""
    return funcol.all_to_all_single(x.detach().contiguous(), recv, send, _pg(group))


@dataclass
class Flight:
    """One chunk between dispatch and combine on this rank."""
    chunk: Chunk
    rows: torch.Tensor  # the rows received for this rank's experts; after `compute`, the results sent back
    recv: list[int]  # rows from each rank
    send: list[int]  # rows to each rank
    recv_counts: torch.Tensor  # [ep, n_local]: rows per (source rank, local expert)
    # overlapped, between an exchange's start and `_Exchanged`: `rows` holds what was sent, this what will arrive
    pending: torch.Tensor | None = None


class AllToAllDispatcher:
    """The token dispatcher of one MoE layer under expert parallelism, flat: every (token, expert) row goes
    straight to the expert's rank (see the module's docstring). `group`: the ep ranks, a process group or a `Route`;
    `hosts`: the host of each rank of it, for the count of rows that cross hosts."""

    def __init__(self, group, n_experts: int, overlap: bool = False, chunks: int = 1, label: str = "",
                 hosts: list[int] | None = None):
        self.group = group if isinstance(group, Route) else Route(group)
        self.label = label  # "MoE layer 3": what a report of a failed all-to-all names (train/watch.py)
        self.ep = dist.get_world_size(self.group.group)
        self.me = dist.get_rank(self.group.group)
        self.n_local = n_experts // self.ep
        self.overlap = overlap
        self.chunks = chunks if overlap else 1
        hosts = hosts or [0] * self.ep
        self.elsewhere = [h != hosts[self.me] for h in hosts]
        self.sent_rows = 0  # rows this rank has sent to other ranks' experts so far (for the benchmarks)
        self.host_rows = 0  # rows of D this rank has sent to other hosts so far, dispatch and combine

    def dispatch(self, chunks: list[Chunk]) -> list[Flight]:
        sent = torch.stack([c.counts for c in chunks]).to(torch.int64)  # [chunks, E]
        got = torch.empty_like(sent.t().contiguous())  # [E, chunks] from each rank: (source, local expert) rows
        dist.all_to_all_single(got, sent.t().contiguous(), group=self.group())
        flights, joined = [], _joins_later(self.overlap)
        for i, c in enumerate(chunks):
            send = sent[i].view(self.ep, -1).sum(1).tolist()
            recv_counts = got[:, i].view(self.ep, self.n_local)
            recv = recv_counts.sum(1).tolist()
            rows = c.rows()
            if joined:  # started now, joined to autograd in `compute`, just before the chunk's GEMMs
                flights.append(Flight(c, rows, recv, send, recv_counts, _started(rows, recv, send, self.group)))
            else:
                rows = all_to_all(rows, recv, send, self.group, self.label, self.overlap)
                flights.append(Flight(c, rows, recv, send, recv_counts))
            self.sent_rows += sum(send) - send[self.me]
            self.host_rows += sum(n for n, away in zip(send, self.elsewhere) if away)
        return flights

    def compute(self, experts: nn.Module, flights: list[Flight]) -> list[Flight]:
        joined = flights[0].pending is not None  # as `dispatch` started them
        for f in flights:
            if joined:  # just before its GEMMs: see `_join`
                self._join([f], back=False)
            order = block_transpose_order(f.recv_counts, sum(f.recv))
            out = experts(f.rows[order], f.recv_counts.sum(0))
            by_source = torch.empty_like(out).index_copy(0, order, out)  # back to source-rank-major order
            if joined:  # joined to autograd after the last chunk's GEMMs
                f.rows, f.pending = by_source, _started(by_source, f.send, f.recv, self.group)
            else:
                f.rows = all_to_all(by_source, f.send, f.recv, self.group, self.label, self.overlap)
            self.host_rows += sum(n for n, away in zip(f.recv, self.elsewhere) if away)
        if joined:
            self._join(flights, back=True)
        return flights

    def _join(self, flights: list[Flight], back: bool) -> None:
        """The flights' exchanges in flight (dispatch, or with `back` the results' return) as one autograd node.
        A chunk's dispatch joins just before its own GEMMs, after the previous chunk's: in backward the engine then
        starts that chunk's gradient exchange as soon as its GEMMs' backward is done, before the previous chunk's
        GEMMs' backward, which hides it; the first chunk's hides under the shared experts' backward. The results'
        return joins once, after the last chunk's GEMMs: its backward starts every chunk's exchange."""
        sizes = [(f.send, f.recv) if back else (f.recv, f.send) for f in flights]
        arrived = _Exchanged.apply(self.group, self.label, sizes, [f.pending for f in flights],
                                   *[f.rows for f in flights])
        for f, rows in zip(flights, arrived):
            f.rows, f.pending = rows, None

    def combine(self, flights: list[Flight]) -> list[torch.Tensor]:
        return [f.chunk.reduce(f.rows) for f in flights]


@dataclass
class HostFlight:
    """One chunk between dispatch and combine under hierarchical dispatch."""
    chunk: Chunk
    token: torch.Tensor  # [P] the chunk's token of each (token, destination host) pair, host-major
    send: list[int]  # pairs to each host
    recv: list[int]  # pairs from each host
    x: torch.Tensor  # the received pairs' hidden states; after `compute`, their results sent back
    weights: torch.Tensor  # [received, K] gate values of the slots whose expert is on this host, else 0
    indices: torch.Tensor  # [received, K] those slots' experts among this host's, else this host's count
    # overlapped, between the exchanges' start and `_Exchanged`: x and weights hold what was sent, these what will
    # arrive (dispatch: x's and weights', combine: x's)
    pending: list[torch.Tensor] | None = None


class HierarchicalDispatcher:
    """The token dispatcher of one MoE layer under expert parallelism across hosts (`parallel.ep_dispatch=
    hierarchical`). A chunk's token crosses the inter-host link once per host that holds any of its experts: to
    the rank of that host with this rank's place on its own host (`inter`: the ranks with the same place on every
    host), with its gate values and experts there. That rank fans the tokens out to its host's ranks by a flat
    dispatch over `intra` (the host's ranks of this ep group), receives their outputs, weights and sums them per
    token, and sends one row per token back over the link, where the host sums are added up."""

    def __init__(self, inter, intra, n_experts: int, overlap: bool = False, chunks: int = 1, label: str = ""):
        self.inter = inter if isinstance(inter, Route) else Route(inter)
        self.label = label
        self.hosts, self.host = dist.get_world_size(self.inter.group), dist.get_rank(self.inter.group)
        self.per_host = n_experts // self.hosts  # experts on each host
        self.local = AllToAllDispatcher(intra, self.per_host, label=label)
        self.overlap = overlap
        self.chunks = chunks if overlap else 1
        self.sent_rows = 0  # rows this rank has sent to other ranks so far (the first hop, and the fan-out)
        self.host_rows = 0  # rows of D this rank has sent to other hosts so far, dispatch and combine

    def dispatch(self, chunks: list[Chunk]) -> list[HostFlight]:
        flights = []
        for c in chunks:
            host = c.indices // self.per_host  # [n, K]; a dropped assignment: host == hosts
            pair_host, token = F.one_hot(host, self.hosts + 1)[..., :self.hosts].any(1).t().nonzero(as_tuple=True)
            send_t = torch.bincount(pair_host, minlength=self.hosts)
            recv_t = torch.empty_like(send_t)
            dist.all_to_all_single(recv_t, send_t, group=self.inter())
            send, recv = send_t.tolist(), recv_t.tolist()
            here = host.index_select(0, token) == pair_host.unsqueeze(1)  # [P, K] slots on the pair's host
            local_ids = c.indices.index_select(0, token) - pair_host.unsqueeze(1) * self.per_host
            ids = torch.where(here, local_ids, self.per_host)
            got_ids = ids.new_empty(sum(recv), ids.shape[1])
            dist.all_to_all_single(got_ids, ids, recv, send, group=self.inter())
            sent = [c.x.index_select(0, token), c.weights.index_select(0, token) * here]
            if _joins_later(self.overlap):  # joined to autograd in `compute`
                flights.append(HostFlight(c, token, send, recv, *sent, got_ids,
                                          [_started(t, recv, send, self.inter) for t in sent]))
            else:
                x, weights = (all_to_all(t, recv, send, self.inter, self.label, self.overlap) for t in sent)
                flights.append(HostFlight(c, token, send, recv, x, weights, got_ids))
            self.sent_rows += sum(send) - send[self.host]
            self.host_rows += sum(send) - send[self.host]
        return flights

    def compute(self, experts: nn.Module, flights: list[HostFlight]) -> list[HostFlight]:
        """As the flat dispatcher's: overlapped, a chunk's dispatch joins autograd just before its experts run, and
        the results' return of all chunks after the last chunk's."""
        joined = flights[0].pending is not None
        for f in flights:
            if joined:
                f.x, f.weights = _Exchanged.apply(self.inter, self.label, [(f.recv, f.send)] * 2, f.pending,
                                                  f.x, f.weights)
            pairs = Chunk.of(f.x, f.indices, f.weights, self.per_host, dropping=True)
            sent = self.local.sent_rows
            summed = self.local.combine(self.local.compute(experts, self.local.dispatch([pairs])))[0]
            self.sent_rows += self.local.sent_rows - sent
            if joined:
                f.x, f.pending = summed, [_started(summed, f.send, f.recv, self.inter)]
            else:
                f.x = all_to_all(summed, f.send, f.recv, self.inter, self.label, self.overlap)
            self.host_rows += sum(f.recv) - f.recv[self.host]
        if joined:
            back = _Exchanged.apply(self.inter, self.label, [(f.send, f.recv) for f in flights],
                                    [f.pending[0] for f in flights], *[f.x for f in flights])
            for f, x in zip(flights, back):
                f.x, f.pending = x, None
        return flights

    def combine(self, flights: list[HostFlight]) -> list[torch.Tensor]:
        return [f.x.new_zeros(f.chunk.x.shape[0], f.x.shape[1]).index_add(0, f.token, f.x) for f in flights]


@dataclass(frozen=True)
class ExpertDispatch:
    """How a MoE layer's routed rows reach experts on other ranks: parallel.ep_overlap, ep_chunks, ep_dispatch, and
    the ranks of the job on each host (torchrun's LOCAL_WORLD_SIZE; ranks are numbered host by host), and the `Lane`
    of a pipeline that pairs forward and backward on two threads (parallel.pp_overlap_fb)."""
    overlap: bool = False
    chunks: int = 1
    hierarchical: bool = False
    ranks_per_host: int | None = None  # None: every rank on one host
    lane: Lane | None = None
    groups: tuple | None = None  # hierarchical: this rank's (inter, intra) groups, made once by `on`
    twins: dict | None = None  # with `lane`: a twin of each group the MoE layers use in forward, made by `on`

    def on(self, mesh) -> "ExpertDispatch":
        """This dispatch with its host groups and twins made on `mesh` (collective: every rank calls it once), so
        that the model parts of a pipelined rank share them."""
        how = self
        if how.hierarchical and how.groups is None:
            how = replace(how, groups=_host_groups(mesh, how.ranks_per_host))
        if how.lane is not None and how.twins is None:  # new groups of the same ranks, made as the originals were
            used = [*(how.groups or (mesh["ep"].get_group(),)), mesh["dp_cp"].get_group()]
            twins = _host_groups(mesh, how.ranks_per_host) if how.hierarchical else (_subgroup(mesh, ("ep",)),)
            twins += (_subgroup(mesh, ("dp_replicate", "efsdp", "cp", "ep")),)  # parallel/dims.py's "dp_cp"
            how = replace(how, twins=dict(zip(used, twins)))
        return how

    def route(self, group) -> Route:
        """`group` with its twin for the paired backward's thread, if any."""
        return Route(group, (self.twins or {}).get(group), self.lane)


def host_problem(ep: int, tp: int, ranks_per_host: int, n_group: int | None) -> str | None:
    """Why hierarchical dispatch cannot apply to an ep group of `ep` ranks `tp` apart (the mesh's "ep" axis is
    outside "tp" only) with `ranks_per_host` ranks on each host, or None. `n_group`: the routing groups of a
    group-limited router, which must each lie on one host; None for a router without groups."""
    if ep == 1:
        return "parallel.ep_dispatch=hierarchical moves tokens between expert-parallel ranks, but parallel.ep=1"
    if ranks_per_host % tp or (ep * tp) % ranks_per_host:
        return (f"parallel.ep_dispatch=hierarchical needs whole hosts per expert-parallel group: {ranks_per_host} "
                f"ranks per host must be a multiple of tp={tp} and divide ep x tp={ep * tp}")
    hosts = ep * tp // ranks_per_host
    if hosts == 1:
        return (f"parallel.ep_dispatch=hierarchical: the ep={ep} ranks of a group lie on one host ({ranks_per_host} "
                f"ranks per host), so nothing crosses hosts; use parallel.ep_dispatch=flat")
    if n_group is not None and n_group % hosts:
        return (f"parallel.ep_dispatch=hierarchical maps routing groups to hosts: n_group={n_group} must be a "
                f"multiple of the {hosts} hosts of an ep group")
    return None


def _mesh_groups(mesh, dims: tuple[str, ...]) -> list[list[int]]:
    """Every group of ranks of `mesh` that differ only along `dims` (the groups of those dims flattened)."""
    axes = [list(mesh.mesh_dim_names).index(d) for d in dims]
    ranks = mesh.mesh.movedim(axes, list(range(-len(axes), 0)))
    return ranks.reshape(-1, ranks.shape[-len(axes):].numel()).tolist()


def _subgroup(mesh, dims: tuple[str, ...]):
    """A new process group of this rank's ranks along `dims`; collective: made for every group on every rank."""
    return dist.new_subgroups_by_enumeration(_mesh_groups(mesh, dims))[0]


def _host_groups(mesh, ranks_per_host: int):
    """This rank's (inter, intra) groups: the ranks of its ep group with its place on every host, and the ranks of its
    ep group on its host. Made for every ep group on every rank (torch's new_group is collective)."""
    groups = _mesh_groups(mesh, ("ep",))
    host_of = [[g // ranks_per_host for g in group] for group in groups]
    hosts = len(set(host_of[0]))
    local = len(groups[0]) // hosts
    intra = [group[h * local:(h + 1) * local] for group in groups for h in range(hosts)]
    inter = [group[i::local] for group in groups for i in range(local)]
    return dist.new_subgroups_by_enumeration(inter)[0], dist.new_subgroups_by_enumeration(intra)[0]


def apply_ep(model: nn.Module, mesh, how: ExpertDispatch = ExpertDispatch()) -> list:
    """Shard every routed-expert stack of `model` by expert over the "ep" axis of `mesh` and install an all-to-all
    dispatcher in each MoE layer, flat or hierarchical (see the module's docstring)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from model.moe import MoE

    ep_mesh, how = mesh["ep"], how.on(mesh)
    members = dist.get_process_group_ranks(ep_mesh.get_group())
    hosts = [g // (how.ranks_per_host or dist.get_world_size()) for g in members]
    dispatchers = []
    for path, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        label = f"MoE layer {path.split('.')[1]}" if path.startswith("layers.") else f"MoE {path}"
        experts = module.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)])
            experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        e = module.cfg.n_routed_experts
        module.dispatcher = (HierarchicalDispatcher(*map(how.route, how.groups), e, how.overlap, how.chunks, label)
                             if how.hierarchical else
                             AllToAllDispatcher(how.route(ep_mesh.get_group()), e, how.overlap, how.chunks, label,
                                                hosts))
        dispatchers.append(module.dispatcher)
    return dispatchers


def reduce_loads_over(group):
    """A `MoE.reduce_counts` function: the sum of a count vector over the data-parallel ranks (`group`: a process
    group or a `Route`)."""
    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=_pg(group))
        return t
    return reduce_sum
