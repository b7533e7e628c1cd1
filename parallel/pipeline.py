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
counters. `build_pipeline` returns this rank's `Pipeline` (stage modules, placement, microbatch shape, loss,
schedule), which runs `step` and `evaluate`; build it before FSDP/EP wrap the stage modules (in place).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
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
from torch.distributed.pipelining.schedules import OVERLAP_F_B, _wait_batch_p2p
from torch.distributed.tensor import DTensor

from model.transformer import Transformer, lm_and_mtp_loss

__all__ = ["SCHEDULES", "Pipeline", "stage_ids", "split_layers", "build_stage_modules", "build_pipeline",
           "canonical_schedule", "ends_share_rank"]

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


# --------------------------------------------------------------------------------------------- paired actions
def _forward_beside_backward(lane, action, ctx) -> None:
    """DualPipeV's OVERLAP_F_B action: one microbatch's forward on one stage and another's backward on the other
    stage of this rank, at once. The forward runs on this thread (its autocast and grad mode are this thread's),
    the backward on a second thread under `lane`, whose expert exchanges go over twin process groups: while one
    waits for an all-to-all, the other computes. Each reads and writes only its own stage's modules."""
    schedule, (forward, backward) = ctx.schedule_ref, action.sub_actions
    stages = {stage.stage_index: stage for stage in schedule._stages}
    failed: list[BaseException] = []

    def run_backward():
        try:
            with lane.backward():
                _full_backward(schedule, stages, backward)
        except BaseException as e:  # raised again on the schedule's thread
            failed.append(e)

    thread = threading.Thread(target=run_backward, name="paired backward", daemon=True)
    thread.start()
    try:
        _forward(schedule, stages, forward, ctx.arg_mbs, ctx.kwarg_mbs, ctx.target_mbs)
    finally:
        thread.join()
    if failed:
        raise failed[0]


def _forward(schedule, stages: dict, action, arg_mbs, kwarg_mbs, target_mbs) -> None:
    """A FORWARD action as torch's runtime performs it (its inputs received; the loss on the last stage; the output
    handed to the next stage where that stage is this rank's), outputs not kept (`Pipeline.step`)."""
    i, mb = action.stage_index, action.microbatch_index
    stage = stages[i]
    schedule._assert_unsharded(stage)
    if not stage.is_first and i - 1 not in stages:
        _wait_batch_p2p(schedule.fwd_recv_ops.pop((i, mb)))
    output = stage.forward_one_chunk(mb, arg_mbs[mb], kwarg_mbs[mb], save_forward_output=False)
    schedule._maybe_compute_loss(stage, output, target_mbs, mb)
    if i + 1 in stages:
        stages[i + 1].set_local_fwd_input(output, mb)


def _full_backward(schedule, stages: dict, action) -> None:
    """A FULL_BACKWARD action as torch's runtime performs it (the output gradient received; the input gradient
    handed to the previous stage where that stage is this rank's)."""
    i, mb = action.stage_index, action.microbatch_index
    stage = stages[i]
    schedule._assert_unsharded(stage)
    if not stage.is_last and i + 1 not in stages:
        _wait_batch_p2p(schedule.bwd_recv_ops.pop((i, mb)))
    loss = schedule._maybe_get_loss(stage, mb)
    schedule.backward_counter[i] += 1
    stage.backward_one_chunk(mb, loss=loss, full_backward=True,
                             last_backward=schedule.backward_counter[i] == schedule._n_microbatches)
    if i - 1 in stages:
        stages[i - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)


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
    return model.stage_part(keep, first=stage == 0, last=stage == n_stages - 1)


def rank_stage_modules(model: Transformer, schedule: str, pp_rank: int, pp: int,
                       stages_per_rank: int) -> list[Transformer]:
    """The stage modules pipeline rank `pp_rank` holds under `schedule` (`build_stage_modules` of each)."""
    ids = stage_ids(canonical_schedule(schedule), pp_rank, pp, stages_per_rank)
    return [build_stage_modules(model, stage_id, pp * stages_per_rank) for stage_id in ids]


def ends_share_rank(schedule: str) -> bool:
    """Whether one rank holds both the first and the last stage (V placement)."""
    return canonical_schedule(schedule) in _V_STYLE


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


def _stage_io(part: Transformer, stage: int, microbatch_size: int, seq_len: int, dtype: torch.dtype):
    """Example (meta) input and output of stage `stage` (module `part`), for PipelineStage's static metadata."""
    cfg = part.cfg
    # requires_grad marks what carries a gradient back (torch derives the gradient metadata from it)
    hidden = torch.empty(microbatch_size, seq_len, cfg.hidden_size, dtype=dtype, device="meta", requires_grad=True)
    tokens = torch.empty(microbatch_size, seq_len, dtype=torch.long, device="meta")
    logits = torch.empty(microbatch_size, seq_len, cfg.vocab_size, dtype=dtype, device="meta", requires_grad=True)
    inputs = tokens if stage == 0 else hidden
    outputs = logits if part.lm_head is not None and not (part.output_hidden or part.return_head_input) else hidden
    return inputs, outputs


