"""Typed run configuration.

Hydra composes `conf/config.yaml` and its groups; `build_config` turns the resulting plain dict into these
dataclasses, rejecting unknown keys, wrong types and impossible values with one line naming the key.
Nothing past the entry point sees a DictConfig.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from model.config import TORCH_DTYPES, ModelConfig, config_from_dict, require
from parallel.dims import LayoutError, ParallelDims
from parallel.pipeline import SCHEDULE_NAMES
from parallel.recompute import MODES as RECOMPUTE_MODES

from .hardware import GPUS


class ConfigError(ValueError):
    """A user configuration mistake; the entry point prints it on one line and exits with code 2."""


# the choices of every field that takes one of a few names, each list once: `build_config` checks a value against
# its field's type
PRECISIONS = ("fp32", "bf16", "fp8_tensorwise", "fp8_rowwise", "fp8_blockwise")
LrSchedule = Literal["cosine", "deepseek_step", "deepseek_v3", "constant"]  # train/optim.py lr_factor
OptimName = Literal["adamw", "muon"]  # train/optim.py, train/muon.py
Precision = Literal[PRECISIONS]
Dtype = Literal[tuple(TORCH_DTYPES)]
MomentDtype = Literal["float32", "bfloat16"]
PipelineSchedule = Literal[SCHEDULE_NAMES]  # parallel/pipeline.py
Recompute = Literal[RECOMPUTE_MODES]
DataFormat = Literal["webdataset", "megatron"]
LaunchMode = Literal["local", "torchrun", "slurm"]
CheckpointOnError = Literal["stop", "continue"]  # train/checkpoint.py Checkpointer._failed
Gpu = Literal[tuple(GPUS)]  # train/hardware.py
EpDispatch = Literal["flat", "hierarchical"]  # parallel/expert.py
MuonNsDtype = Literal["auto", "bfloat16", "float32"]  # optim.muon_ns_dtype; auto: bfloat16 on GPU, float32 on CPU


@dataclass
class DataConfig:
    path: Optional[str] = None  # prepared shards (python -m train.data.prepare); None: the built-in dataset
    seq_len: int = 256
    val_batches: int = 4  # held-out batches per validation pass
    format: DataFormat = "webdataset"  # webdataset (path: prepared shards) | megatron (prefixes: .bin/.idx corpora)
    prefixes: tuple = ()  # megatron: each the path of a .bin/.idx pair without the extension
    weights: tuple = ()  # megatron: blend weight per prefix (normalised); empty: by corpus size in tokens
    split: str = "99,1,0"  # megatron: train, validation, test shares of every corpus
    cache_dir: Optional[str] = None  # megatron: megatron-core's index cache; None: <output_dir>/data_cache


@dataclass
class OptimConfig:
    lr: float = 3e-3
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms_and_embeddings: bool = False  # AdamW decays matrices only unless this is set
    grad_clip: float = 1.0  # 0: no clipping
    schedule: LrSchedule = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    # deepseek_step, deepseek_v3: the fractions of the run's tokens where lr is multiplied by step_decay_factor
    step_decay_at: tuple = (0.6, 0.9)
    step_decay_factor: float = 0.316
    cosine_span: tuple = (0.0, 1.0)  # deepseek_v3: the fractions of the run's tokens the cosine decay spans
    name: OptimName = "adamw"  # adamw | muon (train/muon.py: Muon for hidden matrices, AdamW for the rest)
    # Muon (defaults: Moonlight, arXiv 2502.16982, and its released examples/toy_train.py)
    muon_momentum: float = 0.95  # Nesterov-style SGD momentum before the orthogonalisation
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    muon_ns_coefficients: tuple = (3.4445, -4.7750, 2.0315)  # quintic X <- aX + (bA + cA^2)X, A = XX^T
    muon_ns_dtype: MuonNsDtype = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | bfloat16 | float32
    muon_update_scale: float = 0.2  # update x muon_update_scale * sqrt(max(m, n)): AdamW's update RMS
    muon_router: bool = True  # the 2-D router weights by Muon (Moonlight's code: every >=2-D weight but embedding/head)
    muon_split_gate_up: bool = True  # routed experts' fused gate|up stack as two matrices (as dense gate_proj, up_proj)
    qk_clip_tau: Optional[float] = None  # MuonClip (Kimi K2: 100): rescale q/k of heads whose max logit exceeds it


@dataclass
class PrecisionConfig:
    name: Precision = "fp32"
    param_dtype: Dtype = "float32"  # dtype of computation (autocast on one process, FSDP's policy when sharded)
    reduce_dtype: Dtype = "float32"  # gradient reduction dtype
    fp8_emulate: bool = False  # FP8 recipes: quantize -> dequantize around high-precision GEMMs (CPU, tests)
    bf16_gemm_emulate: bool = False  # bf16 GEMMs computed in fp32 on the bf16 operands (CPUs without bf16 units)
    fp8_block: int = 128  # fp8_blockwise: tile length of activations/gradients and weight block side
    fp8_fsdp_all_gather: bool = False  # fp8_tensorwise: FSDP2 all-gathers the dense weights in FP8 (torchao)
    moment_dtype: MomentDtype = "float32"  # AdamW moments; bfloat16 as DeepSeek-V3 (master weights stay fp32)

    @property
    def fp8_recipe(self) -> str | None:
        """tensorwise | rowwise | blockwise for an FP8 recipe, else None."""
        return self.name[4:] if self.name.startswith("fp8_") else None


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the other sizes leave of the world size
    tp: int = 1
    ep: int = 1
    pp: int = 1
    pp_schedule: PipelineSchedule = "1F1B"
    pp_microbatches: int = 0  # 0: one per micro-batch of the step
    pp_stages_per_rank: Optional[int] = None  # None: what the schedule needs (stages_per_rank_for)
    cp: int = 1  # context parallelism: each sequence split over cp ranks, Ulysses attention (parallel/context.py)
    cpu_offload: bool = False
    # seconds a collective may wait for its peers before the run stops with a report of the step, the operation
    # and the ranks that did not answer (train/watch.py); GPU jobs: long enough for the slowest checkpoint save
    collective_timeout_s: float = 600.0
    activation_checkpoint: Recompute = "none"  # full: whole blocks; selective: RMSNorms + MLA up-projections (V3)
    compile: bool = False  # torch.compile each block
    # expert parallelism's all-to-alls asynchronous, hidden under the shared experts and the expert GEMMs of the
    # layer's token chunks (parallel/expert.py); None: on when ep > 1
    ep_overlap: Optional[bool] = None
    ep_chunks: int = 2  # token chunks of a MoE layer under ep_overlap
    # flat: every (token, expert) row straight to the expert's rank; hierarchical: a token crosses to another host
    # once per host holding any of its experts and fans out there (parallel/expert.py HierarchicalDispatcher)
    ep_dispatch: EpDispatch = "flat"
    # DualPipeV's overlapped actions run one microbatch's forward and another's backward at once (the backward on a
    # second thread, its expert all-to-alls over twin process groups), so one's all-to-alls travel while the other
    # computes (parallel/pipeline.py); off by default: no faster on the CPU clusters measured, not run on a GPU
    pp_overlap_fb: bool = False
    # gradient accumulation without pipelining: keep weights gathered and gradients unsharded over a step's
    # micro-batches (one all-gather and one reduce-scatter per step, for the unsharded weights' and gradients'
    # memory); pipelining always does this
    accumulate_unsharded: bool = False


@dataclass
class SpikeConfig:
    """Loss spikes (train/spike.py): roll back to the newest checkpoint and skip data, or stop."""
    factor: float = 3.0  # a training loss above factor x its running mean is a spike; 0: only non-finite losses
    window: int = 20  # training losses in the running mean
    skip_batches: int = 1  # batches of data skipped after rolling back
    max_rollbacks: int = 0  # 0: no rollback; a non-finite loss ends the run with one line


@dataclass
class LoopConfig:
    steps: int = 300
    seed: int = 0
    global_batch_size: int = 16  # sequences per optimizer step, whatever the parallel layout
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    # DeepSeek's batch-size ramp-up (train/schedule.py): the first steps take rampup_batch_size sequences, the batch
    # grows by rampup_increment at a time and is global_batch_size once rampup_tokens tokens have been consumed
    rampup_batch_size: int = 0  # 0: no ramp-up
    rampup_increment: int = 0
    rampup_tokens: float = 0.0
    # [fraction, weight]: from that fraction of the run's tokens on, the MTP loss weight is `weight` instead of
    # model.mtp_loss_weight (DeepSeek-V3: 0.3, then 0.1 after 10T of 14.8T tokens); []: no switch
    mtp_loss_weight_after: tuple = ()
    bias_update_until: float = 1.0  # fraction of the run's tokens after which the expert bias stops moving (V3)
    val_every: int = 100  # 0: no validation
    peak_tflops: Optional[float] = None  # for MFU; None: a known GPU's BF16 peak, or measured GEMM peak on CPU
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    # the head and cross-entropy fused (DeepSpeed's vocab-parallel linear cross-entropy): no [tokens, vocab] logits;
    # None: on for vocabularies of FUSED_LOSS_MIN_VOCAB tokens or more (the DeepSeek presets), off below (tiny, small)
    fused_loss: Optional[bool] = None


@dataclass
class CheckpointConfig:
    every: int = 100  # 0: only at the end
    keep: int = 2
    async_save: bool = False
    load: bool = True  # resume from the newest complete checkpoint under output_dir
    # another run's output_dir (its newest checkpoint) or checkpoint directory: its model weights start this run when
    # output_dir has no checkpoint yet; optimizer, schedule, step and data start afresh (DeepSeek's long-context
    # extension continues the pretrained weights with YaRN and longer sequences)
    init_from: Optional[str] = None
    # fields (or sections, e.g. "precision") a resume may change from the checkpoint's config (train/resume.py)
    allow_changes: tuple = ()
    # a save that cannot be written (a full or read-only disk): stop the run (exit 1), or train on without it; either
    # way with one line, and the newest published checkpoint stays as it was
    on_error: CheckpointOnError = "stop"


@dataclass
class LogConfig:
    every: int = 10
    moe_every: int = 50  # histograms + heatmap cadence (in steps)
    # a rank whose own work (its step time outside waits for other ranks) stays above this factor x the median of
    # the other ranks' in each of the last straggler_window logged steps is named in one warning (train/straggler.py);
    # 0: no warning (the step_time/* metrics are logged anyway)
    straggler_factor: float = 1.5
    straggler_window: int = 3


@dataclass
class LaunchConfig:
    """How `python -m launch` starts the run (conf/launch/); the trainer itself ignores it."""
    mode: LaunchMode = "local"
    # N, or "MIN:MAX" (torchrun's elastic --nnodes): a job that loses hosts for good re-forms on the MIN or more that
    # remain (through launch.max_restarts) and resumes its newest checkpoint with fewer data-parallel ranks
    nodes: Any = 1
    procs_per_node: int = 1  # processes (GPUs) per node
    master_addr: str = "localhost"  # torchrun mode: rendezvous host (any node of the job)
    master_port: int = 29500
    job_name: str = "dsv2"
    partition: Optional[str] = None  # slurm
    account: Optional[str] = None  # slurm
    time: str = "24:00:00"  # slurm time limit
    signal_before_end_s: int = 300  # slurm: SIGUSR1 this long before the time limit -> checkpoint, requeue
    shutdown_timeout_s: int = 900  # how long torchrun lets workers checkpoint after a forwarded signal
    max_restarts: int = 0  # torchrun restarts every worker of the job when one fails, this many times (then resumes)
    sbatch_extra: tuple = ()  # more "#SBATCH" options, e.g. ["--exclusive", "--qos=high"]
    env: dict = field(default_factory=dict)  # exported before launching (NCCL / network knobs)
    dry_run: bool = False  # print the command (and the sbatch script) without launching
    # torchrun's --rdzv-conf for launch=torchrun/slurm, e.g. {last_call_timeout: 5, keep_alive_interval: 2}: how long
    # the rendezvous waits for more hosts, and how soon a silent host is dropped from it (5 s x 3 misses by default)
    rdzv_conf: dict = field(default_factory=dict)

    @property
    def node_range(self) -> tuple[int, int]:
        """(MIN, MAX) of `nodes`: (N, N) for a fixed count (ConfigError when it is neither)."""
        return node_range(self.nodes)

    @property
    def max_nodes(self) -> int:
        """The nodes the job starts with and sizes its layout for."""
        return self.node_range[1]


def node_range(nodes: Any) -> tuple[int, int]:
    """launch.nodes as (MIN, MAX): an int N or "N" -> (N, N); "MIN:MAX" -> (MIN, MAX)."""
    text = str(nodes).strip()
    parts = text.split(":")
    if isinstance(nodes, bool) or len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"launch.nodes must be a node count N or an elastic range MIN:MAX, got {nodes!r}")
    lo, hi = int(parts[0]), int(parts[-1])
    return lo, hi


@dataclass
class ClusterConfig:
    """The machines `python -m launch.plan` sizes a layout for (conf/cluster/); the trainer ignores it."""
    gpu: Gpu = "h800"  # the constants in train/hardware.py
    gpus: int = 0  # GPUs of the job; 0: launch.nodes (its MAX) x launch.procs_per_node
    gpus_per_node: int = 8  # GPUs that share NVLink; traffic between nodes goes over InfiniBand
    gemm_efficiency: float = 0.6  # achieved fraction of the GPU's peak FLOPS in the model's GEMMs and attention
    link_efficiency: float = 0.7  # achieved fraction of NVLink / InfiniBand bandwidth in collectives
    memory_reserve_gib: float = 4.0  # per GPU: CUDA context, NCCL buffers, allocator fragmentation


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


FUSED_LOSS_MIN_VOCAB = 32768


def ep_overlap_on(cfg: RunConfig) -> bool:
    """Whether expert parallelism overlaps its all-to-alls (parallel.ep_overlap, or its default: on when ep > 1)."""
    p = cfg.parallel
    return p.ep > 1 if p.ep_overlap is None else p.ep_overlap


def pp_overlap_fb_problem(cfg: RunConfig) -> str | None:
    """Why DualPipeV's forward and backward cannot run at once in this layout (parallel.pp_overlap_fb), or None."""
    p = cfg.parallel
    if p.pp == 1 or p.pp_schedule != "DualPipeV":
        return f"it runs DualPipeV's overlapped actions: needs parallel.pp > 1 and pp_schedule=DualPipeV, got " \
               f"pp={p.pp} and {p.pp_schedule}"
    if not ep_overlap_on(cfg):
        return "it pairs expert all-to-alls with the other microbatch's compute: needs parallel.ep > 1 and ep_overlap"
    if p.tp > 1 or p.cp > 1:
        return f"the two threads would issue tensor- or context-parallel collectives on one group in an order that " \
               f"differs between ranks: needs parallel.tp=1 and cp=1, got tp={p.tp} and cp={p.cp}"
    if p.compile:
        return "compiled blocks trace their all-to-alls on one process group: needs parallel.compile=false"
    if cfg.precision.bf16_gemm_emulate:
        return "the bf16 GEMM emulation is a mode of the forward's thread only: needs precision.bf16_gemm_emulate=false"
    return None


