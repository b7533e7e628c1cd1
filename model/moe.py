"""DeepSeekMoE: shared experts + fine-grained routed experts, with DeepSeek's routing and balance rules.

Shape legend: B batch, T tokens per sequence, N = B*T tokens, D hidden, E routed experts, K experts per
token, G expert groups (n_group), Dv balance/device groups, I expert intermediate width, M = N*K assignments.

Routed experts are stacked weights run by grouped GEMM over tokens sorted by expert (torch._grouped_mm):
no Python loop over experts. The router runs in fp32.

Balance losses (each switchable by its coefficient) are attached to the MoE output by `AuxLossInjector`:
forward returns the activation unchanged, backward feeds d(aux)=scale into the router. The loss never
travels through the model's outputs, so pipeline stages need no extra outputs. Detached per-layer values
and expert loads are kept on the module for the trainer (`stats`, `tokens_per_expert`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import MLP


# --------------------------------------------------------------------------------------------- routing
@dataclass
class Routing:
    scores: torch.Tensor  # (N, E) fp32 affinities s_{i,t} (softmax or sigmoid), before any masking
    indices: torch.Tensor  # (N, K) chosen experts
    weights: torch.Tensor  # (N, K) fp32 gate values applied to the expert outputs


class Router(nn.Module):
    """Scores, group-limited top-k, optional auxiliary-loss-free selection bias (V3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # V3 bias: shifts selection only, updated outside forward by the sign of the load error
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                             persistent=cfg.aux_loss_free_bias)
        nn.init.normal_(self.weight, 0.0, cfg.initializer_range)

    def forward(self, x: torch.Tensor) -> Routing:
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):  # router math stays fp32 under mixed precision
            logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
        select = scores + self.expert_bias if cfg.aux_loss_free_bias else scores
        if cfg.topk_method != "greedy" and cfg.n_group > 1:
            select = self._mask_groups(select)
        indices = select.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(-1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return Routing(scores, indices, weights * cfg.routed_scaling_factor)

    def _mask_groups(self, select: torch.Tensor) -> torch.Tensor:
        """Keep only the topk_group best groups; V2 scores a group by its max, V3 by its top-2 sum."""
        cfg = self.cfg
        grouped = select.unflatten(-1, (cfg.n_group, -1))  # (N, G, E/G)
        if cfg.topk_method == "noaux_tc":
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_score = grouped.amax(-1)
        top_groups = group_score.topk(cfg.topk_group, dim=-1).indices  # (N, topk_group)
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, top_groups, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)


# --------------------------------------------------------------------------------------------- experts
class _GroupedMM(torch.autograd.Function):
    """x [M, Din] (rows sorted by group) @ w [G, Din, Dout] per group; offs = cumulative row ends [G] int32."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w, offs=offs)

    @staticmethod
    def backward(ctx, grad):
        x, w, offs = ctx.saved_tensors
        grad = grad.contiguous()  # the kernel rejects broadcast (stride-0) gradients
        dx = torch._grouped_mm(grad, w.transpose(-2, -1), offs=offs) if ctx.needs_input_grad[0] else None
        dw = torch._grouped_mm(x.t(), grad, offs=offs) if ctx.needs_input_grad[1] else None
        return dx, dw, None


@torch.compiler.disable  # data-dependent group sizes; its fake-tensor rule also rejects fp32 on CPU
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, op: Callable | None = None) -> torch.Tensor:
    """Per-group x_g @ w_g; `op(x, w, offs)` is the differentiable GEMM (default `_GroupedMM`; parallel/fp8.py
    supplies an FP8 one, whose `width_align` is the multiple its kernel needs the widths to be)."""
    w = _local(w)  # here, outside the compiled block: traced, a DTensor's to_local() reached the kernel as a DTensor
    align = getattr(op, "width_align", 8)  # bf16/fp32 kernels: 16-byte-aligned rows
    op = op or _GroupedMM.apply
    if x.shape[0] == 0:  # nothing routed here (possible under expert parallelism): keep x and w in the graph,
        # so backward still visits every node before this one (all-to-alls must run on every rank)
        return x @ w[0].to(x.dtype) + 0 * w.sum()
    w = w.to(x.dtype)
    d_in, d_out = w.shape[-2], w.shape[-1]
    pad_in, pad_out = -d_in % align, -d_out % align
    if pad_in or pad_out:  # odd widths: zero-pad, differentiably (zero columns add nothing, raise no FP8 amax)
        out = op(F.pad(x, (0, pad_in)), F.pad(w, (0, pad_out, 0, pad_in)), offs)
        return out[:, :d_out]
    return op(x, w, offs)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights in x @ W layout: gate_up [E, D, 2I], down [E, I, D]."""

    def __init__(self, n_experts: int, dim: int, hidden: int, std: float = 0.006):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, dim, 2 * hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
        nn.init.normal_(self.gate_up_proj, 0.0, std)  # a no-op on the meta device
        nn.init.normal_(self.down_proj, 0.0, std)
        self.gemm: Callable | None = None  # the grouped GEMM op; None: high precision (see `grouped_mm`)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D] sorted by expert, counts [E] rows per expert -> [M, D]."""
        if torch.is_autocast_enabled(x.device.type):  # grouped GEMMs are not autocast ops: cast by hand
            x = x.to(torch.get_autocast_dtype(x.device.type))
        offs = counts.cumsum(0).to(torch.int32)
        gate, up = grouped_mm(x, self.gate_up_proj, offs, self.gemm).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.down_proj, offs, self.gemm)


