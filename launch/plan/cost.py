"""Time of a training step on a cluster: compute, communication per collective, pipeline bubble.

Compute: the model's training FLOPs (model/analysis.py; 6 x activated parameters + attention) per GPU,
plus what this implementation adds: recomputation (full: one more forward; selective: the MLA
up-projections), and the routed experts that every tensor-parallel rank runs on all its tokens. FP8 recipes
run the linears they convert at the FP8 peak. Everything at `cluster.gemm_efficiency` of the peak.

Communication, bytes each GPU sends per step, on the pipeline rank whose collectives take longest (stages
differ), at `cluster.link_efficiency` of NVLink (one way) when the group lies inside a node, else of the GPU's
InfiniBand NIC (the mesh is laid out pp, dp_replicate, efsdp, cp, ep, tp from slowest to fastest, so a group's
ranks are `stride` apart):
  ep   all-to-all dispatch + combine per MoE layer and micro-batch, forward and backward (and once more in a
       full recomputation), rows of D per token and pass, by link: "ep all-to-all" between nodes (or within the
       node where the group fits in one), "ep all-to-all, in-node" within nodes. The ep group's ranks are tp
       apart, so it spans H = ep x tp / gpus_per_node nodes (1 where that is <= 1) with L = ep / H of its ranks on
       each; experts lie in equal contiguous blocks per rank, a token's K = top-k experts taken as uniform over
       the group.
       flat (parallel.ep_dispatch=flat): every (token, expert) row goes to the expert's rank: K (H-1)/H rows to
       other nodes over InfiniBand, K (L-1)/ep to other ranks of the node over NVLink (together the (ep-1)/ep of
       the K rows that leave the GPU); the two links run at once, so the pass takes the longer of the two.
       hierarchical: a token crosses to another node once per node holding any of its experts, m (H-1)/H rows
       over InfiniBand with m the expected number of distinct nodes holding its experts, then the receiving rank
       fans its K assignments out over the node's L ranks, K (L-1)/L rows over NVLink (the combine comes back the
       same way, one weighted sum per (token, node) between nodes); the hop and the fan-out of a chunk run one
       after the other, so the pass takes their sum. m: the expected number of bins hit by g draws without
       replacement from n items in H equal bins, H (1 - C(n - n/H, g) / C(n, g)): with group-limited routing
       whose groups each lie on one node (n_group a multiple of H) n = n_group groups and g = min(K, topk_group)
       (a token's experts lie in topk_group groups, each taken to hold at least one of them), else n = the routed
       experts and g = K. In the critical path, less, with parallel.ep_overlap, the compute it hides under
       (parallel/expert.py): the shared experts and, of the routed experts' GEMMs, all but one chunk's
       ((C-1)/C with C = parallel.ep_chunks), in each forward (a full recomputation's too), none in backward
       (the estimate nearest the measured wait, see `_expert_overlap_flops`); only what outlasts that compute
       shows (shared over the per-link entries by their seconds). With parallel.pp_overlap_fb (DualPipeV), the
       share of a rank's microbatch-stages that run as a forward beside another's backward (`paired_fraction`)
       hides its all-to-alls instead under the pair's GEMMs of those layers (attention projections, shared and
       routed experts; forward, backward's two passes and a full recomputation's forward; not the attention core),
       which the other thread computes meanwhile.
  cp   Ulysses all-to-alls per attention layer and micro-batch, forward and backward (and once more in a full
       recomputation): q, k, v to whole sequences and the output back, (cp-1)/cp of the micro-batch's
       H x (2 (N+R) + 2 V) elements per token. In the critical path.
  tp   sequence-parallel all-gather / reduce-scatter around attention and the MLP, an all-reduce for the
       shared experts (MoE layers), each (tp-1)/tp of the micro-batch's activations. In the critical path.
  pp   one activation forward and one gradient back per micro-batch and stage boundary. In the critical path.
  fsdp all-gather of weights (per micro-batch forward and backward, or once per step under pipelining) and
       reduce-scatter of gradients, (n-1)/n of the unsharded bytes; HSDP adds an all-reduce of the shards over
       dp_replicate. Prefetched: only what exceeds the compute time shows.
Bubble: per micro-batch a rank's work is F (forward), B (input gradients), W (weight gradients), split by
FLOPs (W = the GEMMs' weight gradients; B = the other GEMM half plus twice the attention core); bubbles as
DeepSeek-V3's table 2: 1F1B (pp-1)(F+B+W), interleaved /v, ZB-V (pp-1)(F+B-2W), DualPipeV
(pp-1)(F+2B-3W) per chunk, never below zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from model.analysis import attention_core_widths, attention_params, forward_flops_per_token, training_flops_per_token
from model.config import ModelConfig

from train.hardware import GPU
from .memory import Layout, StageShapes, gathered_element_bytes, rank_layers, unsharded_elements


EP_A2A = "ep all-to-all"  # the expert all-to-all between nodes (within the node where the ep group fits in one)
EP_A2A_IN_NODE = "ep all-to-all, in-node"  # its part within a node where the ep group spans several


@dataclass
class Collective:
    name: str
    bytes_per_step: float  # sent by one GPU
    link: str  # nvlink | ib
    seconds: float
    exposed: float  # seconds on the critical path
    prefetched: bool = False  # runs beside the whole step's compute (FSDP); shows where it outlasts it


@dataclass
class StepCost:
    compute_s: float
    bubble_fraction: float  # idle share of a pipeline rank's step
    comms: list[Collective] = field(default_factory=list)
    step_s: float = 0.0
    tokens_per_s_per_gpu: float = 0.0
    mfu: float = 0.0  # model FLOPs (no recomputation) / BF16 peak


def _group_link(stride: int, size: int, gpus_per_node: int) -> str:
    """NVLink when a group of `size` ranks `stride` apart fits inside one node, else InfiniBand."""
    return "nvlink" if size == 1 or stride * size <= gpus_per_node else "ib"


def _attention_core_flops(m: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of QK^T and PV over all layers (causal: (T+1)/2 keys on average)."""
    return 2 * m.num_attention_heads * sum(attention_core_widths(m)) * (seq_len + 1) / 2 * m.num_hidden_layers


