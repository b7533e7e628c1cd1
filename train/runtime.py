"""The runtime every tool builds: environment, mesh and process groups, model parts, loss, optimizers, data.

`build_runtime(cfg)` is the one place that turns a configuration into what a step runs on. `python -m train`
builds all of it; `train.evaluate` the model parts without optimizers or the run's data; `launch.memcheck`
all of it in a temporary output_dir; `launch.dryrun` the model parts on the meta device under a fake process
group of the full-size world (FP8, offload, recomputation and compile included), without initialising them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import Transformer
from model.analysis import param_counts
from model.config import TORCH_DTYPES
from parallel import ParallelDims, parallelize, tp_loss
from parallel.expert import ExpertDispatch, Lane
from parallel.deepspeed_ops import deepspeed_problem, fused_lm_loss
from parallel.fp8 import Fp8Recipe, check_fp8
from parallel.inventory import rank_parameters
from parallel.pipeline import Pipeline, build_pipeline, ends_share_rank, rank_stage_modules

from .config import (ConfigError, RunConfig, ep_overlap_on, fused_loss_on, pipeline_microbatches, pp_overlap_fb_on,
                     validate_layout)
from .env import Env, init_distributed
from .moe_stats import StatsGroups
from .schedule import BatchSchedule, RunPosition

log = logging.getLogger("train")
META_INIT_PARAMS = 2e9  # above this, build on the meta device and initialise shards in place


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


@dataclass
class Groups:
    """The ranks and process groups a step reduces over (None and 1 on one process)."""
    dp_rank: int = 0
    dp_world: int = 1
    token_group: object = None  # every rank with different tokens (data and context parallel)
    token_world: int = 1
    head_group: object = None  # the ranks that split attention heads (tensor or context parallel), if any
    cp_part: tuple[int, int] = (0, 1)  # (this rank's part of each sequence, parts)
    pp_group: object = None
    embed_group: object = None  # (first stage, last stage) pairs summing the tied MTP embedding's gradient
    stats: Optional[StatsGroups] = None

    @classmethod
    def of(cls, cfg: RunConfig, env: Env, dims: ParallelDims, mesh) -> "Groups":
        if mesh is None:
            return cls(stats=StatsGroups(env.device, None, None, 1))
        token_group, token_world = mesh["dp_cp"].get_group(), dims.dp * dims.cp
        pp_group = mesh["pp"].get_group() if dims.pp > 1 else None
        heads = "tp" if dims.tp > 1 else "cp" if dims.cp > 1 else None  # never both (ParallelDims)
        return cls(dp_rank=mesh["dp"].get_local_rank(), dp_world=dims.dp, token_group=token_group,
                   token_world=token_world, head_group=heads and mesh[heads].get_group(),
                   cp_part=(mesh["cp"].get_local_rank(), dims.cp), pp_group=pp_group,
                   embed_group=_embedding_group(cfg, env, dims, mesh),
                   stats=StatsGroups(env.device, pp_group, token_group, token_world))


def _embedding_group(cfg: RunConfig, env: Env, dims: ParallelDims, mesh):
    """Under pp with MTP, the embedding lives on the first and (a copy) on the last stage: the process group of
    each (first-stage rank, last-stage rank) pair that sums their gradients. None when both stages share a rank
    (V schedules) or there is nothing to tie."""
    if dims.pp == 1 or not cfg.model.num_nextn_predict_layers or ends_share_rank(cfg.parallel.pp_schedule):
        return None
    ranks = mesh.mesh.reshape(dims.pp, -1)
    mine = None
    for column in range(ranks.shape[1]):  # every rank creates every group, in the same order
        pair = [int(ranks[0, column]), int(ranks[-1, column])]
        group = dist.new_group(pair)
        if env.rank in pair:
            mine = group
    return mine


@dataclass
class Runtime:
    """What a step runs on. Built by `build_runtime`; the parts that a tool did not ask for stay empty."""
    cfg: RunConfig
    env: Env
    dims: ParallelDims
    mesh: object
    groups: Groups
    batches: BatchSchedule  # sequences per step (DeepSeek's ramp-up)
    position: RunPosition  # steps as fractions of the run's tokens
    fp8: Optional[Fp8Recipe]
    fused_loss: bool
    parts: list = field(default_factory=list)  # this rank's model parts (the model, or its pipeline stages)
    pipeline: Optional[Pipeline] = None
    loss_fn: Callable = lm_loss
    optimizers: object = None  # train.optim.PartOptimizers
    loader: object = None
    val_loader: object = None

    def moe_layers(self) -> dict:
        """This rank's MoE layers (over all its model parts) by global layer index."""
        return {i: m for part in self.parts for i, m in part.moe_layers().items()}


