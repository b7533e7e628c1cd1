"""Per-GPU memory of a training layout, from the model config and the layout alone (no process group).

Parameters: which tensors a rank holds (the pipeline stages of `parallel/pipeline.py`, shapes from the model
built on the meta device) and how much of each, by the rules `parallelize` applies: tensor parallelism splits
the column-/row-parallel weights of `parallel/tensor.py`, expert parallelism splits the expert stacks by
expert, and FSDP2 splits dim 0 of what is left like `torch.chunk` (uneven: the last ranks get less, or
nothing). That count is exact; `python -m launch.dryrun` builds the real sharded model to confirm it.

Activations: the bytes autograd keeps per token (launch/plan/activations.py), times what the pipeline
schedule keeps in flight (replayed from torch's own order of actions for the multi-stage schedules).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import prod

import torch

from model import Transformer
from model.config import ModelConfig
from parallel.dims import ParallelDims
from parallel.pipeline import canonical_schedule, rank_stage_modules, split_layers, stage_ids

from .activations import (FP32, head_activation_bytes, layer_activation_bytes, loss_workspace_bytes,
                          mtp_activation_bytes, weight_grad_bytes)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ROUTER_BYTES = 4  # routers are all-gathered and computed in fp32 under every precision (parallel/__init__.py)
# weights the tensor-parallel plan splits, by the last two components of their name: dim 0 (column-wise,
# and the vocab-parallel embedding) or dim 1 (row-wise); everything else is replicated over tp
_TP_DIM = {"q_proj.weight": 0, "q_b_proj.weight": 0, "kv_b_proj.weight": 0, "gate_proj.weight": 0,
           "k_proj.weight": 0, "v_proj.weight": 0,
           "up_proj.weight": 0, "lm_head.weight": 0, "embed_tokens.weight": 0, "o_proj.weight": 1,
           "down_proj.weight": 1}


@dataclass(frozen=True)
class Layout:
    """A parallel layout on `world` ranks with the step's micro-batching."""
    dims: ParallelDims
    schedule: str
    n_micro: int  # micro-batches per optimizer step on one data-parallel rank (accumulation or pipeline)
    micro_tokens: int  # tokens of one micro-batch on one rank (its part of each sequence under cp)
    activation_checkpoint: str
    param_bytes: int  # compute dtype of weights and activations
    reduce_bytes: int
    moment_bytes: int
    fp8: str | None  # FP8 recipe name or None
    fp8_all_gather: bool
    accumulate_unsharded: bool = False  # parallel.accumulate_unsharded (no pp)
    fused_loss: bool = False  # train.fused_loss: the head + cross-entropy fused, no logits kept
    ep_overlap: bool = False  # parallel.ep_overlap: the expert all-to-alls hidden under expert compute
    ep_chunks: int = 1  # parallel.ep_chunks
    ep_hierarchical: bool = False  # parallel.ep_dispatch=hierarchical
    pp_overlap_fb: bool = False  # parallel.pp_overlap_fb: DualPipeV's paired forward and backward at once
    optimizer: str = "adamw"  # optim.name: muon keeps one fp32 buffer for the parameters it takes, AdamW two
    muon_router: bool = True  # optim.muon_router

    @property
    def gathered_through_step(self) -> bool:
        """FSDP keeps weights gathered and gradients unsharded from the step's first forward to its one
        reduce-scatter: always under pipelining, by choice without."""
        return self.dims.pp > 1 or self.accumulate_unsharded

    @property
    def distributed(self) -> bool:
        return self.dims.world_size > 1

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinate on each mesh axis (mesh order pp, dp_replicate, efsdp, cp, ep, tp)."""
        d = self.dims
        sizes = {"pp": d.pp, "dp_replicate": d.dp_replicate, "efsdp": d.dp_shard // d.ep, "cp": d.cp, "ep": d.ep,
                 "tp": d.tp}
        out, rest = {}, rank
        for name in reversed(sizes):
            out[name] = rest % sizes[name]
            rest //= sizes[name]
        return {name: out[name] for name in sizes}


def layout_of(cfg, world: int, check_batch: bool = True, ranks_per_host: int | None = None) -> Layout:
    """The layout `cfg` (a RunConfig) describes on `world` ranks, `ranks_per_host` on each host (None: all on one);
    LayoutError for an impossible one (train.config.validate_layout). `check_batch=False`: for parameter counts
    only (the batch need not split over this many ranks)."""
    from train.config import ep_overlap_on, fused_loss_on, pipeline_microbatches, pp_overlap_fb_on, validate_layout

    p, t, pr = cfg.parallel, cfg.train, cfg.precision
    dims = validate_layout(cfg, world, check_batch, ranks_per_host)
    local = max(1, t.global_batch_size // dims.dp)
    n_micro = max(1, pipeline_microbatches(cfg, local) if dims.pp > 1 else local // t.micro_batch_size)
    return Layout(dims, canonical_schedule(p.pp_schedule), n_micro, local // n_micro * cfg.data.seq_len // dims.cp,
                  p.activation_checkpoint, DTYPE_BYTES[pr.param_dtype], DTYPE_BYTES[pr.reduce_dtype],
                  DTYPE_BYTES[pr.moment_dtype], pr.fp8_recipe, pr.fp8_fsdp_all_gather, p.accumulate_unsharded,
                  fused_loss_on(cfg), ep_overlap=ep_overlap_on(cfg), ep_chunks=p.ep_chunks,
                  ep_hierarchical=p.ep_dispatch == "hierarchical", pp_overlap_fb=pp_overlap_fb_on(cfg),
                  optimizer=cfg.optim.name, muon_router=cfg.optim.muon_router)


# --------------------------------------------------------------------------------------------- parameters
def _chunk(n: int, parts: int, index: int) -> int:
    """Rows of an n-row tensor that `torch.chunk(parts)` gives to chunk `index` (FSDP2's dim-0 sharding)."""
    size = -(-n // parts)
    return max(0, min(size, n - index * size))


def meta_model(mcfg: ModelConfig) -> Transformer:
    """The whole model on the meta device (shapes only; 0.2 s for DeepSeek-V2)."""
    with torch.device("meta"):
        return Transformer(mcfg)


def stage_parameters(model: Transformer, layout: Layout, pp_rank: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, global shape) of every parameter the ranks of pipeline rank `pp_rank` hold; `model` on meta."""
    d = layout.dims
    parts = [model] if d.pp == 1 else rank_stage_modules(model, layout.schedule, pp_rank, d.pp, d.pp_stages_per_rank)
    return [(name, tuple(p.shape)) for part in parts for name, p in part.named_parameters()]


class StageShapes:
    """The parameters of each pipeline rank, from the model on meta, computed once per (schedule, pp, stages
    per rank, pipeline rank) and grouped: (a name, shape, how many) per block and kind of sharding, so a
    layout search does arithmetic on a few dozen groups instead of every tensor."""

    def __init__(self, model: Transformer):
        self.model, self.cfg = model, model.cfg
        self._groups: dict[tuple, list[tuple[str, tuple[int, ...], int]]] = {}

    def __call__(self, layout: Layout, pp_rank: int) -> list[tuple[str, tuple[int, ...], int]]:
        d = layout.dims
        key = (layout.schedule, d.pp, d.pp_stages_per_rank, pp_rank)
        if key not in self._groups:
            groups: dict[tuple, list] = {}
            for name, shape in stage_parameters(self.model, layout, pp_rank):
                parts = name.split(".")
                kind = ("experts" if ".experts." in name else "dense", _TP_DIM.get(".".join(parts[-2:])),
                        muon_role(name))
                entry = groups.setdefault((fsdp_unit(name), kind, shape), [name, shape, 0])
                entry[2] += 1
            self._groups[key] = [tuple(g) for g in groups.values()]
        return self._groups[key]


def muon_role(name: str) -> str:
    """What decides whether Muon takes a parameter beyond its shape: "vocab" (embedding, head), "router", or ""."""
    if "embed_tokens" in name or "lm_head" in name:
        return "vocab"
    return "router" if name.endswith("mlp.gate.weight") else ""


def takes_muon(name: str, shape: tuple[int, ...], router: bool) -> bool:
    """train/muon.py's rule by name: matrices and routed-expert stacks, not the embedding or head; routers when
    optim.muon_router."""
    role = muon_role(name)
    if role == "vocab":
        return False
    if role == "router":
        return router
    return len(shape) == 2 or (".experts." in name and len(shape) == 3)


def _split_shape(name: str, shape: tuple[int, ...], layout: Layout) -> list[int]:
    """A parameter's shape after tensor / expert parallelism (before FSDP)."""
    d, shape = layout.dims, list(shape)
    if ".experts." in name:  # stacked [E, ...]: split by expert over ep
        shape[0] //= d.ep
    else:
        dim = _TP_DIM.get(".".join(name.split(".")[-2:]))
        if d.tp > 1 and dim is not None:
            shape[dim] //= d.tp
    return shape


def local_elements(name: str, shape: tuple[int, ...], layout: Layout, c: dict[str, int]) -> int:
    """Elements of parameter `name` (global `shape`) that the rank at mesh coordinates `c` holds."""
    d = layout.dims
    shape = _split_shape(name, shape, layout)
    if not layout.distributed:
        return prod(shape)
    # FSDP wraps every distributed model (also over one rank): experts over what ep leaves of dp_shard, and
    # everything over the context-parallel ranks too (flattened in mesh order: efsdp, cp, ep)
    if ".experts." in name and d.ep > 1:
        fsdp, coord = d.dp_shard // d.ep * d.cp, c["efsdp"] * d.cp + c["cp"]
    else:
        fsdp, coord = d.dp_shard * d.cp, (c["efsdp"] * d.cp + c["cp"]) * d.ep + c["ep"]
    shape[0] = _chunk(shape[0], fsdp, coord)
    return prod(shape)


def rank_parameter_elements(shapes: StageShapes, layout: Layout, rank: int) -> dict[str, int]:
    """{"dense": n, "experts": n}: parameter elements rank `rank` holds (its shards, owned elements)."""
    c = layout.coords(rank)
    out = {"dense": 0, "experts": 0}
    for name, shape, count in shapes(layout, c["pp"]):
        out["experts" if ".experts." in name else "dense"] += count * local_elements(name, shape, layout, c)
    return out


# --------------------------------------------------------------------------------------------- in flight
def _rank_actions(layout: Layout, pp_rank: int) -> list:
    """The (stage, F | B | I | W, micro-batch) actions pipeline rank `pp_rank` runs, in order, as torch's own
    multi-stage schedule class computes them (its per-rank planner, run without stages or process groups)."""
    from torch.distributed.pipelining import schedules

    from parallel.pipeline import _CLASSES

    d, n = layout.dims, layout.n_micro
    shell = _CLASSES[layout.schedule].__new__(_CLASSES[layout.schedule])
    shell.pp_group_size, shell._n_microbatches, shell.n_local_stages = d.pp, n, d.pp_stages_per_rank
    shell.num_stages, shell._stages, shell.rank = d.pp * d.pp_stages_per_rank, [None] * d.pp_stages_per_rank, pp_rank
    shell.number_of_rounds = max(1, n // d.pp)
    shell.microbatches_per_round = n // shell.number_of_rounds
    out = []
    for action in shell._calculate_single_rank_operations(pp_rank):
        if action is None:
            continue
        if action.computation_type == schedules._ComputationType.OVERLAP_F_B:
            out.extend(action.sub_actions)
        else:
            out.append(action)
    return out


def in_flight_bytes(layout: Layout, pp_rank: int, stage_bytes: dict[int, float]) -> float:
    """Peak over the step of the activation bytes (per token of a micro-batch) alive on pipeline rank `pp_rank`,
    `stage_bytes`: per stage this rank holds, (activations one micro-batch keeps, the output gradients a split
    backward keeps for its weight pass). Without pipelining one micro-batch; GPipe all; 1F1B pp - rank; the
    multi-stage schedules (interleaved, ZBV, DualPipeV) by replaying torch's order of actions: a forward adds
    the stage's activations, a full backward frees them; a split backward's input pass adds the output
    gradients and keeps the graph, its weight pass frees both."""
    d, n = layout.dims, layout.n_micro
    total = sum(kept for kept, _ in stage_bytes.values())
    if d.pp == 1:
        return total
    if layout.schedule in ("GPipe", "1F1B"):
        return total * (n if layout.schedule == "GPipe" else min(n, d.pp - pp_rank))
    now = peak = 0.0
    for action in _rank_actions(layout, pp_rank):
        kept, grads = stage_bytes[action.stage_index]
        now += {"F": kept, "B": -kept, "I": grads, "W": -kept - grads}.get(action.computation_type.value, 0.0)
        peak = max(peak, now)
    return peak


def rank_stages(m: ModelConfig, layout: Layout, pp_rank: int) -> dict[int, list[int]]:
    """{global stage index: its decoder-layer indices} for pipeline rank `pp_rank` (stage 0: everything)."""
    d = layout.dims
    if d.pp == 1:
        return {0: list(range(m.num_hidden_layers))}
    split = split_layers(m.num_hidden_layers, d.pp * d.pp_stages_per_rank)
    return {s: split[s] for s in stage_ids(layout.schedule, pp_rank, d.pp, d.pp_stages_per_rank)}


def rank_layers(m: ModelConfig, layout: Layout, pp_rank: int) -> tuple[list[int], bool]:
    """(global decoder-layer indices, whether the output head + loss is here) for pipeline rank `pp_rank`."""
    return _layers_and_head(rank_stages(m, layout, pp_rank), layout)


def _layers_and_head(stages: dict[int, list[int]], layout: Layout) -> tuple[list[int], bool]:
    last = layout.dims.pp * layout.dims.pp_stages_per_rank - 1
    return [i for s in sorted(stages) for i in stages[s]], last in stages or layout.dims.pp == 1


# --------------------------------------------------------------------------------------------- the total
@dataclass
class RankMemory:
    """Bytes on one rank at its peak (the start of the backward pass of its last in-flight micro-batch, or
    the optimizer step, whichever is higher)."""
    rank: int
    params: int  # fp32 master weights (this rank's shards)
    grads: int  # fp32 sharded gradients
    optimizer: int  # AdamW moments
    gathered: int  # FSDP's all-gathered compute copies and unsharded gradients (before reduce-scatter)
    activations: int  # kept for backward by every in-flight micro-batch
    backward_workspace: int  # the larger of: the cross-entropy's gradients over the vocabulary (last stage),
    # one layer recomputed whole (full recomputation)
    optimizer_workspace: int  # foreach AdamW temporaries (GPU)
    grads_at_peak: bool  # sharded gradients already exist while activations are alive (accumulation)

    @property
    def total(self) -> int:
        fwd_bwd = (self.grads if self.grads_at_peak else 0) + self.gathered + self.activations + self.backward_workspace
        return self.params + self.optimizer + max(fwd_bwd, self.grads + self.optimizer_workspace)

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def fsdp_unit(name: str) -> str:
    """The FSDP unit a parameter is gathered with (parallel/__init__.py): its decoder block ("layers.<i>"), its
    MTP depth's block ("mtp.<k>"), or the root: embedding, final norm, head, and each MTP depth's norms and
    eh_proj, which run outside the depth's forward."""
    parts = name.split(".")
    if parts[0] == "layers" or (parts[0] == "mtp" and len(parts) > 2 and parts[2] == "block"):
        return ".".join(parts[:2])
    return "root"


def unsharded_elements(params, layout: Layout) -> dict[str, dict[str, int]]:
    """Per FSDP unit (`fsdp_unit`: "layers.<i>", "mtp.<k>", "root"): parameter elements after
    FSDP's all-gather (split only by tp / ep), as "linear" (dense projections, which FP8 all-gathers),
    "router" (gathered in fp32 whatever the parameter dtype: parallel/__init__.py), "other" (norms, embedding,
    head) and "experts"."""
    out: dict[str, dict[str, int]] = {}
    for name, shape, count in params:
        parts, block = name.split("."), fsdp_unit(name)
        kind = ("experts" if ".experts." in name else "linear" if "_proj" in parts[-2]  # kv_a_proj_with_mqa too
                else "router" if name.endswith("mlp.gate.weight") else "other")
        entry = out.setdefault(block, {"linear": 0, "router": 0, "other": 0, "experts": 0})
        entry[kind] += count * prod(_split_shape(name, shape, layout))
    return out


def gathered_element_bytes(layout: Layout) -> dict[str, int]:
    """Bytes per element FSDP's all-gather moves and holds, by `unsharded_elements` kind: dense projections in
    FP8 under fp8_all_gather, routers in fp32, the rest in the parameter dtype."""
    w = layout.param_bytes
    return {"linear": 1 if layout.fp8_all_gather else w, "router": ROUTER_BYTES, "other": w, "experts": w}


def _gathered_bytes(params, layout: Layout) -> int:
    """FSDP2 compute copies and unsharded gradients. Under pipelining every module of the stage stays
    gathered from its first forward to the end of the step (parallel/__init__.py), and torch's schedule
    turns gradient sync off until the last backward, so FSDP accumulates every parameter's unsharded gradient
    in the reduce dtype (`unsharded_accumulated_grad`) and reduce-scatters them all once, at the end; so does
    `parallel.accumulate_unsharded` without pipelining. Otherwise: the root (embedding, head) plus two blocks
    at a time (the running one and the prefetched one), and one block's unsharded gradients on their way to
    the reduce-scatter."""
    if not layout.distributed:
        return 0
    w, per_kind = layout.param_bytes, gathered_element_bytes(layout)
    groups = unsharded_elements(params, layout)
    root_elems = sum(groups.pop("root", {}).values())
    blocks = [(sum(g[k] * per_kind[k] for k in g), sum(g.values())) for g in groups.values()]
    biggest_bytes, biggest_elems = max(blocks, default=(0, 0))
    if layout.gathered_through_step:
        all_elems = root_elems + sum(e for _, e in blocks)
        return root_elems * w + sum(b for b, _ in blocks) + all_elems * layout.reduce_bytes
    return root_elems * w + 2 * biggest_bytes + biggest_elems * (w + layout.reduce_bytes)


def rank_memory(cfg, world: int, rank: int, device: str = "cpu", ranks_per_host: int | None = None) -> RankMemory:
    """The planner's memory estimate for rank `rank` of `cfg` (a RunConfig) on `world` ranks. `device`:
    "cuda" adds the foreach AdamW temporaries torch uses on GPUs."""
    return memory_of(StageShapes(meta_model(cfg.model)), layout_of(cfg, world, ranks_per_host=ranks_per_host), rank,
                     device)


def memory_of(shapes: StageShapes, layout: Layout, rank: int, device: str = "cuda") -> RankMemory:
    """Peak memory of rank `rank` (`shapes`: one StageShapes per model, shared by many layouts)."""
    m = shapes.cfg
    c = layout.coords(rank)
    params = shapes(layout, c["pp"])
    n = sum(count * local_elements(name, shape, layout, c) for name, shape, count in params)
    d, a = layout.dims, layout.param_bytes
    stages = rank_stages(m, layout, c["pp"])
    layers, has_head = _layers_and_head(stages, layout)
    mode, fused = layout.activation_checkpoint, layout.fused_loss
    last = d.pp * d.pp_stages_per_rank - 1
    stage_bytes = {}
    for stage, ids in stages.items():
        kept = sum(layer_activation_bytes(m, i, a, d.tp, d.ep, mode) for i in ids)
        grads = sum(weight_grad_bytes(m, i, a, d.tp) for i in ids)
        if stage == last or d.pp == 1:
            kept += head_activation_bytes(m, a, d.tp, mode, d.pp > 1, fused)
            kept += mtp_activation_bytes(m, a, d.tp, d.ep, mode, fused)
            grads += weight_grad_bytes(m, None, a, d.tp, fused)
        else:  # a pipeline stage keeps its output hidden states until the micro-batch's backward
            kept += a * m.hidden_size / d.tp
        stage_bytes[stage] = (kept, grads)
    workspace = loss_workspace_bytes(m, a, d.tp, fused) if has_head else 0
    if mode == "full" and layers:  # after the loss: the last layer recomputed whole, the head's tensors freed
        # (but not the vocabulary-parallel loss's: its autograd function keeps them until the step's graph dies)
        recomputed = max(layer_activation_bytes(m, i, a, d.tp, d.ep) for i in layers)
        kept_by_loss = 2 * FP32 * m.vocab_size / d.tp if d.tp > 1 and not fused else 0
        freed = head_activation_bytes(m, a, d.tp, mode, fused=fused) - kept_by_loss
        workspace = max(workspace, recomputed - (freed if has_head else 0))
    tokens = layout.micro_tokens
    acts = int(in_flight_bytes(layout, c["pp"], stage_bytes) * tokens)
    largest = max((local_elements(nm, s, layout, c) for nm, s, _ in params), default=0)
    muon = [(nm, s, k) for nm, s, k in params if layout.optimizer == "muon" and takes_muon(nm, s, layout.muon_router)]
    n_muon = sum(k * local_elements(nm, s, layout, c) for nm, s, k in muon)
    opt_ws = FP32 * (n - n_muon) if device != "cpu" else FP32 * largest
    # Muon: one whole matrix (stack) gathered and orthogonalised at a time, about four copies of it in fp32
    opt_ws += 4 * FP32 * max((prod(s) for _, s, _ in muon), default=0)
    # sharded gradients exist during forward/backward once a micro-batch was reduce-scattered: with plain
    # accumulation; not when gradients stay unsharded until the step's one reduce-scatter
    sharded_grads_live = layout.n_micro > 1 and not layout.gathered_through_step
    optimizer = 2 * layout.moment_bytes * (n - n_muon) + FP32 * n_muon  # Muon: its momentum buffer
    return RankMemory(rank, FP32 * n, FP32 * n, optimizer, _gathered_bytes(params, layout),
                      acts, int(workspace * tokens), opt_ws, sharded_grads_live)