def bubble_fraction(layout: Layout, m: ModelConfig, seq_len: int) -> float:
    """Idle share of a pipeline rank's step under `layout.schedule` (0 without pipelining)."""
    d, n = layout.dims, layout.n_micro
    if d.pp == 1:
        return 0.0
    attn = _attention_core_flops(m, seq_len)
    gemm = forward_flops_per_token(m, seq_len) - attn
    f, b, w = gemm + attn, gemm + 2 * attn, gemm
    v = d.pp_stages_per_rank
    per_micro = f + b + w  # a rank's work per micro-batch (all its chunks)
    bubble = {"GPipe": (d.pp - 1) * per_micro, "1F1B": (d.pp - 1) * per_micro,
              "Interleaved1F1B": (d.pp - 1) * per_micro / v,
              "ZBVZeroBubble": (d.pp - 1) * (f + b - 2 * w) / v,
              "DualPipeV": (d.pp - 1) * (f + 2 * b - 3 * w) / v}[layout.schedule]
    bubble = max(bubble, 0.0)
    return bubble / (n * per_micro + bubble)


def _routed_flops_per_token(m: ModelConfig) -> float:
    """Training FLOPs per token of the routed experts (all MoE layers)."""
    n_moe = sum(m.is_moe_layer(i) for i in range(m.num_hidden_layers))
    return 3 * 2 * m.num_experts_per_tok * 3 * m.hidden_size * m.moe_intermediate_size * n_moe