def _check_output(expected: torch.Tensor, module: nn.Module, args, output: torch.Tensor) -> None:
    """Forward hook: the stage's output must match its declared metadata (torch checks this only under
    TORCH_DISTRIBUTED_DEBUG=DETAIL; a mismatch would otherwise corrupt the next stage's receive)."""
    if output.shape != expected.shape or output.dtype != expected.dtype:
        raise ValueError(f"pipeline stage output {tuple(output.shape)} {output.dtype} differs from the declared "
                         f"{tuple(expected.shape)} {expected.dtype}: microbatch_size, seq_len and activation_dtype "
                         f"given to build_pipeline must match the data and the compute dtype")


@dataclass(eq=False)
class Pipeline:
    """This rank's side of a pipeline: its stage modules, where every stage lives, the shape of a microbatch,
    the last stage's loss and the torch schedule that runs them. `build_pipeline` makes one; the stage
    modules themselves carry no pipeline state.

    The last stage's loss reads `mtp_loss_weight` at every microbatch: set it before a step to change it
    (train.mtp_loss_weight_after). A step of another number of microbatches (a batch-size ramp-up) builds
    a schedule of its own: torch prepares a stage's buffers for one microbatch count."""

    parts: list[Transformer]  # this rank's stage modules, one per entry of `stages`
    stages: list[int]  # their global stage indices
    owners: list[list[int]]  # the stage indices of every pipeline rank
    schedule_name: str  # canonical (`canonical_schedule`)
    group: dist.ProcessGroup | None  # the pipeline ranks; None: the world
    microbatch_size: int
    seq_len: int
    activation_dtype: torch.dtype  # of the hidden states and logits a stage emits
    device: torch.device
    head_loss: Callable  # loss(logits or head input, labels) of one microbatch, the mean over its tokens
    mtp_loss_weight: float = 0.0
    n_microbatches: int = 0  # of `schedule`
    schedule: object = None  # the torch schedule, built by `use_microbatches`
    lane: object = None  # DualPipeV: a parallel/expert.py `Lane`, whose thread runs each paired backward

    @property
    def n_stages(self) -> int:
        return sum(len(stages) for stages in self.owners)

    @property
    def has_first(self) -> bool:
        return 0 in self.stages

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stages

    def tied_embedding_copies(self) -> list[nn.Parameter]:
        """The last stage's copy of the embedding (MTP), whose gradient the trainer adds to stage 0's."""
        return [part.embed_tokens.weight for stage, part in zip(self.stages, self.parts)
                if stage != 0 and part.embed_tokens is not None]

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one microbatch; with MTP its output is hidden states and the heads run here
        (depth k predicts labels[:, k:], weighted mtp_loss_weight / depth, as one process does)."""
        part = self.parts[self.stages.index(self.n_stages - 1)]
        if not part.output_hidden:
            return self.head_loss(output, labels)
        logits, mtp = part.heads_from_labels(output, labels)
        return lm_and_mtp_loss(self.head_loss, logits, mtp, labels, self.mtp_loss_weight, part.sequence_shard[1])

    def use_microbatches(self, n_microbatches: int) -> None:
        """A torch schedule running `n_microbatches` microbatches a step (kept while the count stays), fresh
        stages over the same modules; every MoE layer's balance-loss scale becomes 1/n_microbatches. Call it on
        every pipeline rank for the same step."""
        if n_microbatches == self.n_microbatches:
            return
        pp = dist.get_world_size(self.group)
        check_microbatches(self.schedule_name, n_microbatches, pp, self.n_stages)
        stages = []
        for stage, part in zip(self.stages, self.parts):
            part.set_aux_loss_scale(1.0 / n_microbatches)
            inputs, outputs = _stage_io(part, stage, self.microbatch_size, self.seq_len, self.activation_dtype)
            stages.append(PipelineStage(part, stage, self.n_stages, self.device, input_args=inputs,
                                        output_args=outputs, group=self.group))
        loss = partial(_microbatch_loss, self.loss, 1.0 / n_microbatches)
        runner = _CLASSES[self.schedule_name]
        self.schedule = runner(stages[0] if self.schedule_name in _SINGLE_STAGE else stages, n_microbatches,
                               loss_fn=loss, scale_grads=False)
        if self.lane is not None:
            self.schedule.register_custom_function(OVERLAP_F_B, partial(_forward_beside_backward, self.lane))
        self.n_microbatches = n_microbatches

    def step(self, tokens: torch.Tensor | None, labels: torch.Tensor | None,
             n_microbatches: int | None = None) -> torch.Tensor | None:
        """One forward+backward of the batch over its microbatches (n_microbatches: the current count when None);
        tokens and labels are read only where this rank needs them. Returns the step's loss (the mean over
        microbatches, detached) on the rank holding the last stage, else None."""
        self.use_microbatches(n_microbatches or self.n_microbatches)
        args = (tokens,) if self.has_first else ()
        losses: list[torch.Tensor] = []
        kwargs = {"target": labels, "losses": losses} if self.has_last else {}
        self.schedule.step(*args, return_outputs=False, **kwargs)
        return torch.stack([loss.detach() for loss in losses]).mean() if self.has_last else None

    def evaluate(self, tokens: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Forward only (validation), microbatch after microbatch and stage after stage, with point-to-point
        sends between the ranks of consecutive stages. Not the schedule's own `eval`: torch 2.13's fails for
        the V schedules (ZBV, DualPipeV). Returns the mean loss on the rank holding the last stage, else None."""
        batch = tokens if tokens is not None else labels  # None on ranks with neither end stage
        n = self._broadcast_count(0 if batch is None else batch.shape[0] // self.microbatch_size)
        losses = []
        for i in range(n):
            rows = slice(i * self.microbatch_size, (i + 1) * self.microbatch_size)
            loss = self._eval_microbatch(None if tokens is None else tokens[rows],
                                         None if labels is None else labels[rows])
            if loss is not None:
                losses.append(loss)
        return torch.stack(losses).mean() if losses else None

    def _broadcast_count(self, n: int) -> int:
        """Microbatches in this evaluation batch, known on the first/last stage's ranks, sent to all."""
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def _eval_microbatch(self, tokens, labels) -> torch.Tensor | None:
        owner = {stage: rank for rank, stages in enumerate(self.owners) for stage in stages}
        mine = dict(zip(self.stages, self.parts))
        me = dist.get_rank(self.group)
        x, loss = tokens, None
        for stage in range(self.n_stages):
            if owner[stage] != me:
                continue
            if stage > 0 and owner[stage - 1] != me:
                x = _recv(self.group, owner[stage - 1], self.activation_dtype, self.device)
            x = mine[stage](x)
            if stage == self.n_stages - 1:
                loss = self.loss(x, labels).detach()
            elif owner[stage + 1] != me:
                _send(self.group, owner[stage + 1], x)
        return loss


def build_pipeline(model: Transformer, pp_mesh_or_group, schedule: str, n_microbatches: int,
                   stages_per_rank: int, loss_fn: Callable, device, *, microbatch_size: int, seq_len: int,
                   activation_dtype: torch.dtype | None = None, loss_for: Callable | None = None,
                   lane=None) -> Pipeline:
    """This rank's `Pipeline`: its stage modules (`pipeline.parts`) and the torch schedule that runs them.

    model: the whole model (same weights on every pp rank), before FSDP/EP; it is not modified.
    pp_mesh_or_group: the 1-D "pp" DeviceMesh, a ProcessGroup, or None for the world group.
    loss_fn(logits, labels): per-microbatch mean loss. microbatch_size, seq_len: the shape of one
    microbatch of token ids (local batch = n_microbatches * microbatch_size). activation_dtype: dtype of
    the hidden states and logits a stage emits (default: the model's parameter dtype; bf16 under an FSDP
    param_dtype of bfloat16). loss_for(part) -> loss_fn: a loss of the last stage's module itself (a fused
    head's loss reads its weight), used instead of loss_fn where given. lane: DualPipeV only, a parallel/expert.py
    `Lane`: each overlapped action runs its forward and backward at once (`_forward_beside_backward`); the expert
    dispatch of the stage modules must use the same lane. The stage modules may be wrapped in place (FSDP, EP)
    before the first step.
    """
    schedule = canonical_schedule(schedule)
    group = _group_of(pp_mesh_or_group)
    pp, pp_rank = dist.get_world_size(group), dist.get_rank(group)
    check_microbatches(schedule, n_microbatches, pp, pp * stages_per_rank)
    dtype = activation_dtype or next(model.parameters()).dtype
    parts = rank_stage_modules(model, schedule, pp_rank, pp, stages_per_rank)
    stages = stage_ids(schedule, pp_rank, pp, stages_per_rank)
    for stage, part in zip(stages, parts):
        part.register_forward_hook(partial(_check_output, _stage_io(part, stage, microbatch_size, seq_len, dtype)[1]))
    last = next((part for part in parts if part.lm_head is not None), None)
    head_loss = loss_for(last) if loss_for is not None and last is not None else loss_fn
    pipeline = Pipeline(parts, stages, [stage_ids(schedule, r, pp, stages_per_rank) for r in range(pp)], schedule,
                        group, microbatch_size, seq_len, dtype, torch.device(device), head_loss,
                        mtp_loss_weight=model.cfg.mtp_loss_weight, lane=lane)
    pipeline.use_microbatches(n_microbatches)
    return pipeline


def _send(group, dst: int, x: torch.Tensor) -> None:
    x = x.to_local() if isinstance(x, DTensor) else x
    dist.send(torch.tensor(x.shape, dtype=torch.int64, device=x.device), group=group, group_dst=dst)
    dist.send(x.contiguous(), group=group, group_dst=dst)


def _recv(group, src: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Hidden states from the previous stage's rank (shape sent first: it differs under tensor parallelism)."""
    shape = torch.empty(3, dtype=torch.int64, device=device)
    dist.recv(shape, group=group, group_src=src)
    out = torch.empty(*shape.tolist(), dtype=dtype, device=device)
    dist.recv(out, group=group, group_src=src)
    return out