def _local(w: torch.Tensor) -> torch.Tensor:
    """This process's part of a weight that parallel/ may have sharded (by expert); plain tensors as they are."""
    to_local = getattr(w, "to_local", None)
    return w if to_local is None else to_local()


# --------------------------------------------------------------------------------------------- balance
@dataclass
class LoadCounts:
    """The (non-differentiable) counts the balance losses need; summed over data-parallel ranks when
    `MoE.reduce_counts` is set, so f is the global load while P stays each rank's local mean."""

    per_expert: torch.Tensor  # (E,) assignments per expert
    per_device: torch.Tensor  # (Dv,) tokens sending to each device group
    tokens: torch.Tensor  # () tokens T
    ranks: torch.Tensor  # () how many ranks' counts these are

    @classmethod
    def of(cls, indices: torch.Tensor, n_experts: int, n_devices: int) -> "LoadCounts":
        t = indices.shape[0]
        per_expert = torch.bincount(indices.flatten(), minlength=n_experts).float()
        device_of = indices // (n_experts // n_devices)
        sent = torch.zeros(t, n_devices, device=indices.device).scatter_(1, device_of, 1.0).sum(0)
        return cls(per_expert, sent, torch.tensor(float(t), device=indices.device), sent.new_ones(()))

    def reduced(self, reduce_sum) -> "LoadCounts":
        """All counts summed by `reduce_sum` (one collective on a packed vector)."""
        packed = reduce_sum(torch.cat([self.per_expert, self.per_device, self.tokens.view(1), self.ranks.view(1)]))
        e, d = self.per_expert.numel(), self.per_device.numel()
        return LoadCounts(packed[:e], packed[e:e + d], packed[e + d], packed[e + d + 1])

    def mean_affinity(self, scores: torch.Tensor) -> torch.Tensor:
        """P [E]: this rank's mean affinity over its tokens, times its token count over the ranks' mean count.
        The ranks' gradients are averaged, so the loss follows the mean of their P: the mean over all the counted
        tokens, also where ranks hold different numbers of them (an MTP depth's last sequence part under
        context parallelism is shorter). With equal counts the factor is exactly 1."""
        return scores.mean(0) * (scores.shape[0] * self.ranks / self.tokens)


# balance loss name -> its coefficient in ModelConfig
BALANCE_TERMS = {"expert": "aux_loss_alpha", "device": "device_aux_loss_alpha", "comm": "comm_aux_loss_alpha",
                 "seq": "seq_aux_loss_alpha"}


def active_balance_terms(cfg: ModelConfig) -> list[str]:
    """The balance losses this config switches on (coefficient > 0), in BALANCE_TERMS order."""
    return [name for name, alpha in BALANCE_TERMS.items() if getattr(cfg, alpha) > 0]


def _counts(counts: LoadCounts | None, indices: torch.Tensor, n_experts: int, n_devices: int) -> LoadCounts:
    return LoadCounts.of(indices, n_experts, n_devices) if counts is None else counts