def check_runtime(cfg: RunConfig, device: Optional[torch.device]) -> tuple[Optional[Fp8Recipe], bool]:
    """The checks that need the device (None: not checked for FP8) and the installed libraries, before
    anything is built: (the FP8 recipe, whether the loss is fused)."""
    return _fp8_recipe(cfg, device), _check_fused_loss(cfg)


def _check_fused_loss(cfg: RunConfig) -> bool:
    """train.fused_loss (resolved), after checking DeepSpeed's fused loss imports."""
    if not fused_loss_on(cfg):
        return False
    problem = deepspeed_problem()
    if problem:
        raise ConfigError(f"train.fused_loss needs deepspeed (deepspeed.sequence.linear_cross_entropy), which "
                          f"does not import: {problem}; install it or set train.fused_loss=false")
    return True


def _fp8_recipe(cfg: RunConfig, device: Optional[torch.device]) -> Optional[Fp8Recipe]:
    precision = cfg.precision
    if precision.fp8_recipe is None:
        return None
    # without a device (the dry run) the layers are built as emulated: the same modules and parameters, no kernels
    recipe = Fp8Recipe(precision.fp8_recipe, emulate=precision.fp8_emulate or device is None,
                       block=precision.fp8_block, fsdp_all_gather=precision.fp8_fsdp_all_gather)
    try:
        if device is not None:
            check_fp8(recipe, device)
    except ValueError as e:
        raise ConfigError(f"precision={precision.name}: {e}") from None
    return recipe


def start_runtime(cfg: RunConfig, env: Optional[Env] = None, meta: bool = False) -> Runtime:
    """Environment (the process group: `env`, or torchrun's / SLURM's), mesh, groups and checks; nothing built.
    `meta` (the dry run, on a CPU for a GPU job): the batch split and the device's FP8 support go unchecked."""
    env = env or init_distributed(cfg.parallel.collective_timeout_s)
    dims = validate_layout(cfg, env.world, check_batch=not meta, ranks_per_host=env.ranks_per_host)
    mesh = dims.build_mesh(env.device.type) if env.world > 1 else None
    batches = BatchSchedule.of(cfg.train, cfg.data.seq_len)
    fp8, fused = check_runtime(cfg, None if meta else env.device)
    return Runtime(cfg=cfg, env=env, dims=dims, mesh=mesh, groups=Groups.of(cfg, env, dims, mesh), batches=batches,
                   position=RunPosition(batches, cfg.train.steps), fp8=fp8, fused_loss=fused,
                   loss_fn=tp_loss if dims.tp > 1 else lm_loss)


def build_runtime(cfg: RunConfig, env: Optional[Env] = None, *, data: bool = True, optimizers: bool = True,
                  meta: bool = False) -> Runtime:
    """The runtime of `cfg`: `start_runtime`, then `complete_runtime`."""
    return complete_runtime(start_runtime(cfg, env, meta), data=data, optimizers=optimizers, meta=meta)


def complete_runtime(rt: Runtime, *, data: bool = True, optimizers: bool = True, meta: bool = False) -> Runtime:
    """A started runtime's data (before the model: a data error costs no model build), model parts (seeded with
    train.seed) and their optimizers. `meta`: parts on the meta device, not initialised (the dry run)."""
    cfg = rt.cfg
    if data:
        rt.loader, rt.val_loader = build_data(cfg, rt)
    torch.manual_seed(cfg.train.seed)
    build_parts(rt, meta=meta)
    if optimizers:
        from .optim import PartOptimizers

        offloaded = cfg.parallel.cpu_offload and rt.mesh is not None  # FSDP2 keeps the shards in host memory
        rt.optimizers = PartOptimizers(rt.parts, cfg.optim, cfg.train.steps, cfg.precision.moment_dtype,
                                       rt.position, cpu_offload=offloaded)
    return rt


