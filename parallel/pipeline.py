"""Pipeline parallelism with torch.distributed.pipelining: layer split, stage modules, schedules.

Stage s of S owns the contiguous layers `split_layers(L, S)[s]`; stage 0 also the embedding, stage S-1 the final
norm and head (and, with MTP, the MTP modules and a copy of the embedding whose gradient the trainer adds to
stage 0's). A rank keeps one `Transformer` per stage it holds with the other layers removed, so parameter
names stay the whole model's and checkpoints load across layouts. Placement (`stage_ids`): loop style (rank r
holds r, r+pp, ...: GPipe, 1F1B, Interleaved1F1B) or V style (r and 2pp-1-r: ZBVZeroBubble, DualPipeV).

The loss given to a schedule is each microbatch's mean but back-propagates 1/n_microbatches, and every MoE
layer's balance losses are scaled alike: gradients equal single-process accumulation (schedules are built with
scale_grads=False). Balance losses travel in backward (AuxLossInjector), so stages exchange hidden states only.
Stage shapes are static (`_stage_io`): torch's shape inference would run an extra forward into the MoE load
counters. Call these before FSDP/EP wrap each part.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from model.transformer import Transformer, lm_and_mtp_loss

__all__ = ["SCHEDULES", "stage_ids", "split_layers", "build_stage_modules", "build_pipeline",
           "pipeline_schedule", "pipeline_step", "canonical_schedule", "tied_embedding_copy",
           "ends_share_rank"]

SCHEDULES = ("1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV")
_CLASSES = {
    "GPipe": ScheduleGPipe,
    "1F1B": Schedule1F1B,
    "Interleaved1F1B": ScheduleInterleaved1F1B,
    "ZBVZeroBubble": ScheduleZBVZeroBubble,
    "DualPipeV": ScheduleDualPipeV,
}
SCHEDULE_NAMES = tuple(_CLASSES)  # every name `canonical_schedule` accepts (case-insensitive)
_SINGLE_STAGE = ("GPipe", "1F1B")
_V_STYLE = ("ZBVZeroBubble", "DualPipeV")


# --------------------------------------------------------------------------------------------- layout
def canonical_schedule(schedule: str) -> str:
    """The schedule's canonical name (matched case-insensitively), or ValueError listing the choices."""
    names = {name.lower(): name for name in _CLASSES}
    name = names.get(str(schedule).lower())
    if name is None:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {sorted(_CLASSES)}")
    return name


def _check_stages_per_rank(schedule: str, stages_per_rank: int) -> None:
    if schedule in _SINGLE_STAGE and stages_per_rank != 1:
        raise ValueError(f"pipeline schedule {schedule} runs 1 stage per rank, got stages_per_rank={stages_per_rank}")
    if schedule == "Interleaved1F1B" and stages_per_rank < 2:
        raise ValueError(f"pipeline schedule Interleaved1F1B needs stages_per_rank >= 2, got {stages_per_rank} "
                         f"(use 1F1B for one stage per rank)")
    if schedule in _V_STYLE and stages_per_rank != 2:
        raise ValueError(f"pipeline schedule {schedule} places exactly 2 stages per rank (V shape), "
                         f"got stages_per_rank={stages_per_rank}")