def _fp8_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of the GEMMs an FP8 recipe converts: every linear but the head and router."""
    attn = _attention_core_flops(m, seq_len)
    head = 2 * m.hidden_size * m.vocab_size
    router = 2 * m.hidden_size * m.n_routed_experts * sum(m.is_moe_layer(i) for i in range(m.num_hidden_layers))
    return 3 * (forward_flops_per_token(m, seq_len) - attn - head - router)


def _up_projection_params(m: ModelConfig) -> int:
    """Weights of the projections selective recomputation reruns (parallel/recompute.py): MLA's up-projections
    (kv_b_proj, q_b_proj), the q/k/v projections otherwise."""
    h, d = m.num_attention_heads, m.hidden_size
    if m.attention != "mla":
        return d * (h + 2 * m.kv_heads) * m.attn_head_dim
    ups = m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
    return ups + (m.q_lora_rank or 0) * h * m.qk_head_dim


def compute_seconds(m: ModelConfig, layout: Layout, seq_len: int, tokens_per_gpu: float, gpu: GPU,
                    efficiency: float) -> float:
    """Seconds of arithmetic per step on one GPU (recomputation and tp-redundant experts included)."""
    total = training_flops_per_token(m, seq_len) * tokens_per_gpu
    total += _routed_flops_per_token(m) * tokens_per_gpu * (layout.dims.tp - 1)  # every tp rank runs them all
    if layout.activation_checkpoint == "full":
        total += forward_flops_per_token(m, seq_len) * tokens_per_gpu
    elif layout.activation_checkpoint == "selective":
        total += 2 * _up_projection_params(m) * m.num_hidden_layers * tokens_per_gpu
    if layout.fused_loss:  # the fused loss recomputes the logits (main head and each MTP depth's) in backward
        total += 2 * m.hidden_size * m.vocab_size * (1 + m.num_nextn_predict_layers) * tokens_per_gpu
    fp8 = _fp8_flops_per_token(m, seq_len) * tokens_per_gpu if layout.fp8 else 0.0
    return ((total - fp8) / gpu.bf16_tflops + fp8 / gpu.fp8_tflops) / (1e12 * efficiency)


def _rank_layers_with_mtp(m: ModelConfig, layout: Layout, pp_rank: int) -> list[int]:
    """Layer indices pipeline rank `pp_rank` runs, its MTP depths (numbered after the main layers) included."""
    layers, head = rank_layers(m, layout, pp_rank)
    return layers + [m.num_hidden_layers + k for k in range(m.num_nextn_predict_layers if head else 0)]


def collectives(shapes: StageShapes, layout: Layout, seq_len: int, gpu: GPU, cluster,
                pp_rank: int = 0) -> list[Collective]:
    """Bytes per step each GPU of pipeline rank `pp_rank` sends, per kind of collective, and their time."""
    m, d = shapes.cfg, layout.dims
    a, per_node = layout.param_bytes, cluster.gpus_per_node
    efsdp = d.dp_shard // d.ep
    tokens, n = layout.micro_tokens, layout.n_micro
    layers = _rank_layers_with_mtp(m, layout, pp_rank)
    out: list[tuple[str, float, str, bool]] = []  # name, bytes, link, overlapped with compute
    if d.ep > 1:
        n_moe = sum(m.is_moe_layer(i) for i in layers)
        out += [(name, nbytes, link, False) for name, nbytes, link in _expert_all_to_all(m, layout, n_moe, per_node)]
    if d.cp > 1:  # Ulysses: q, k, v to whole sequences and the output back, per attention layer
        passes = 3 if layout.activation_checkpoint == "full" else 2
        qk, v = attention_core_widths(m)  # q and the output over all heads, k and v over the K/V heads
        width = m.num_attention_heads * (qk + v) + m.kv_heads * (qk + v)
        out.append(("cp all-to-all", passes * n * len(layers) * tokens * width * a * (d.cp - 1) / d.cp,
                    _group_link(d.ep * d.tp, d.cp, per_node), False))
    if d.tp > 1:
        units = sum(5 if m.is_moe_layer(i) else 4 for i in layers) * 2  # forward + backward
        out.append(("tp all-gather/reduce-scatter", units * n * tokens * m.hidden_size * a * (d.tp - 1) / d.tp,
                    _group_link(1, d.tp, per_node), False))
    if d.pp > 1:
        p2p = 2 * n * d.pp_stages_per_rank * tokens * m.hidden_size / d.tp * a
        out.append(("pp send/recv", p2p, _group_link(d.world_size // d.pp, d.pp, per_node), False))
    groups = unsharded_elements(shapes(layout, pp_rank), layout).values()
    dense = sum(g["linear"] + g["router"] + g["other"] for g in groups)
    experts = sum(g["experts"] for g in groups)
    gathers = 1 if layout.gathered_through_step else 2 * n  # all-gathers per step
    scatters = 1 if layout.gathered_through_step else n
    per_elem = gathers * a + scatters * layout.reduce_bytes
    shards = d.dp_shard * d.cp  # FSDP shards over the context-parallel ranks too
    if shards > 1:
        per_kind = gathered_element_bytes(layout)
        gathered = sum(g[k] * per_kind[k] for g in groups for k in ("linear", "router", "other"))
        dense_bytes = gathers * gathered + scatters * layout.reduce_bytes * dense
        out.append(("fsdp all-gather/reduce-scatter (dense)", dense_bytes * (shards - 1) / shards,
                    _group_link(d.tp, shards, per_node), True))
    expert_shards = efsdp * d.cp if d.ep > 1 else shards
    if expert_shards > 1:
        moved = per_elem * experts * (expert_shards - 1) / expert_shards
        link = _group_link(d.ep * d.tp, expert_shards, per_node)
        out.append(("fsdp all-gather/reduce-scatter (experts)", moved, link, True))
    if d.dp_replicate > 1:
        shard = (dense / shards + experts / expert_shards) * layout.reduce_bytes
        # once per step: the trainer (and, under pipelining, torch's schedule) defers it to the last micro-batch
        out.append(("hsdp all-reduce", 2 * shard * (d.dp_replicate - 1) / d.dp_replicate,
                    _group_link(shards * d.tp, d.dp_replicate, per_node), True))
    result = []
    for name, nbytes, link, prefetched in out:
        bw = (gpu.nvlink_one_way_gbps if link == "nvlink" else gpu.ib_gbps) * 1e9 * cluster.link_efficiency
        seconds = nbytes / bw
        result.append(Collective(name, nbytes, link, seconds, 0.0 if prefetched else seconds, prefetched))
    if d.ep > 1:
        flops_per_s = gpu.bf16_tflops * 1e12 * cluster.gemm_efficiency
        _expose_expert_all_to_all(result, layout.ep_hierarchical, _expert_hides(m, layout, n_moe, flops_per_s))
    return result


def _expected_bins_hit(items: int, bins: int, draws: int) -> float:
    """Expected number of `bins` equal bins of `items` items holding at least one of `draws` items drawn uniformly
    without replacement: bins x (1 - C(items - items/bins, draws) / C(items, draws))."""
    return bins * (1 - math.comb(items - items // bins, draws) / math.comb(items, draws))


def expert_nodes(m: ModelConfig, nodes: int) -> float:
    """Expected number of distinct nodes, of the `nodes` an ep group spans, that hold a token's experts: routing
    groups drawn (node-limited routing: n_group a multiple of `nodes`, each group on one node), else experts."""
    if nodes == 1:
        return 1.0
    if m.topk_method != "greedy" and m.n_group > 1 and m.n_group % nodes == 0:
        return _expected_bins_hit(m.n_group, nodes, min(m.num_experts_per_tok, m.topk_group))
    return _expected_bins_hit(m.n_routed_experts, nodes, m.num_experts_per_tok)


def expert_rows_per_token(m: ModelConfig, ep: int, nodes: int, hierarchical: bool) -> tuple[float, float]:
    """Rows of D one rank sends per token and pass (dispatch or combine) of the expert all-to-all, an ep group of
    `ep` ranks over `nodes` nodes: (to other nodes, to other ranks of its node)."""
    k, local = m.num_experts_per_tok, ep / nodes
    if hierarchical:
        return expert_nodes(m, nodes) * (nodes - 1) / nodes, k * (local - 1) / local
    return k * (nodes - 1) / nodes, k * (local - 1) / ep


def _ep_nodes(layout: Layout, ranks_per_node: int) -> int:
    """Nodes an ep group spans: its ep ranks lie tp apart, whole nodes where it spans several."""
    return max(1, -(-layout.dims.ep * layout.dims.tp // ranks_per_node))


def _expert_all_to_all(m: ModelConfig, layout: Layout, n_moe: int, per_node: int) -> list[tuple[str, float, str]]:
    """The expert all-to-all's (name, bytes one GPU sends per step, link) per link that carries any."""
    passes = 6 if layout.activation_checkpoint == "full" else 4
    row_bytes = passes * layout.n_micro * n_moe * layout.micro_tokens * m.hidden_size * layout.param_bytes
    nodes = _ep_nodes(layout, per_node)
    between, within = expert_rows_per_token(m, layout.dims.ep, nodes, layout.ep_hierarchical)
    if nodes == 1:
        return [(EP_A2A, within * row_bytes, "nvlink")]
    return [(EP_A2A, between * row_bytes, "ib")] + ([(EP_A2A_IN_NODE, within * row_bytes, "nvlink")] if within else [])