def expert_balance_loss(scores: torch.Tensor, indices: torch.Tensor, counts: LoadCounts | None = None) -> torch.Tensor:
    """DeepSeek-V2 eq. 12-14: sum_i f_i P_i with P_i the mean affinity (without alpha)."""
    e, k = scores.shape[-1], indices.shape[-1]
    c = _counts(counts, indices, e, 1)
    f = c.per_expert * e / (k * c.tokens)
    return (f * c.mean_affinity(scores)).sum()


def device_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_devices: int,
                        counts: LoadCounts | None = None) -> torch.Tensor:
    """DeepSeek-V2 eq. 15-17: f'_d = mean of f over device d's experts, P'_d = sum of P over them."""
    e, k = scores.shape[-1], indices.shape[-1]
    c = _counts(counts, indices, e, n_devices)
    f = (c.per_expert * e / (k * c.tokens)).view(n_devices, -1).mean(-1)
    p = c.mean_affinity(scores).view(n_devices, -1).sum(-1)
    return (f * p).sum()


def comm_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_devices: int, max_devices: int,
                      counts: LoadCounts | None = None) -> torch.Tensor:
    """DeepSeek-V2 eq. 18-20: f''_d = D / (M T) * #tokens sent to device d, P''_d = sum of P over d."""
    c = _counts(counts, indices, scores.shape[-1], n_devices)
    f = c.per_device * n_devices / (max_devices * c.tokens)
    p = c.mean_affinity(scores).view(n_devices, -1).sum(-1)
    return (f * p).sum()


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, batch: int,
                          reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """DeepSeek-V3 eq. 17-20: the expert-level loss per sequence on normalised affinities, averaged.
    `reduce_sum` (context parallelism: this rank holds a part of each sequence) sums the per-sequence counts
    over the parts, so f is the whole sequence's; P is this part's mean, weighted by the part's share of the
    sequence's tokens (the parts' gradients are averaged; factor 1 for equal parts)."""
    e, k = scores.shape[-1], indices.shape[-1]
    s = (scores / scores.sum(-1, keepdim=True)).view(batch, -1, e)  # (B, T, E)
    t = s.shape[1]
    chosen = torch.zeros_like(s).scatter_(2, indices.view(batch, t, k), 1.0).sum(1)  # (B, E)
    tokens, parts = chosen.new_full((1,), float(t)), chosen.new_ones((1,))
    if reduce_sum is not None:
        packed = reduce_sum(torch.cat([chosen.flatten(), tokens, parts]))
        chosen, tokens, parts = packed[:-2].view(batch, e), packed[-2:-1], packed[-1:]
    f = chosen * e / (k * tokens)  # (B, E)
    return (f * s.mean(1) * (t * parts / tokens)).sum(-1).mean()