def stage_ids(schedule: str, pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """Global stage indices held by `pp_rank` (loop style r, r+pp, ...; V style r, 2pp-1-r)."""
    schedule = canonical_schedule(schedule)
    _check_stages_per_rank(schedule, stages_per_rank)
    if pp < 1 or not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank={pp_rank} must lie in [0, pp={pp})")
    if schedule in _V_STYLE:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def split_layers(num_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous global layer indices per stage; sizes differ by at most one.

    Every stage gets floor(L/S) layers; the L mod S extra layers go first to the middle stages
    (1, 2, ..., S-2), then to stage 0, and last to stage S-1: the end stages carry the embedding and the
    output head (+ loss over the vocabulary), so they get the fewer layers (as DeepSeek does).
    E.g. 27 layers over 4 stages -> 7, 7, 7, 6; 6 over 4 -> 1, 2, 2, 1.
    """
    if n_stages < 1:
        raise ValueError(f"number of pipeline stages must be >= 1, got {n_stages}")
    if num_layers < n_stages:
        raise ValueError(f"num_hidden_layers={num_layers} cannot fill {n_stages} pipeline stages "
                         f"(each stage needs at least one layer)")
    base, extra = divmod(num_layers, n_stages)
    priority = [*range(1, n_stages - 1), 0, n_stages - 1]  # only the first L mod S < S are used
    sizes = [base] * n_stages
    for stage in priority[:extra]:
        sizes[stage] += 1
    starts = [sum(sizes[:s]) for s in range(n_stages)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes)]


# --------------------------------------------------------------------------------------------- stage modules
def _check_model(model: Transformer, n_stages: int) -> None:
    cfg = model.cfg
    if n_stages == 1:
        return
    if cfg.tie_word_embeddings:
        raise ValueError("model.tie_word_embeddings=true is not supported with pipeline parallelism "
                         "(the embedding and the output head live on different stages)")
    missing = [i for i in range(cfg.num_hidden_layers) if str(i) not in model.layers]
    if missing or model.embed_tokens is None or model.lm_head is None or model.norm is None:
        raise ValueError("build_stage_modules needs the whole model (all layers, embedding, norm, head); "
                         f"missing layers {missing}")


def build_stage_modules(model: Transformer, stage: int, n_stages: int) -> Transformer:
    """A copy of `model` that keeps only stage `stage`'s layers (+ embedding on stage 0, norm, head and MTP
    on the last stage). Parts not kept are never copied (works on meta, CPU or GPU models); `model` itself
    is left unchanged."""
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage={stage} must lie in [0, n_stages={n_stages})")
    _check_model(model, n_stages)
    keep = {str(i) for i in split_layers(model.cfg.num_hidden_layers, n_stages)[stage]}
    dropped: list[nn.Module | None] = [block for name, block in model.layers.items() if name not in keep]
    last = stage == n_stages - 1
    if stage != 0 and not (last and model.mtp):  # MTP on the last stage embeds too: a tied copy
        dropped.append(model.embed_tokens)
    if not last:
        dropped += [model.norm, model.lm_head, model.mtp]
    # deepcopy maps anything already in the memo to the memo's value: dropped modules become None uncopied
    memo = {id(module): None for module in dropped if module is not None}
    part = copy.deepcopy(model, memo)
    for name in [name for name, block in part.layers.items() if block is None]:
        del part.layers[name]
    part.stage_index, part.n_stages = stage, n_stages
    part.output_hidden = bool(last and model.mtp)  # heads run in the loss (`heads_from_labels`)
    return part


def rank_stage_modules(model: Transformer, schedule: str, pp_rank: int, pp: int,
                       stages_per_rank: int) -> list[Transformer]:
    """The stage modules pipeline rank `pp_rank` holds under `schedule` (`build_stage_modules` of each)."""
    ids = stage_ids(canonical_schedule(schedule), pp_rank, pp, stages_per_rank)
    return [build_stage_modules(model, stage_id, pp * stages_per_rank) for stage_id in ids]


def ends_share_rank(schedule: str) -> bool:
    """Whether one rank holds both the first and the last stage (V placement)."""
    return canonical_schedule(schedule) in _V_STYLE


def tied_embedding_copy(part: Transformer) -> bool:
    """True for the last stage's copy of the embedding (MTP), whose gradient the trainer adds to stage 0's."""
    return part.embed_tokens is not None and getattr(part, "stage_index", 0) != 0


# --------------------------------------------------------------------------------------------- loss scale
class _MeanOverMicrobatches(torch.autograd.Function):
    """Identity on the loss value; backward passes `scale` (1/n_microbatches) times the incoming gradient."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, scale: float):
        ctx.scale = scale
        return loss.clone()  # not a view: zero-bubble schedules detach the loss in place

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _microbatch_loss(loss_fn: Callable, scale: float, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _MeanOverMicrobatches.apply(loss_fn(output, target), scale)


def _with_mtp(loss_fn: Callable, part: Transformer) -> Callable:
    """The last stage's loss when it emits hidden states: main head + MTP heads, as the trainer's single-stage
    loss (depth k predicts labels[:, k:], weighted mtp_loss_weight / depth)."""
    def loss(h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits, mtp = part.heads_from_labels(h, labels)
        return lm_and_mtp_loss(loss_fn, logits, mtp, labels, part.mtp_loss_weight, part.sequence_shard[1])
    return loss


# --------------------------------------------------------------------------------------------- pipeline
def _group_of(pp_mesh_or_group) -> dist.ProcessGroup | None:
    """A 1-D DeviceMesh's process group, a ProcessGroup as is; None means the default (world) group."""
    get_group = getattr(pp_mesh_or_group, "get_group", None)
    return get_group() if get_group is not None else pp_mesh_or_group


def check_microbatches(schedule: str, n_microbatches: int, pp: int, n_stages: int) -> None:
    if n_microbatches < 1:
        raise ValueError(f"n_microbatches must be >= 1, got {n_microbatches}")
    need = {"1F1B": n_stages, "DualPipeV": n_stages}.get(schedule, 1)  # torch's own limits, checked early
    if n_microbatches < need:
        raise ValueError(f"pipeline schedule {schedule} with {n_stages} stages on pp={pp} ranks needs "
                         f"n_microbatches >= {need}, got {n_microbatches}")


def _stage_io(part: Transformer, microbatch_size: int, seq_len: int, dtype: torch.dtype):
    """Example (meta) input and output of a stage, for PipelineStage's static metadata."""
    cfg = part.cfg
    # requires_grad marks what carries a gradient back (torch derives the gradient metadata from it)
    hidden = torch.empty(microbatch_size, seq_len, cfg.hidden_size, dtype=dtype, device="meta", requires_grad=True)
    tokens = torch.empty(microbatch_size, seq_len, dtype=torch.long, device="meta")
    logits = torch.empty(microbatch_size, seq_len, cfg.vocab_size, dtype=dtype, device="meta", requires_grad=True)
    inputs = tokens if part.stage_index == 0 else hidden
    outputs = logits if part.lm_head is not None and not (part.output_hidden or part.return_head_input) else hidden
    return inputs, outputs


def _check_output(expected: torch.Tensor, module: nn.Module, args, output: torch.Tensor) -> None:
    """Forward hook: the stage's output must match its declared metadata (torch checks this only under
    TORCH_DISTRIBUTED_DEBUG=DETAIL; a mismatch would otherwise corrupt the next stage's receive)."""
    if output.shape != expected.shape or output.dtype != expected.dtype:
        raise ValueError(f"pipeline stage output {tuple(output.shape)} {output.dtype} differs from the declared "
                         f"{tuple(expected.shape)} {expected.dtype}: microbatch_size, seq_len and activation_dtype "
                         f"given to build_pipeline must match the data and the compute dtype")


def build_pipeline(model: Transformer, pp_mesh_or_group, schedule: str, n_microbatches: int,
                   stages_per_rank: int, loss_fn: Callable, device, *, microbatch_size: int, seq_len: int,
                   activation_dtype: torch.dtype | None = None, loss_for: Callable | None = None):
    """This rank's stage modules and the torch schedule that runs them -> (schedule, model_parts).

    model: the whole model (same weights on every pp rank), before FSDP/EP; it is not modified.
    pp_mesh_or_group: the 1-D "pp" DeviceMesh, a ProcessGroup, or None for the world group.
    loss_fn(logits, labels): per-microbatch mean loss. microbatch_size, seq_len: the shape of one
    microbatch of token ids (local batch = n_microbatches * microbatch_size). activation_dtype: dtype of
    the hidden states and logits a stage emits (default: the model's parameter dtype; bf16 under an FSDP
    param_dtype of bfloat16). loss_for(part) -> loss_fn: a loss of the stage module itself (a fused head's loss reads
    its weight), used instead of loss_fn where given.
    Run a step with `pipeline_step` (or schedule.step(tokens) on the first-stage rank, step(target=labels,
    losses=list) on the last, step() elsewhere). A step of another number of microbatches (a batch-size
    ramp-up) needs a schedule of its own: `pipeline_schedule(model_parts, n, device)`.
    """
    schedule = canonical_schedule(schedule)
    group = _group_of(pp_mesh_or_group)
    pp, pp_rank = dist.get_world_size(group), dist.get_rank(group)
    n_stages = pp * stages_per_rank
    check_microbatches(schedule, n_microbatches, pp, n_stages)
    dtype = activation_dtype or next(model.parameters()).dtype
    parts = rank_stage_modules(model, schedule, pp_rank, pp, stages_per_rank)
    for part in parts:
        part.pp_group, part.pp_schedule, part.microbatch_size, part.seq_len = group, schedule, microbatch_size, seq_len
        part.activation_dtype = dtype
        part.stage_owners = [stage_ids(schedule, r, pp, stages_per_rank) for r in range(pp)]  # for `pipeline_eval`
        part.register_forward_hook(partial(_check_output, _stage_io(part, microbatch_size, seq_len, dtype)[1]))
        part_loss = loss_fn if loss_for is None or part.lm_head is None else loss_for(part)
        part.stage_loss = part_loss
        if part.lm_head is not None and part.output_hidden:
            part.mtp_loss_weight = part.cfg.mtp_loss_weight  # the trainer may change it as the run goes
            part.stage_loss = _with_mtp(part_loss, part)
    return pipeline_schedule(parts, n_microbatches, device), parts


def pipeline_schedule(model_parts: list[Transformer], n_microbatches: int, device):
    """A torch schedule running `build_pipeline`'s stage modules `n_microbatches` microbatches a step (fresh
    stages over the same modules: torch prepares a stage's buffers for one microbatch count). Sets every MoE
    layer's balance-loss scale to 1/n_microbatches. Call it on every pp rank for the same step."""
    part0 = model_parts[0]
    schedule, group = part0.pp_schedule, part0.pp_group
    check_microbatches(schedule, n_microbatches, dist.get_world_size(group), part0.n_stages)
    stages = []
    for part in model_parts:
        part.set_aux_loss_scale(1.0 / n_microbatches)
        inputs, outputs = _stage_io(part, part.microbatch_size, part.seq_len, part.activation_dtype)
        stages.append(PipelineStage(part, part.stage_index, part.n_stages, torch.device(device), input_args=inputs,
                                    output_args=outputs, group=group))
    loss_fn = next((part.stage_loss for part in model_parts if part.lm_head is not None), part0.stage_loss)
    loss = partial(_microbatch_loss, loss_fn, 1.0 / n_microbatches)
    return _CLASSES[schedule](stages[0] if schedule in _SINGLE_STAGE else stages, n_microbatches, loss_fn=loss,
                              scale_grads=False)


def pipeline_step(schedule, model_parts: list[Transformer], tokens: torch.Tensor | None,
                  labels: torch.Tensor | None, backward: bool = True) -> torch.Tensor | None:
    """One forward+backward over all microbatches (forward only with backward=False); passes tokens/labels
    only where this rank needs them. Returns the step loss (mean over microbatches, detached) on the rank
    holding the last stage, else None."""
    has_first = any(part.stage_index == 0 for part in model_parts)
    has_last = any(part.stage_index == part.n_stages - 1 for part in model_parts)
    args = (tokens,) if has_first else ()
    losses: list[torch.Tensor] = []
    kwargs = {"target": labels, "losses": losses} if has_last else {}
    if backward:
        schedule.step(*args, return_outputs=False, **kwargs)
    else:
        schedule.eval(*args, return_outputs=False, **kwargs)
    return torch.stack([loss.detach() for loss in losses]).mean() if has_last else None


def pipeline_eval(schedule, model_parts: list[Transformer], tokens: torch.Tensor | None,
                  labels: torch.Tensor | None) -> torch.Tensor | None:
    """Forward only (validation), microbatch after microbatch and stage after stage, with point-to-point
    sends between the ranks of consecutive stages. Not the schedule's own `eval`: torch 2.13's fails for
    the V schedules (ZBV, DualPipeV). Returns the mean loss on the rank holding the last stage, else None."""
    part0 = model_parts[0]
    batch = tokens if tokens is not None else labels  # None on ranks with neither end stage
    n = _broadcast_count(part0, 0 if batch is None else batch.shape[0] // part0.microbatch_size)
    losses = []
    for i in range(n):
        rows = slice(i * part0.microbatch_size, (i + 1) * part0.microbatch_size)
        loss = _eval_microbatch(model_parts, None if tokens is None else tokens[rows],
                                None if labels is None else labels[rows])
        if loss is not None:
            losses.append(loss)
    return torch.stack(losses).mean() if losses else None


def _device(part: Transformer) -> torch.device:
    return next(part.parameters()).device


def _broadcast_count(part: Transformer, n: int) -> int:
    """Microbatches in this evaluation batch, known on the first/last stage's ranks, sent to all."""
    t = torch.tensor([n], dtype=torch.int64, device=_device(part))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=part.pp_group)
    return int(t.item())


def _eval_microbatch(model_parts: list[Transformer], tokens, labels) -> torch.Tensor | None:
    part0 = model_parts[0]
    group, owners = part0.pp_group, part0.stage_owners
    owner = {stage: rank for rank, stages in enumerate(owners) for stage in stages}
    mine = {part.stage_index: part for part in model_parts}
    me = dist.get_rank(group)
    x, loss = tokens, None
    for stage in range(part0.n_stages):
        if owner[stage] != me:
            continue
        if stage > 0 and owner[stage - 1] != me:
            x = _recv(group, owner[stage - 1], part0.activation_dtype, _device(part0))
        x = mine[stage](x)
        if stage == part0.n_stages - 1:
            loss = mine[stage].stage_loss(x, labels).detach()
        elif owner[stage + 1] != me:
            _send(group, owner[stage + 1], x)
    return loss


def _send(group, dst: int, x: torch.Tensor) -> None:
    x = x.to_local() if hasattr(x, "to_local") else x
    dist.send(torch.tensor(x.shape, dtype=torch.int64, device=x.device), group=group, group_dst=dst)
    dist.send(x.contiguous(), group=group, group_dst=dst)


def _recv(group, src: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Hidden states from the previous stage's rank (shape sent first: it differs under tensor parallelism)."""
    shape = torch.empty(3, dtype=torch.int64, device=device)
    dist.recv(shape, group=group, group_src=src)
    out = torch.empty(*shape.tolist(), dtype=dtype, device=device)
    dist.recv(out, group=group, group_src=src)
    return out