def _expose_expert_all_to_all(comms: list[Collective], hierarchical: bool, hides: list[tuple[float, float]]) -> None:
    """Set the exposed seconds of the expert all-to-all's per-link entries: their sum (hierarchical: the hop and
    the fan-out one after the other) or the longest (flat: both links at once), less what `hides` (`_expert_hides`)
    hides, shared by seconds."""
    parts = [c for c in comms if c.name in (EP_A2A, EP_A2A_IN_NODE)]
    total = sum(c.seconds for c in parts)
    seconds = total if hierarchical else max((c.seconds for c in parts), default=0.0)
    for c in parts:
        c.exposed = _exposed(seconds, hides) * c.seconds / total if total else 0.0


def _expert_gemm_flops(m: ModelConfig) -> tuple[float, float]:
    """Forward FLOPs per token and MoE layer of the shared experts, and of the routed experts a token reaches."""
    per_expert = 2 * 3 * m.hidden_size * m.moe_intermediate_size
    return per_expert * m.n_shared_experts, per_expert * m.num_experts_per_tok


def paired_fraction(layout: Layout) -> float:
    """The share of a pipeline rank's microbatch-stages whose forward runs beside another's backward under
    parallel.pp_overlap_fb: torch's ScheduleDualPipeV pairs all but 3 pp - 1 of the 2 n forwards (n microbatches,
    two stages) of its rank 0, which pairs the fewest; 0 without it."""
    if not layout.pp_overlap_fb:
        return 0.0
    n, pp = layout.n_micro, layout.dims.pp
    return max(0, 2 * n - 3 * pp + 1) / (2 * n)