def capacity_keep_mask(routing: Routing, n_devices: int, capacity_factor: float,
                       protected: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2 device-level token dropping -> keep mask [N, K].

    Each device (a group of E/Dv consecutive experts) may take ceil(capacity_factor * N*K / Dv)
    assignments; beyond that the assignments with the lowest affinity are dropped. Assignments of
    protected tokens (sequences exempt from dropping) are always kept and count against the budget first.
    """
    n, k = routing.indices.shape
    e = routing.scores.shape[-1]
    capacity = int(torch.ceil(torch.tensor(capacity_factor * n * k / n_devices)).item())
    device = (routing.indices // (e // n_devices)).flatten()  # (M,)
    affinity = routing.scores.gather(-1, routing.indices).flatten()
    prot = protected.unsqueeze(-1).expand(n, k).flatten()
    priority = affinity + 2.0 * prot  # protected first; affinities lie in [0, 1]
    order = priority.argsort(descending=True, stable=True)
    order = order[device[order].argsort(stable=True)]  # grouped by device, best first within a device
    counts = torch.bincount(device, minlength=n_devices)
    starts = counts.cumsum(0) - counts
    rank_in_device = torch.empty_like(order)
    rank_in_device[order] = torch.arange(order.numel(), device=order.device) - starts[device[order]]
    return ((rank_in_device < capacity) | prot).view(n, k)


class AuxLossInjector(torch.autograd.Function):
    """Identity on `out`; in backward, gives `aux` the gradient `scale` so it trains the router."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float):
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_full(ctx.aux_shape, ctx.scale, dtype=torch.float32), None


# --------------------------------------------------------------------------------------------- dispatch
@dataclass
class Chunk:
    """Some of a MoE layer's tokens with their routing: what a dispatcher moves to the experts and back."""
    x: torch.Tensor  # (n, D) tokens
    indices: torch.Tensor  # (n, K) experts; n_experts ("no expert") where an assignment is dropped
    weights: torch.Tensor  # (n, K) gate values
    order: torch.Tensor  # the assignments (token * K + slot) sorted by expert, dropped ones cut off
    counts: torch.Tensor  # (E,) assignments per expert

    @classmethod
    def of(cls, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, n_experts: int,
           dropping: bool) -> "Chunk":
        """`dropping`: some indices may be n_experts. Shapes depend on the data only then, so without dropping
        this traces into a compiled block."""
        expert = indices.flatten()
        counts = expert_counts(expert, n_experts + 1)[:n_experts]
        order = expert.argsort(stable=True)
        if dropping:  # the dropped assignments sort last: cut them off
            order = order[: int(counts.sum())]
        return cls(x, indices, weights, order, counts)

    def rows(self) -> torch.Tensor:
        """One row of x per assignment, in expert order."""
        return self.x.index_select(0, self.order // self.indices.shape[1])

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        """(n, D): each token's expert outputs (y: rows in expert order) weighted by its gate values and summed;
        under autocast in y's dtype (the dtype autocast runs the weighted sum's bmm in)."""
        n, k = self.indices.shape
        dtype = y.dtype if torch.is_autocast_enabled(self.x.device.type) else self.x.dtype
        full = self.x.new_zeros(n * k, self.x.shape[-1], dtype=dtype).index_copy(0, self.order, y.to(dtype))
        # over the K experts of each token: (n, 1, K) @ (n, K, D); bmm is ~3x faster than einsum here
        return torch.bmm(self.weights.to(dtype).unsqueeze(1), full.view(n, k, self.x.shape[-1])).squeeze(1)


class LocalDispatcher:
    """The token dispatcher of a MoE layer whose experts are all on this process. A dispatcher moves each chunk's
    rows to the experts' owners (`dispatch`), runs the experts on what arrived (`compute`) and brings the results
    back, weighted and summed per token (`combine`); expert parallelism installs one that does this by all-to-all
    (parallel/expert.py). Between `dispatch` and `compute` the layer runs its shared experts."""

    chunks = 1  # the layer splits its tokens into this many chunks, each dispatched on its own

    def dispatch(self, chunks: list[Chunk]) -> list:
        return chunks

    def compute(self, experts: nn.Module, flights: list) -> list:
        return [(c, experts(c.rows(), c.counts)) for c in flights]

    def combine(self, flights: list) -> list[torch.Tensor]:
        """Each chunk's output (n, D)."""
        return [c.reduce(y) for c, y in flights]


# --------------------------------------------------------------------------------------------- the layer
def token_spans(n: int, chunks: int) -> list[tuple[int, int]]:
    """[first, last) token ranges of `chunks` near-equal chunks of n tokens (the first n % chunks one longer, as
    torch.tensor_split), in plain ints: no tensor value decides a shape."""
    chunks = min(chunks, max(n, 1))
    sizes = [n // chunks + (i < n % chunks) for i in range(chunks)]
    ends = [sum(sizes[:i + 1]) for i in range(chunks)]
    return [(end - size, end) for size, end in zip(sizes, ends)]


def expert_counts(expert: torch.Tensor, n: int) -> torch.Tensor:
    """Assignments per expert [n] (int64) of expert ids [M] < n: bincount with a fixed output length, which
    compiles (bincount's length depends on the largest id)."""
    return torch.zeros(n, dtype=torch.int64, device=expert.device).scatter_add_(0, expert, torch.ones_like(expert))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                                      cfg.initializer_range)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts > 0 else None)
        # gradient weight of the balance losses; the trainer sets 1/accumulation_steps
        self.aux_loss_scale = 1.0
        # accumulated between optimizer steps (reset by the trainer): routed assignments per expert,
        # dropped and total assignments; the latest detached balance-loss values
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.register_buffer("dropped", torch.zeros(2), persistent=False)
        self.aux_values: dict[str, torch.Tensor] = {}
        # set by parallel/: sums a tensor over the data-parallel ranks, so the balance losses use global loads
        self.reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None
        # set by parallel/ under context parallelism: sums a tensor over the ranks holding the other parts of
        # this rank's sequences (the sequence-wise loss counts whole sequences)
        self.reduce_sequence: Callable[[torch.Tensor], torch.Tensor] | None = None
        # moves the routed rows to the experts and back; expert parallelism installs its all-to-all one
        self.dispatcher = LocalDispatcher()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        routing = self.gate(flat)
        keep = self._keep_mask(routing, b, t)
        flights = self.dispatcher.dispatch(self._chunks(flat, routing, keep))
        shared = None if self.shared_experts is None else self.shared_experts(x)  # while the dispatch is in flight
        outs = self.dispatcher.combine(self.dispatcher.compute(self.experts, flights))
        routed = (outs[0] if len(outs) == 1 else torch.cat(outs)).view(b, t, d)
        out = routed if shared is None else routed + shared
        if self.training and torch.is_grad_enabled():
            aux = self._balance_loss(routing, b)
            if aux is not None:
                out = AuxLossInjector.apply(out, aux, self.aux_loss_scale)
        self._record(routing, keep)  # last: under torch.compile the block's graph ends here
        return out

    def _keep_mask(self, routing: Routing, b: int, t: int) -> torch.Tensor | None:
        cf = self.cfg.capacity_factor
        if cf is None or not self.training:  # the paper never drops at evaluation
            return None
        protected_seq = torch.rand(b, device=routing.scores.device) < self.cfg.no_drop_fraction
        return capacity_keep_mask(routing, self.cfg.balance_groups, cf, protected_seq.repeat_interleave(t))

    def _chunks(self, x: torch.Tensor, routing: Routing, keep: torch.Tensor | None) -> list[Chunk]:
        """The layer's tokens in the dispatcher's number of chunks; dropped assignments go to the virtual expert
        E, never computed."""
        e = self.cfg.n_routed_experts
        indices = routing.indices if keep is None else routing.indices.masked_fill(~keep, e)
        return [Chunk.of(x[first:last], indices[first:last], routing.weights[first:last], e, keep is not None)
                for first, last in token_spans(x.shape[0], self.dispatcher.chunks)]

    @torch.compiler.disable  # asks autograd's engine whether it runs, which does not trace
    @torch.no_grad()
    def _record(self, routing: Routing, keep: torch.Tensor | None) -> None:
        if torch._C._current_graph_task_id() != -1:  # a forward rerun inside backward (activation
            return  # checkpointing): these tokens were counted when the forward first ran
        self.tokens_per_expert += expert_counts(routing.indices.flatten(), self.cfg.n_routed_experts)
        total = routing.indices.numel()
        kept = total if keep is None else int(keep.sum())
        self.dropped += torch.tensor([total - kept, total], dtype=self.dropped.dtype, device=self.dropped.device)

    def _balance_loss(self, routing: Routing, batch: int) -> torch.Tensor | None:
        cfg, s, idx = self.cfg, routing.scores, routing.indices
        d = cfg.balance_groups
        group_limited = cfg.topk_method != "greedy" and cfg.n_group == d
        max_devices = cfg.topk_group if group_limited else min(cfg.num_experts_per_tok, d)
        active = active_balance_terms(cfg)
        counts = None
        if set(active) - {"seq"}:  # the load-based losses: f from (optionally all-reduced) counts
            counts = LoadCounts.of(idx.detach(), cfg.n_routed_experts, d)
            if self.reduce_counts is not None:
                counts = counts.reduced(self.reduce_counts)
        terms = {
            "expert": lambda: expert_balance_loss(s, idx, counts),
            "device": lambda: device_balance_loss(s, idx, d, counts),
            "comm": lambda: comm_balance_loss(s, idx, d, max_devices, counts),
            "seq": lambda: sequence_balance_loss(s, idx, batch, self.reduce_sequence),
        }
        total = None
        for name in active:
            value = getattr(cfg, BALANCE_TERMS[name]) * terms[name]()
            self.aux_values[name] = value.detach()
            total = value if total is None else total + value
        return total

    # ---------------------------------------------------------------- trainer-facing, outside forward
    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor | None = None) -> None:
        """V3 auxiliary-loss-free update: b_i += gamma * sign(mean load - load_i)."""
        if not self.cfg.aux_loss_free_bias:
            return
        load = self.tokens_per_expert if tokens_per_expert is None else tokens_per_expert
        self.gate.expert_bias += self.cfg.bias_update_speed * torch.sign(load.mean() - load)

    @torch.no_grad()
    def reset_stats(self) -> None:
        self.tokens_per_expert.zero_()
        self.dropped.zero_()
        self.aux_values = {}
