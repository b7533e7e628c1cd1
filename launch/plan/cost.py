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
       full recomputation): tokens x top-k rows of D, the (ep-1)/ep that leave the GPU. In the critical path,
       less, with parallel.ep_overlap, the compute it hides under (parallel/expert.py): the shared experts and,
       of the routed experts' GEMMs, all but one chunk's ((C-1)/C with C = parallel.ep_chunks), in each pass;
       only what outlasts that compute shows.
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

from dataclasses import dataclass, field

from model.analysis import attention_core_widths, forward_flops_per_token, training_flops_per_token
from model.config import ModelConfig

from train.hardware import GPU
from .memory import Layout, StageShapes, gathered_element_bytes, rank_layers, unsharded_elements


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


def collectives(shapes: StageShapes, layout: Layout, seq_len: int, gpu: GPU, cluster,
                pp_rank: int = 0) -> list[Collective]:
    """Bytes per step each GPU of pipeline rank `pp_rank` sends, per kind of collective, and their time."""
    m, d = shapes.cfg, layout.dims
    a, per_node = layout.param_bytes, cluster.gpus_per_node
    efsdp = d.dp_shard // d.ep
    tokens, n = layout.micro_tokens, layout.n_micro
    layers, head = rank_layers(m, layout, pp_rank)
    layers = layers + [m.num_hidden_layers + k for k in range(m.num_nextn_predict_layers if head else 0)]  # MTP
    n_moe = sum(m.is_moe_layer(i) for i in layers)
    out: list[tuple[str, float, str, bool]] = []  # name, bytes, link, overlapped with compute
    hide = {}  # seconds of compute a collective hides under, where it is not prefetched
    if d.ep > 1:
        out.append(_expert_all_to_all(m, layout, n_moe, per_node))
        if layout.ep_overlap:
            hide["ep all-to-all"] = _expert_overlap_flops(m, layout) * n * n_moe * tokens / (
                gpu.bf16_tflops * 1e12 * cluster.gemm_efficiency)
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
        exposed = 0.0 if prefetched else max(0.0, seconds - hide.get(name, 0.0))
        result.append(Collective(name, nbytes, link, seconds, exposed, prefetched))
    return result


def _expert_all_to_all(m: ModelConfig, layout: Layout, n_moe: int, per_node: int) -> tuple[str, float, str, bool]:
    """The expert all-to-all's (name, bytes one GPU sends per step, link, prefetched)."""
    d = layout.dims
    passes = 6 if layout.activation_checkpoint == "full" else 4
    rows = passes * layout.n_micro * n_moe * layout.micro_tokens * m.num_experts_per_tok * m.hidden_size
    return "ep all-to-all", rows * layout.param_bytes * (d.ep - 1) / d.ep, _group_link(d.tp, d.ep, per_node), False


def _expert_overlap_flops(m: ModelConfig, layout: Layout) -> float:
    """FLOPs per token and MoE layer that the expert all-to-alls hide under with parallel.ep_overlap, over the
    step's passes: the shared experts and (C-1)/C of the routed experts' GEMMs (C chunks), forward and backward
    (and the forward once more under full recomputation)."""
    passes = 4 if layout.activation_checkpoint == "full" else 3  # in forward-GEMM units: forward 1, backward 2
    shared = 2 * 3 * m.hidden_size * m.moe_intermediate_size * m.n_shared_experts
    routed = 2 * 3 * m.hidden_size * m.moe_intermediate_size * m.num_experts_per_tok
    return passes * (shared + routed * (layout.ep_chunks - 1) / layout.ep_chunks)


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