def build_data(cfg: RunConfig, rt: Runtime) -> tuple:
    """(train loader, validation loader) of this rank's share of the run's data."""
    from .data.builtin import builtin_dataset
    from .data.loader import TokenDataset, TokenLoader
    from .data.megatron import megatron_loaders

    g = rt.groups
    if cfg.data.format == "megatron":
        return megatron_loaders(cfg.data, cfg.model.vocab_size, cfg.train.seed, rt.batches, cfg.train.steps,
                                cfg.data.cache_dir or Path(cfg.output_dir) / "data_cache",
                                global_batch_size=cfg.train.global_batch_size,
                                micro_batch_size=cfg.train.micro_batch_size, dp_rank=g.dp_rank, dp_world=g.dp_world)
    # the built-in corpus, prepared (file-locked: one rank) for windows of this seq_len on first use
    path = Path(cfg.data.path) if cfg.data.path else builtin_dataset(seq_len=cfg.data.seq_len)
    train_set, val_set = TokenDataset(path, "train"), TokenDataset(path, "val")
    if train_set.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data at {path} has vocab_size={train_set.vocab_size} > model.vocab_size="
                          f"{cfg.model.vocab_size}")
    common = dict(seq_len=cfg.data.seq_len, global_batch_size=cfg.train.global_batch_size,
                  micro_batch_size=cfg.train.micro_batch_size, dp_rank=g.dp_rank, dp_world=g.dp_world,
                  seed=cfg.train.seed)
    # the ramp-up's size at every step
    return TokenLoader(train_set, **common, batches=rt.batches), TokenLoader(val_set, **common)


def loss_for(rt: Runtime, part: Transformer):
    """loss(output, labels) of a model part's output: the fused head's (it reads the part's head) or the logits'."""
    return fused_lm_loss(part) if rt.fused_loss and part.lm_head is not None else rt.loss_fn


def build_parts(rt: Runtime, meta: bool = False) -> None:
    """This rank's model parts, parallelised and initialised (the whole model, or its pipeline stages), and the
    loss that reads their output (the fused head's, or the logits')."""
    cfg, env = rt.cfg, rt.env
    big = meta or param_counts(cfg.model).total > META_INIT_PARAMS
    with torch.device("meta" if big else "cpu"):
        model = Transformer(cfg.model, return_head_input=rt.fused_loss)  # the fused loss applies the head
    if not big:  # identical weights whatever the layout: initialise whole, then split and shard
        model.init_weights(seed=cfg.train.seed)
        model.to(env.device)
    parts = [model]
    if rt.dims.pp > 1 and meta:  # the stages alone: a schedule needs real peers
        parts = rank_stage_modules(model, cfg.parallel.pp_schedule, rt.mesh["pp"].get_local_rank(), rt.dims.pp,
                                   cfg.parallel.pp_stages_per_rank)
    p, dispatch = cfg.parallel, expert_dispatch(rt)
    if rt.dims.pp > 1 and not meta:
        rt.pipeline = _build_pipeline(rt, model, dispatch.lane)
        parts = rt.pipeline.parts
    parts = [parallelize(part, rt.mesh, rt.dims, param_dtype=cfg.precision.param_dtype,
                         reduce_dtype=cfg.precision.reduce_dtype, cpu_offload=p.cpu_offload,
                         activation_checkpoint=p.activation_checkpoint, compile=p.compile, fp8=rt.fp8,
                         ep_dispatch=dispatch) for part in parts]
    if not meta:
        log.info("rank %d holds parameters %s", env.rank, json.dumps(rank_parameters(parts)))
    if big and not meta:
        for part in parts:
            part.to_empty(device=env.device)
            part.init_weights()
    rt.parts = [part.train() for part in parts]
    if rt.pipeline is None:
        rt.loss_fn = loss_for(rt, rt.parts[0])


def expert_dispatch(rt: Runtime) -> ExpertDispatch:
    """The expert dispatch of this job's layout, its host groups made once for all model parts."""
    p = rt.cfg.parallel
    lane = Lane() if rt.dims.pp > 1 and pp_overlap_fb_on(rt.cfg) else None
    how = ExpertDispatch(ep_overlap_on(rt.cfg), p.ep_chunks, p.ep_dispatch == "hierarchical", rt.env.ranks_per_host,
                         lane)
    return how.on(rt.mesh) if rt.mesh is not None and rt.dims.ep > 1 else how


def _build_pipeline(rt: Runtime, model: Transformer, lane: Lane | None) -> Pipeline:
    cfg = rt.cfg
    local_batch = rt.batches.size(0) // rt.groups.dp_world
    n_micro = pipeline_microbatches(cfg, local_batch)  # it divides local_batch (validate_layout)
    try:
        return build_pipeline(model, rt.mesh["pp"], cfg.parallel.pp_schedule, n_micro,
                              cfg.parallel.pp_stages_per_rank, rt.loss_fn, rt.env.device,
                              microbatch_size=local_batch // n_micro, seq_len=cfg.data.seq_len // rt.dims.cp,
                              activation_dtype=TORCH_DTYPES[cfg.precision.param_dtype],
                              loss_for=lambda part: loss_for(rt, part), lane=lane)
    except ValueError as e:
        raise ConfigError(f"pipeline: {e}") from None