def pp_overlap_fb_on(cfg: RunConfig) -> bool:
    """Whether DualPipeV runs its paired forward and backward at once: parallel.pp_overlap_fb, where it applies (a
    planner's candidate layouts under a config that sets it: the DualPipeV ones)."""
    return cfg.parallel.pp_overlap_fb and pp_overlap_fb_problem(cfg) is None


def fused_loss_on(cfg: RunConfig) -> bool:
    """Whether the run computes its loss with the fused head (train.fused_loss, or its default by vocabulary)."""
    if cfg.train.fused_loss is not None:
        return cfg.train.fused_loss
    return cfg.model.vocab_size >= FUSED_LOSS_MIN_VOCAB


# --------------------------------------------------------------------------------------------- building
def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; known under "
                          f"'{prefix.rstrip('.') or '<root>'}': {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        if name == "model" and cls is RunConfig:
            try:
                kwargs[name] = config_from_dict(value)
            except (TypeError, ValueError) as e:
                raise ConfigError(str(e)) from None
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, key + ".")
        else:
            kwargs[name] = _check_type(value, hints[name], key)
    return cls(**kwargs)


def build_section(cls: type, data: dict, prefix: str) -> Any:
    """The dataclass `cls` from the plain dict `data`, each value type-checked as `python -m train` checks its
    config (unknown keys, wrong types: ConfigError naming `prefix` + the key); `cls.__post_init__` checks ranges."""
    return _build(cls, data, prefix)