def _expert_overlap_flops(m: ModelConfig, layout: Layout) -> float:
    """FLOPs per token and MoE layer that the expert all-to-alls hide under with parallel.ep_overlap, over the
    step's passes: the shared experts and (C-1)/C of the routed experts' GEMMs (C chunks) of each forward (and the
    forward once more under full recomputation). Not the backward's, though parallel/expert.py orders the backward's
    exchanges to hide as the forward's do: measured (bench/ep_overlap.py, 2 hosts at 1.6 Gbit/s), this estimate is
    1.08-1.45x the wait, and counting the backward's two passes too gives 0-0.19x (the exchanges' threads take CPU
    from the compute there); the nearer of the two, and not optimistic."""
    passes = 2 if layout.activation_checkpoint == "full" else 1  # in forward-GEMM units
    shared, routed = _expert_gemm_flops(m)
    return passes * (shared + routed * (layout.ep_chunks - 1) / layout.ep_chunks)


def _expert_hides(m: ModelConfig, layout: Layout, n_moe: int, flops_per_s: float) -> list[tuple[float, float]]:
    """How the expert all-to-alls of `n_moe` MoE layers hide, per part of the step: (share of the all-to-all
    seconds, seconds of compute that share hides under); the unpaired part under its layer's own compute (none
    without parallel.ep_overlap), the paired part (`paired_fraction`) under the pair's GEMMs of those layers
    (attention projections and experts)."""
    if not layout.ep_overlap:
        return [(1.0, 0.0)]
    seconds_per_flop = layout.n_micro * n_moe * layout.micro_tokens / flops_per_s
    within = _expert_overlap_flops(m, layout) * seconds_per_flop
    paired = paired_fraction(layout)
    if paired == 0:
        return [(1.0, within)]
    passes = 4 if layout.activation_checkpoint == "full" else 3  # forward, backward's two, a recomputed forward
    pair = passes * (2 * attention_params(m) + sum(_expert_gemm_flops(m))) * seconds_per_flop
    return [(1 - paired, (1 - paired) * within), (paired, paired * pair)]