def parse_override(arg: str) -> tuple[str, Any]:
    """One `key=value` argument -> (key, value), the value read by Hydra's override grammar, as `python -m train`
    reads its command line (numbers, true/false, null, [lists]; other text stays a string)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        (override,) = OverridesParser.create().parse_overrides([arg])
        if override.is_sweep_override():
            raise ValueError(f"{arg!r} is a sweep; give one value")
        return override.key_or_group, override.value()
    except Exception as e:  # noqa: BLE001 — Hydra's parser raises its own types; all are a bad argument here
        raise ConfigError(f"cannot read {arg!r}: {one_line(e)}") from None


def build_config(data: dict) -> RunConfig:
    """Plain dict (Hydra's composed config, resolved) -> validated RunConfig, its defaults filled in."""
    cfg = _build(RunConfig, data, "")
    if cfg.parallel.pp_stages_per_rank is None:
        cfg.parallel.pp_stages_per_rank = stages_per_rank_for(cfg.parallel.pp_schedule)
    validate(cfg)
    return cfg


def stages_per_rank_for(schedule: str) -> int:
    """Pipeline stages a rank holds when parallel.pp_stages_per_rank is unset: 2 for Interleaved1F1B and the V
    schedules (ZBVZeroBubble, DualPipeV, which need exactly 2), 1 for the others."""
    from parallel.pipeline import canonical_schedule
    try:
        name = canonical_schedule(schedule)
    except ValueError:
        return 1  # validate() names the unknown schedule
    return 2 if name in ("Interleaved1F1B", "ZBVZeroBubble", "DualPipeV") else 1


def _require(cond: bool, msg: str) -> None:
    require(cond, msg, ConfigError)


def validate(cfg: RunConfig) -> None:
    """Every section's checks; the first failure is one ConfigError line naming the key and the numbers."""
    _validate_train(cfg)
    _validate_data_shape(cfg)
    _validate_data(cfg.data)
    _validate_optim(cfg.optim)
    check_optimizer(cfg)
    _validate_precision(cfg)
    _validate_launch(cfg.launch, cfg.cluster)
    _validate_checkpoint_log(cfg)
    _validate_parallel(cfg)


def _validate_train(cfg: RunConfig) -> None:
    t = cfg.train
    _require(t.steps > 0, f"train.steps must be > 0, got {t.steps}")
    _require(t.global_batch_size > 0 and t.micro_batch_size > 0,
             f"train.global_batch_size={t.global_batch_size} and train.micro_batch_size={t.micro_batch_size} "
             f"must be > 0")
    _require(t.global_batch_size % t.micro_batch_size == 0,
             f"train.global_batch_size={t.global_batch_size} must be divisible by "
             f"train.micro_batch_size={t.micro_batch_size}")
    _validate_recipe_schedules(t)
    _validate_spike(cfg)


def _validate_data_shape(cfg: RunConfig) -> None:
    d = cfg.data
    _require(d.seq_len > 1, f"data.seq_len must be > 1, got {d.seq_len}")
    _require(d.seq_len <= cfg.model.max_position_embeddings,
             f"data.seq_len={d.seq_len} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}")


def _validate_optim(o: OptimConfig) -> None:
    _require(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _require(len(o.cosine_span) == 2 and 0 <= o.cosine_span[0] <= o.cosine_span[1] <= 1,
             f"optim.cosine_span must be two fractions 0 <= start <= end <= 1, got {list(o.cosine_span)}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _require(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must lie in [0, 1], got {o.min_lr_ratio}")


def check_optimizer(run: RunConfig) -> None:
    """One ConfigError line for a bad optimizer choice."""
    cfg = run.optim
    if cfg.muon_ns_steps < 1 or len(cfg.muon_ns_coefficients) != 3 or not 0 <= cfg.muon_momentum < 1:
        raise ConfigError(f"optim: muon_ns_steps={cfg.muon_ns_steps} must be >= 1, muon_ns_coefficients three "
                          f"numbers, muon_momentum={cfg.muon_momentum} in [0, 1)")
    if cfg.qk_clip_tau is not None and cfg.qk_clip_tau <= 0:
        raise ConfigError(f"optim.qk_clip_tau must be > 0 or null, got {cfg.qk_clip_tau}")


def _validate_precision(cfg: RunConfig) -> None:
    pr = cfg.precision
    _require(not pr.fp8_fsdp_all_gather or pr.name == "fp8_tensorwise",
             f"precision.fp8_fsdp_all_gather needs precision=fp8_tensorwise (one scale per weight), got {pr.name}")
    _require(pr.fp8_block >= 1, f"precision.fp8_block must be >= 1, got {pr.fp8_block}")
    _require(not pr.bf16_gemm_emulate or pr.param_dtype == "bfloat16",
             f"precision.bf16_gemm_emulate needs precision.param_dtype=bfloat16, got {pr.param_dtype}")
    _require(not (pr.bf16_gemm_emulate and cfg.parallel.compile),
             "precision.bf16_gemm_emulate runs eagerly (a dispatch mode); set parallel.compile=false")


def _validate_launch(la: LaunchConfig, c: ClusterConfig) -> None:
    lo, hi = la.node_range
    _require(1 <= lo <= hi and la.procs_per_node >= 1, f"launch.nodes={la.nodes} (1 <= MIN <= MAX) and "
             f"launch.procs_per_node={la.procs_per_node} must be >= 1")
    _require(la.mode != "local" or hi == 1, f"launch=local runs one node, got launch.nodes={la.nodes}; "
             f"use launch=torchrun (on every node) or launch=slurm")
    _require(lo == hi or la.max_restarts >= 1, f"launch.nodes={la.nodes}: a job re-forms on the hosts that remain "
             f"through torchrun's restarts; set launch.max_restarts >= 1")
    _require(la.signal_before_end_s > 0, f"launch.signal_before_end_s must be > 0, got {la.signal_before_end_s}")
    _require(la.max_restarts >= 0, f"launch.max_restarts must be >= 0, got {la.max_restarts}")
    _require(c.gpus >= 0 and c.gpus_per_node >= 1, f"cluster.gpus={c.gpus} must be >= 0 (0: launch.nodes x "
             f"launch.procs_per_node) and cluster.gpus_per_node={c.gpus_per_node} >= 1")
    _require(0 < c.gemm_efficiency <= 1 and 0 < c.link_efficiency <= 1,
             f"cluster.gemm_efficiency={c.gemm_efficiency} and cluster.link_efficiency={c.link_efficiency} "
             f"must lie in (0, 1]")


def _validate_checkpoint_log(cfg: RunConfig) -> None:
    _require(cfg.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
    _require(not (cfg.checkpoint.init_from or "").startswith("<"), f"checkpoint.init_from is a placeholder: "
             f"{cfg.checkpoint.init_from}")
    _require(cfg.checkpoint.every >= 0, f"checkpoint.every must be >= 0, got {cfg.checkpoint.every}")
    _require(cfg.log.every >= 1 and cfg.log.moe_every >= 1,
             f"log.every={cfg.log.every} and log.moe_every={cfg.log.moe_every} must be >= 1")
    _require((cfg.log.straggler_factor == 0 or cfg.log.straggler_factor > 1) and cfg.log.straggler_window >= 1,
             f"log.straggler_factor={cfg.log.straggler_factor} must be 0 (off) or > 1 and log.straggler_window="
             f"{cfg.log.straggler_window} >= 1")


def _validate_parallel(cfg: RunConfig) -> None:
    p = cfg.parallel
    for key in ("dp_replicate", "tp", "ep", "pp", "pp_stages_per_rank", "cp"):
        _require(getattr(p, key) >= 1, f"parallel.{key} must be >= 1, got {getattr(p, key)}")
    _require(p.dp_shard == -1 or p.dp_shard >= 1, f"parallel.dp_shard must be >= 1 or -1 (auto), got {p.dp_shard}")
    _require(p.collective_timeout_s > 0, f"parallel.collective_timeout_s must be > 0, got {p.collective_timeout_s}")
    _require(cfg.data.seq_len % p.cp == 0, f"context parallelism splits data.seq_len={cfg.data.seq_len} over "
                                           f"parallel.cp={p.cp}: it must divide")
    _require(p.cp == 1 or cfg.data.seq_len // p.cp > cfg.model.num_nextn_predict_layers,
             f"context parallelism gives each rank {cfg.data.seq_len // p.cp} positions of a sequence "
             f"(data.seq_len / parallel.cp), fewer than model.num_nextn_predict_layers="
             f"{cfg.model.num_nextn_predict_layers} + 1 (MTP reads that many positions into the next part)")
    _require(p.ep_chunks >= 1, f"parallel.ep_chunks must be >= 1, got {p.ep_chunks}")
    _require(not (p.ep_overlap and p.ep == 1), "parallel.ep_overlap=true overlaps expert parallelism's "
             "all-to-alls, but parallel.ep=1 has none: set parallel.ep > 1 or leave ep_overlap unset")
    problem = pp_overlap_fb_problem(cfg) if p.pp_overlap_fb else None
    _require(problem is None, f"parallel.pp_overlap_fb=true: {problem}")
    _require(p.pp_microbatches >= 0, f"parallel.pp_microbatches must be >= 0 (0: one per micro-batch), got "
                                     f"{p.pp_microbatches}")
    _require(not (cfg.train.rampup_batch_size and p.pp > 1 and p.pp_microbatches),
             f"a batch-size ramp-up changes the per-rank batch, so under pipelining its microbatches are "
             f"train.micro_batch_size each: set parallel.pp_microbatches=0, got {p.pp_microbatches}")


def _validate_spike(cfg: RunConfig) -> None:
    sp = cfg.train.spike
    _require(sp.factor == 0 or sp.factor > 1, f"train.spike.factor must be 0 (off) or > 1, got {sp.factor}")
    _require(sp.window >= 1 and sp.skip_batches >= 0 and sp.max_rollbacks >= 0,
             f"train.spike needs window >= 1, skip_batches >= 0 and max_rollbacks >= 0, got {sp.window}, "
             f"{sp.skip_batches}, {sp.max_rollbacks}")
    _require(sp.max_rollbacks == 0 or cfg.checkpoint.every > 0,
             f"train.spike.max_rollbacks={sp.max_rollbacks} rolls back to checkpoints: set checkpoint.every > 0")


def _validate_data(d: DataConfig) -> None:
    """data.format and, for megatron corpora, prefixes, weights and split."""
    if d.format != "megatron":
        return
    _require(len(d.prefixes) > 0 and all(isinstance(p, str) and p for p in d.prefixes),
             f"data=megatron needs data.prefixes=[<prefix>, ...] (paths of .bin/.idx pairs without the extension), "
             f"got {list(d.prefixes)}")
    _require(not d.weights or len(d.weights) == len(d.prefixes), f"data.weights has {len(d.weights)} entries for "
             f"{len(d.prefixes)} data.prefixes: give one weight per prefix (or none: by size)")
    _require(all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in d.weights),
             f"data.weights must be numbers >= 0, got {list(d.weights)}")
    _require(not d.weights or sum(d.weights) > 0, f"data.weights are all zero: {list(d.weights)}")
    shares = d.split.replace("/", ",").split(",")
    try:
        values = [float(x) for x in shares]
    except ValueError:
        values = []
    _require(0 < len(values) <= 3 and all(v >= 0 for v in values) and values[0] > 0,
             f"data.split must be up to three shares >= 0 (train, validation, test), the train share > 0, e.g. "
             f"'99,1,0'; got {d.split!r}")


def _validate_recipe_schedules(t: LoopConfig) -> None:
    """train.rampup_*, train.mtp_loss_weight_after, train.bias_update_until."""
    after = t.mtp_loss_weight_after
    _require(not after or (len(after) == 2 and 0 <= after[0] <= 1 and after[1] >= 0),
             f"train.mtp_loss_weight_after must be [] or [fraction in 0..1, weight >= 0], got {list(after)}")
    _require(0 <= t.bias_update_until <= 1, f"train.bias_update_until must lie in [0, 1], got {t.bias_update_until}")
    if t.rampup_batch_size == 0:
        return
    g, s, inc = t.global_batch_size, t.rampup_batch_size, t.rampup_increment
    _require(0 < s < g, f"train.rampup_batch_size={s} must lie in (0, train.global_batch_size={g}) (0: no ramp-up)")
    _require(inc > 0 and (g - s) % inc == 0, f"train.rampup_increment={inc} must be > 0 and divide "
             f"global_batch_size - rampup_batch_size = {g} - {s} = {g - s}")
    _require(t.rampup_tokens > 0, f"train.rampup_tokens must be > 0 with a ramp-up, got {t.rampup_tokens}")
    _require(s % t.micro_batch_size == 0 and inc % t.micro_batch_size == 0,
             f"train.rampup_batch_size={s} and train.rampup_increment={inc} must be multiples of "
             f"train.micro_batch_size={t.micro_batch_size}: every batch of the ramp-up splits into micro-batches")


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------- composing
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def one_line(e: BaseException) -> str:
    text = str(e).split("Config search path")[0]  # Hydra appends its search path to missing-group errors
    return re.sub(r"\s+", " ", text).strip() or type(e).__name__


def register_model_schema() -> None:
    """`model/base`: every ModelConfig field with its default, so presets may list only what they set and
    `model.<any field>=...` overrides work on every preset."""
    import dataclasses

    from hydra.core.config_store import ConfigStore

    from model.config import ModelConfig

    ConfigStore.instance().store(group="model", name="base", node=dataclasses.asdict(ModelConfig()))


def compose_config(overrides: list[str]):
    """Hydra composition + typed validation -> RunConfig (raises ConfigError with a one-line message)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_model_schema()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            composed = compose(config_name="config", overrides=overrides)
        data = OmegaConf.to_container(composed, resolve=True)
    except Exception as e:  # noqa: BLE001 — Hydra/OmegaConf raise many types; all are config errors here
        raise ConfigError(one_line(e)) from None
    return build_config(data)


def parallel_dims(cfg: RunConfig, world: int) -> ParallelDims:
    """The parallel sizes of `cfg` on `world` ranks, checked against the model (LayoutError)."""
    p = cfg.parallel
    dims = ParallelDims.resolve(world, p.dp_replicate, p.dp_shard, p.tp, p.ep, p.pp, p.pp_stages_per_rank, p.cp)
    dims.validate_model(cfg.model)
    return dims


def validate_layout(cfg: RunConfig, world: int, check_batch: bool = True,
                    ranks_per_host: int | None = None) -> ParallelDims:
    """The second phase of validation (the first is `validate`, which needs no world size): `cfg` on `world`
    ranks, as the runtime, `python -m train` and `python -m launch` before any process starts, the planner and
    the dry run check it. LayoutError naming the numbers. `check_batch=False`: parameter counts only (the batch
    need not split over this many ranks); `ranks_per_host`: the ranks on each host (None: all on one)."""
    from parallel.pipeline import canonical_schedule, check_microbatches

    from .schedule import check_batch_split

    dims = parallel_dims(cfg, world)
    t = cfg.train
    if cfg.data.seq_len % dims.tp:
        raise LayoutError(f"sequence parallelism splits data.seq_len={cfg.data.seq_len} over tp={dims.tp}: "
                          f"it must divide")
    _check_hosts(cfg, dims, ranks_per_host or world)
    if not check_batch:
        return dims
    try:
        check_batch_split(t, dims.dp)
    except ConfigError as e:
        raise LayoutError(str(e)) from None
    local = t.global_batch_size // dims.dp
    n_micro = pipeline_microbatches(cfg, local) if dims.pp > 1 else local // t.micro_batch_size
    if n_micro < 1 or local % n_micro:
        raise LayoutError(f"{n_micro} micro-batches do not divide the per-rank batch global_batch_size/dp = {local} "
                          f"(train.micro_batch_size={t.micro_batch_size}, parallel.pp_microbatches="
                          f"{cfg.parallel.pp_microbatches})")
    if t.rampup_batch_size and dims.pp > 1:  # the first, smallest batch has the microbatches the schedule needs
        try:
            check_microbatches(canonical_schedule(cfg.parallel.pp_schedule),
                               t.rampup_batch_size // dims.dp // t.micro_batch_size, dims.pp,
                               dims.pp * cfg.parallel.pp_stages_per_rank)
        except ValueError as e:
            raise LayoutError(f"the ramp-up's first batch (train.rampup_batch_size={t.rampup_batch_size}): {e}") \
                from None
    return dims


def _check_hosts(cfg: RunConfig, dims: ParallelDims, ranks_per_host: int) -> None:
    """Hierarchical expert dispatch against the hosts: LayoutError saying why it cannot apply."""
    from parallel.expert import host_problem

    m = cfg.model
    if cfg.parallel.ep_dispatch == "hierarchical":
        limited = m.topk_method != "greedy" and m.n_group > 1
        problem = host_problem(dims.ep, dims.tp, ranks_per_host, m.n_group if limited else None)
        if problem:
            raise LayoutError(problem)


def pipeline_microbatches(cfg: RunConfig, local_batch: int) -> int:
    """Micro-batches a pipeline step splits a rank's `local_batch` sequences into: parallel.pp_microbatches,
    or 0 there: one per train.micro_batch_size (the trainer's, and the planner's)."""
    return cfg.parallel.pp_microbatches or local_batch // cfg.train.micro_batch_size