def _exposed(seconds: float, hides: list[tuple[float, float]]) -> float:
    return sum(max(0.0, share * seconds - hidden) for share, hidden in hides)


def expert_a2a_seconds(m: ModelConfig, layout: Layout, link_bytes_per_s: float, flops_per_s: float,
                       inter_node: bool = True, ranks_per_host: int | None = None) -> tuple[float, float, float]:
    """The expert all-to-all of one rank on one link, by the formulas `collectives` uses, on the pipeline rank
    with the most MoE layers: (seconds per step of its bytes on that link at `link_bytes_per_s`, seconds of
    compute per step it hides under at `flops_per_s`, exposed seconds: the first less the second, at least 0, per
    part of the step that hides alike (`_expert_hides`), as if the other link took no time). `inter_node`: the
    bytes between hosts, else those within a host; `ranks_per_host`: ranks on each host (None: one ep rank per host
    where `inter_node`, else the whole group on one host), e.g. for a measurement on a CPU cluster of hosts joined
    by one link."""
    d = layout.dims
    per_host = ranks_per_host or (d.tp if inter_node else d.ep * d.tp)
    n_moe = max(sum(m.is_moe_layer(i) for i in _rank_layers_with_mtp(m, layout, p)) for p in range(d.pp))
    link = "ib" if inter_node else "nvlink"
    nbytes = sum(b for _, b, on in _expert_all_to_all(m, layout, n_moe, per_host) if on == link) if d.ep > 1 else 0.0
    seconds, hides = nbytes / link_bytes_per_s, _expert_hides(m, layout, n_moe, flops_per_s)
    return seconds, sum(hidden for _, hidden in hides), _exposed(seconds, hides)


def step_cost(shapes: StageShapes, layout: Layout, seq_len: int, global_batch: int, gpu: GPU, cluster) -> StepCost:
    """Estimated time of one optimizer step, tokens/s/GPU and MFU."""
    m, d = shapes.cfg, layout.dims
    tokens_per_gpu = global_batch * seq_len / d.world_size
    compute = compute_seconds(m, layout, seq_len, tokens_per_gpu * d.tp, gpu, cluster.gemm_efficiency) / d.tp
    # the pipeline runs at its slowest rank's pace: the one whose collectives take longest (stages differ: V3's
    # first stage holds its three dense layers, the last the MTP depth)
    comms = max((collectives(shapes, layout, seq_len, gpu, cluster, p) for p in range(d.pp)),
                key=lambda cs: (sum(c.exposed for c in cs), sum(c.seconds for c in cs)))
    bubble = bubble_fraction(layout, m, seq_len)
    busy = compute + sum(c.exposed for c in comms)
    hidden = sum(c.seconds for c in comms if c.prefetched)
    for c in comms:  # prefetched traffic shows where it outlasts the compute it hides behind
        if c.prefetched:
            c.exposed = max(0.0, hidden - compute) * c.seconds / hidden if hidden else 0.0
    step = busy / (1 - bubble) + max(0.0, hidden - compute)
    tps = global_batch * seq_len / step / d.world_size
    mfu = training_flops_per_token(m, seq_len) * tps / (gpu.bf16_tflops * 1e12)
    return StepCost(compute, bubble, comms, step, tps, mfu)
