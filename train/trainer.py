"""The training run: set-up, the step, logging, validation, checkpoints, preemption.

One `Trainer` per process. Single process on CPU or one GPU; under torchrun, gloo (CPU) or NCCL (GPU) with
the layout of `parallel.*`. Exact resume: model, optimizer, scheduler, data position and RNG come back from
the newest complete checkpoint, so a killed-and-resumed run continues the uninterrupted loss curve.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import Transformer
from model.config import TORCH_DTYPES
from model.transformer import lm_and_mtp_loss
from model.analysis import param_counts, training_flops_per_token
from parallel import LayoutError, clip_grad_norm_, end_of_step, micro_batch_sync, parallelize, tp_loss
from parallel.deepspeed_ops import deepspeed_problem, fused_lm_loss
from parallel.inventory import rank_parameters
from parallel.fp8 import Fp8Recipe, after_optimizer_step, check_fp8
from parallel.pipeline import Pipeline, build_pipeline, ends_share_rank

from .checkpoint import Checkpointer, load_model_weights
from .config import ConfigError, RunConfig, fused_loss_on, parallel_dims, pipeline_microbatches, to_dict
from .env import init_distributed
from .hardware import device_bf16_tflops
from .data.builtin import builtin_dataset
from .hf_load import check_hf_dir, is_hf_dir, load_hf_weights
from .data.loader import TokenDataset, TokenLoader
from .data.megatron import megatron_loaders
from .metrics import MetricsWriter, format_progress
from .moe_stats import MoEStats, StatsGroups, gathered_expert_bias
from .optim import PartOptimizers
from .precision import Bf16GemmEmulation
from .resume import check_resume, record_config
from .schedule import BatchSchedule, RunPosition, check_batch_split
from .spike import SpikeGuard, TrainingError
from .watch import Watch, is_collective_failure

log = logging.getLogger("train")
META_INIT_PARAMS = 2e9  # above this, build on the meta device and initialise shards in place


def measured_cpu_peak_tflops() -> float:
    """Achieved fp32 GEMM throughput of this CPU (the MFU denominator when no hardware peak is known). Its operands
    come from a generator of its own: the global RNG, restored on resume, drives the training (token dropping)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 1024, generator=gen), torch.randn(1024, 1024, generator=gen)
    a @ b
    t = time.perf_counter()
    for _ in range(8):
        a @ b
    return 8 * 2 * 1024 ** 3 / (time.perf_counter() - t) / 1e12


def peak_tflops(cfg: RunConfig, device: torch.device) -> float:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops
    if device.type != "cuda":
        return measured_cpu_peak_tflops()
    name = torch.cuda.get_device_name(device)
    known = device_bf16_tflops(name)
    if known is None:  # MFU is then reported as nan rather than against a guessed peak
        log.warning("no BF16 peak is known for GPU %r: MFU is nan; set train.peak_tflops=<its dense BF16 TFLOP/s>",
                    name)
        return float("nan")
    return known


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def max_over_ranks(value: float, device: torch.device, world: int) -> float:
    """The largest of every rank's `value` (the fullest rank's peak memory: pipeline stages differ)."""
    x = torch.tensor([value], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x)


def all_mean(x: torch.Tensor, world: int, group=None) -> torch.Tensor:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x, group=group)
        x /= world
    return x


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


# --------------------------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.env = init_distributed(cfg.parallel.collective_timeout_s)
        # a failed collective's report (train/watch.py): the loop's phase names the operation the stack does not
        self.watch = Watch.of_job(self.env.rank, self.env.world, cfg.parallel.collective_timeout_s)
        self.phase = "set-up"
        self.collective_failed = False
        self.dims = parallel_dims(cfg, self.env.world)
        self.mesh = self.dims.build_mesh(self.env.device.type) if self.env.world > 1 else None
        self.dp_rank = self.mesh["dp"].get_local_rank() if self.mesh is not None else 0
        self.dp_world = self.dims.dp
        # every rank with different tokens (data- and context-parallel): the loss and expert loads are over these
        self.token_group = self.mesh["dp_cp"].get_group() if self.mesh is not None else None
        self.token_world = self.dims.dp * self.dims.cp
        self.cp_part = (self.mesh["cp"].get_local_rank(), self.dims.cp) if self.mesh is not None else (0, 1)
        self.pp_group = self.mesh["pp"].get_group() if self.mesh is not None and self.dims.pp > 1 else None
        self.stats_groups = StatsGroups(self.env.device, self.pp_group, self.token_group, self.token_world)
        self.moe_stats: MoEStats | None = None  # the last step's routing statistics
        self.pipeline: Pipeline | None = None  # this rank's pipeline stages when pp > 1
        self.batches = BatchSchedule.of(cfg.train, cfg.data.seq_len)  # sequences per step (DeepSeek's ramp-up)
        self.position = RunPosition(self.batches, cfg.train.steps)  # steps as fractions of the run's tokens
        check_batch_split(cfg.train, self.dp_world)
        self.embed_group = self._embedding_group()
        self.loss_fn = tp_loss if self.dims.tp > 1 else lm_loss  # vocab-parallel logits under tp
        self.fused_loss = self._check_fused_loss()
        if cfg.data.seq_len % self.dims.tp:
            raise LayoutError(f"sequence parallelism splits data.seq_len={cfg.data.seq_len} over tp={self.dims.tp}: "
                              f"it must divide")
        self.fp8 = self._fp8_recipe()  # checked before set-up writes anything to output_dir
        if cfg.checkpoint.init_from and not Path(cfg.checkpoint.init_from).exists():
            raise ConfigError(f"checkpoint.init_from={cfg.checkpoint.init_from} does not exist (expected a run's "
                              f"output_dir, one of its checkpoints/step_N or a Hugging Face model directory)")
        self.hf_init = None  # a Hugging Face directory to start from: checked before anything is written
        if cfg.checkpoint.init_from and is_hf_dir(Path(cfg.checkpoint.init_from)):
            self.hf_init = check_hf_dir(Path(cfg.checkpoint.init_from), cfg.model)
        self.step = 0
        sp = cfg.train.spike
        self.spike = SpikeGuard(sp.factor, sp.window, sp.max_rollbacks)
        self._stop_signal: int | None = None
        self._kill_at = int(os.environ.get("DSV2_TEST_KILL_AT_STEP", "-1"))

    def _check_fused_loss(self) -> bool:
        """train.fused_loss (resolved), after checking DeepSpeed's fused loss imports."""
        if not fused_loss_on(self.cfg):
            return False
        problem = deepspeed_problem()
        if problem:
            raise ConfigError(f"train.fused_loss needs deepspeed (deepspeed.sequence.linear_cross_entropy), which "
                              f"does not import: {problem}; install it or set train.fused_loss=false")
        return True

    def _loss_for(self, part: Transformer):
        """loss(output, labels) of a model part's output: the fused head's (it reads the part's head) or the logits'."""
        return fused_lm_loss(part) if self.fused_loss and part.lm_head is not None else self.loss_fn

    def build_parts(self) -> None:
        """This rank's model parts, and the loss that reads their output (the fused head's, or the logits')."""
        self.parts = self._build_model()
        if self.pipeline is None:
            self.loss_fn = self._loss_for(self.parts[0])

    # ------------------------------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg = self.cfg
        if self.env.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self._build_data()  # before the model: a data error costs no model build
        torch.manual_seed(cfg.train.seed)
        self.build_parts()
        offloaded = cfg.parallel.cpu_offload and self.mesh is not None  # FSDP2 keeps the shards in host memory
        self.optimizers = PartOptimizers(self.parts, cfg.optim, cfg.train.steps, cfg.precision.moment_dtype,
                                         self.position, cpu_offload=offloaded)
        self.checkpointer = Checkpointer(self.out / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save)
        resumed = self._resume() if cfg.checkpoint.load else None
        if resumed is None and self.hf_init is not None:  # a new run from Hugging Face weights
            load_hf_weights(Path(cfg.checkpoint.init_from), self.parts, cfg.model, self.hf_init)
            log.info("model weights from %s (Hugging Face)", cfg.checkpoint.init_from)
        elif resumed is None and cfg.checkpoint.init_from:  # a new run from another run's weights
            path = load_model_weights(Path(cfg.checkpoint.init_from), self.parts)
            log.info("model weights from %s; optimizer, schedule and data start afresh", path)
        if self.env.rank == 0:
            record_config(self.out, to_dict(cfg), resumed)
        self.metrics = MetricsWriter(self.out, enabled=self.env.rank == 0, resume_step=resumed)
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = peak_tflops(cfg, self.env.device) * 1e12
        self._install_signal_handlers()

    def _build_model(self) -> list[Transformer]:
        """This rank's model parts: the whole model, or its pipeline stages; parallelised and initialised."""
        cfg, env = self.cfg, self.env
        big = param_counts(cfg.model).total > META_INIT_PARAMS
        with torch.device("meta" if big else "cpu"):
            model = Transformer(cfg.model)
        model.return_head_input = self.fused_loss  # the loss applies the head
        if not big:  # identical weights whatever the layout: initialise whole, then split and shard
            model.init_weights(seed=cfg.train.seed)
            model.to(env.device)
        parts = [model]
        if self.dims.pp > 1:
            self.pipeline = self._build_pipeline(model)
            parts = self.pipeline.parts
        parts = [parallelize(part, self.mesh, self.dims, cfg.precision.param_dtype, cfg.precision.reduce_dtype,
                             cfg.parallel.cpu_offload, cfg.parallel.activation_checkpoint,
                             cfg.parallel.compile, self.fp8) for part in parts]
        log.info("rank %d holds parameters %s", env.rank, json.dumps(rank_parameters(parts)))
        if big:
            for part in parts:
                part.to_empty(device=env.device)
                part.init_weights()
        return [part.train() for part in parts]

    def _fp8_recipe(self) -> Fp8Recipe | None:
        precision = self.cfg.precision
        if precision.fp8_recipe is None:
            return None
        recipe = Fp8Recipe(precision.fp8_recipe, emulate=precision.fp8_emulate, block=precision.fp8_block,
                           fsdp_all_gather=precision.fp8_fsdp_all_gather)
        try:
            check_fp8(recipe, self.env.device)
        except ValueError as e:
            raise ConfigError(f"precision={precision.name}: {e}") from None
        return recipe

    def _build_pipeline(self, model: Transformer) -> Pipeline:
        cfg = self.cfg
        local_batch = self.batches.size(0) // self.dp_world
        n_micro = pipeline_microbatches(cfg, local_batch)
        if local_batch % n_micro:
            raise ConfigError(f"parallel.pp_microbatches={n_micro} must divide the per-rank batch "
                              f"global_batch_size/dp = {cfg.train.global_batch_size}/{self.dp_world} = {local_batch}")
        try:
            return build_pipeline(model, self.mesh["pp"], cfg.parallel.pp_schedule, n_micro,
                                  cfg.parallel.pp_stages_per_rank, self.loss_fn, self.env.device,
                                  microbatch_size=local_batch // n_micro, seq_len=cfg.data.seq_len // self.dims.cp,
                                  activation_dtype=TORCH_DTYPES[cfg.precision.param_dtype],
                                  loss_for=self._loss_for)
        except ValueError as e:
            raise ConfigError(f"pipeline: {e}") from None

    def _embedding_group(self):
        """Under pp with MTP, the embedding lives on the first and (a copy) on the last stage: the process
        group of each (first-stage rank, last-stage rank) pair that sums their gradients. None when both
        stages share a rank (V schedules) or there is nothing to tie."""
        cfg = self.cfg
        if self.dims.pp == 1 or not cfg.model.num_nextn_predict_layers or ends_share_rank(cfg.parallel.pp_schedule):
            return None
        ranks = self.mesh.mesh.reshape(self.dims.pp, -1)
        mine = None
        for column in range(ranks.shape[1]):  # every rank creates every group, in the same order
            pair = [int(ranks[0, column]), int(ranks[-1, column])]
            group = dist.new_group(pair)
            if self.env.rank in pair:
                mine = group
        return mine

    def _sync_tied_embedding(self) -> None:
        """Sum the gradients of stage 0's embedding and the last stage's MTP copy, so both stay equal."""
        if self.pipeline is None or not self.cfg.model.num_nextn_predict_layers:
            return
        grads = [part.embed_tokens.weight.grad for part in self.parts if part.embed_tokens is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        if not local:  # a middle stage
            return
        total = torch.stack(local).sum(0)
        if self.embed_group is not None:
            dist.all_reduce(total, group=self.embed_group)
        for g in local:
            g.copy_(total)

    def moe_layers(self) -> dict:
        """This rank's MoE layers (over all its model parts) by global layer index."""
        return {i: m for part in self.parts for i, m in part.moe_layers().items()}

    def _build_data(self) -> None:
        cfg = self.cfg
        if cfg.data.format == "megatron":
            self.loader, self.val_loader = megatron_loaders(
                cfg.data, cfg.model.vocab_size, cfg.train.seed, self.batches, cfg.train.steps,
                cfg.data.cache_dir or self.out / "data_cache", global_batch_size=cfg.train.global_batch_size,
                micro_batch_size=cfg.train.micro_batch_size, dp_rank=self.dp_rank, dp_world=self.dp_world)
            return
        # the built-in corpus, prepared (file-locked: one rank) for windows of this seq_len on first use
        path = Path(cfg.data.path) if cfg.data.path else builtin_dataset(seq_len=cfg.data.seq_len)
        train_set, val_set = TokenDataset(path, "train"), TokenDataset(path, "val")
        common = dict(seq_len=cfg.data.seq_len, global_batch_size=cfg.train.global_batch_size,
                      micro_batch_size=cfg.train.micro_batch_size, dp_rank=self.dp_rank, dp_world=self.dp_world,
                      seed=cfg.train.seed)
        self.loader = TokenLoader(train_set, **common, batches=self.batches)  # the ramp-up's size at every step
        self.val_loader = TokenLoader(val_set, **common)
        if train_set.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"data at {path} has vocab_size={train_set.vocab_size} > model.vocab_size="
                              f"{cfg.model.vocab_size}")

    def _resume(self) -> int | None:
        forced = self._check_resumable()  # before loading: a different model would otherwise look like corruption
        state = self.checkpointer.load_latest(self.parts, self.optimizers.optimizers)
        if state is None:
            return None
        self._restore(state)
        for key, before, after in forced:
            log.warning("resumed with %s = %r (the checkpoint's run had %r), from step %d on", key, after, before,
                        self.step)
        log.info("resuming at step %d", self.step)
        return self.step

    def _restore(self, state: dict) -> None:
        """The loaded checkpoint's step, lr schedule, spike guard and data position; optimizer settings are what
        the config says, not what the checkpoint held."""
        self.step = state["step"]
        self.optimizers.load_scheduler_state(state["scheduler"])
        self.optimizers.apply_config(self.cfg.optim)
        self.spike.load_state_dict(state.get("spike"))
        self.loader.load_state_dict(state["loader"])

    def _check_resumable(self) -> list:
        """Against the newest checkpoint's config: the same model (else a config error), and the changes of
        guarded fields that checkpoint.allow_changes forces (train/resume.py)."""
        saved = self.checkpointer.newest_train_state()
        if saved is None:
            return []
        now = to_dict(self.cfg)
        diff = sorted(k for k in now["model"] if saved["config"]["model"].get(k) != now["model"][k])
        if diff:
            raise ConfigError(f"checkpoints in {self.out / 'checkpoints'} are for a different model (keys {diff}); "
                              f"use another output_dir")
        return check_resume(saved["config"], now, self.cfg.checkpoint.allow_changes, str(self.out), saved["step"])

    def _install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self._stop_signal = signum
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    # ------------------------------------------------------------------------------------------ the step
    def autocast(self):
        dtype = self.cfg.precision.param_dtype
        if dtype != "float32" and self.mesh is None:  # FSDP casts by its policy instead
            return torch.autocast(self.env.device.type, dtype=TORCH_DTYPES[dtype])
        return contextlib.nullcontext()

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mcfg, model = self.cfg.model, self.parts[0]
        with self.autocast():
            if mcfg.num_nextn_predict_layers == 0:
                return self.loss_fn(model(inputs), labels)
            # labels may run past the inputs (this rank's part of longer sequences): the tokens after the part
            logits, mtp = model.forward_with_mtp(inputs, labels[:, inputs.shape[1] - 1:-1])
        return lm_and_mtp_loss(self.loss_fn, logits, mtp, labels, self.mtp_loss_weight(), model.sequence_shard[1])

    def mtp_loss_weight(self) -> float:
        """The MTP loss weight of the current step (model.mtp_loss_weight, or train.mtp_loss_weight_after's)."""
        return self.position.mtp_loss_weight(self.step, self.cfg.train, self.cfg.model.mtp_loss_weight)

    def gemm_mode(self):
        """`precision.bf16_gemm_emulate`: bf16 GEMMs (forward and backward) computed in fp32, see train/precision.py."""
        return Bf16GemmEmulation() if self.cfg.precision.bf16_gemm_emulate else contextlib.nullcontext()

    def train_step(self, micro_batches) -> dict:
        if self.pipeline is not None:
            self.pipeline.mtp_loss_weight = self.mtp_loss_weight()  # the last stage's loss reads it
        self.phase = "forward/backward"
        with self.gemm_mode():
            total = self._pipeline_loss(micro_batches) if self.pipeline is not None else self._accumulate(micro_batches)
        self.phase = "the routing-statistics all-reduce"
        moe = self._moe_step()
        self.phase = "gradient clipping"
        grad_norm = self._clip()
        self.phase = "the optimizer step"
        self.optimizers.step()
        after_optimizer_step(self.parts, self.fp8)
        self.optimizers.zero_grad()
        self.phase = "the loss all-reduce"
        return {"loss": all_mean(total, self.token_world, self.token_group).item(), "grad_norm": grad_norm, **moe}

    def _accumulate(self, micro_batches) -> torch.Tensor:
        """Forward/backward of each micro-batch in turn (gradient accumulation); the mean loss."""
        n = len(micro_batches)
        self.parts[0].set_aux_loss_scale(1.0 / n)  # balance losses get the same 1/n as the LM loss
        total = torch.zeros((), device=self.env.device)
        unsharded = self.cfg.parallel.accumulate_unsharded
        for i, (inputs, labels) in enumerate(micro_batches):
            if self.mesh is not None:  # when FSDP reduces (parallel.micro_batch_sync)
                micro_batch_sync(self.parts, self.dims, first=i == 0, last=i == n - 1, keep_unsharded=unsharded)
            loss = self.loss(inputs.to(self.env.device), labels.to(self.env.device))
            (loss / n).backward()
            total += loss.detach() / n
        if self.mesh is not None:
            end_of_step(self.parts, unsharded)
        return total

    def _pipeline_loss(self, micro_batches, train: bool = True) -> torch.Tensor:
        """The step's whole local batch through the pipeline schedule; the mean loss on every pp rank."""
        inputs = torch.cat([x for x, _ in micro_batches]).to(self.env.device)
        labels = torch.cat([y for _, y in micro_batches]).to(self.env.device)
        with self.autocast():
            if train:  # the microbatch count changes under a batch-size ramp-up (the first, the smallest, was
                # checked against the schedule's minimum at set-up)
                loss = self.pipeline.step(inputs, labels, pipeline_microbatches(self.cfg, inputs.shape[0]))
                self._sync_tied_embedding()
            else:
                loss = self.pipeline.evaluate(inputs, labels)
        total = torch.zeros((), device=self.env.device) if loss is None else loss.float()
        dist.all_reduce(total, group=self.pp_group)  # only the last stage's rank holds the loss
        return total

    def next_batch(self) -> list:
        """The next step's micro-batches of (inputs, labels) for this rank (its part of each sequence under cp)."""
        return self.sequence_part(self.loader.next_batch())

    def sequence_part(self, batches: list) -> list:
        """This rank's part of every sequence of (inputs, labels) batches under context parallelism; with MTP
        of depth D the labels run D positions into the next part (depth k predicts the label k positions on)."""
        index, count = self.cp_part
        if count == 1:
            return batches
        t, ahead = self.cfg.data.seq_len // count, self.cfg.model.num_nextn_predict_layers
        return [(x[:, index * t:(index + 1) * t], y[:, index * t:(index + 1) * t + ahead]) for x, y in batches]

    def _clip(self) -> float:
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        params = [p for part in self.parts for p in part.parameters()]
        copies = self.pipeline.tied_embedding_copies() if self.pipeline is not None else []  # count once
        return clip_grad_norm_(params, max_norm, self.pp_group, copies)

    def _moe_step(self) -> dict:
        """The step's routing statistics (train/moe_stats.py): bias update, balance metrics; counters reset."""
        stats = MoEStats.collect(self.moe_layers(), self.cfg.model, self.stats_groups,
                                 self.position.bias_updates(self.step, self.cfg.train))
        self.moe_stats = stats
        return {} if stats is None else stats.metrics()

    # ------------------------------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Train to train.steps; a collective that fails (a peer hung, died, cut off) raises CollectiveFailure."""
        try:
            return self._loop()
        except RuntimeError as e:
            if self.watch is None or not is_collective_failure(e):
                raise
            self.collective_failed = True
            raise self.watch.report(self.step, e, self.phase) from None

    def _loop(self) -> int:
        cfg = self.cfg
        start, t0 = self.step, time.perf_counter()
        window_t, window_steps, window_tokens = time.perf_counter(), 0, 0
        while self.step < cfg.train.steps:
            result = self.train_step(self.next_batch())
            window_tokens += self.batches.size(self.step) * cfg.data.seq_len
            self.step += 1
            window_steps += 1
            if not self._accept(result):
                continue
            if self.step % cfg.log.every == 0 or self.step == cfg.train.steps:
                elapsed = time.perf_counter() - window_t
                self._log(result, elapsed / window_steps, window_tokens / elapsed, start, t0)
                window_t, window_steps, window_tokens = time.perf_counter(), 0, 0
            if cfg.train.val_every and (self.step % cfg.train.val_every == 0 or self.step == cfg.train.steps):
                self._validate()
            self.phase = "the end-of-step signal check (all-reduce)"
            if self._should_stop():
                self.phase = "the checkpoint save"
                self._save()
                log.info("signal %s: checkpoint at step %d written, exiting", self._stop_signal, self.step)
                return 0
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.steps:
                self.phase = "the checkpoint save"
                self._save()
            if self.step == self._kill_at:  # fault injection for the resume tests: die like a lost node
                self.checkpointer.wait()
                os.kill(os.getpid(), signal.SIGKILL)
        self._save()
        self.checkpointer.wait()
        return 0

    def _accept(self, result: dict) -> bool:
        """False when the step's losses were a spike and the run rolled back (train/spike.py)."""
        losses = {k: v for k, v in result.items() if k == "loss" or k.startswith("aux/")}
        problem = self.spike.problem(losses)
        if problem is not None and self.spike.can_roll_back():
            self._roll_back(problem)
            return False
        if problem is not None and not all(math.isfinite(v) for v in losses.values()):
            last = self.checkpointer.last_published()
            raise TrainingError(f"{problem} at step {self.step}; last good checkpoint: {last or 'none'} (nothing "
                                f"saved; train.spike.max_rollbacks > 0 rolls back and skips data instead)")
        if problem is not None:
            log.warning("step %d: %s (train.spike.max_rollbacks=%d used up)", self.step, problem,
                        self.cfg.train.spike.max_rollbacks)
        self.spike.observe(result["loss"])
        return True

    def _roll_back(self, problem: str) -> None:
        """Back to the newest checkpoint (model, optimizer, schedule, data, RNG), then skip data."""
        spike_step, history = self.step, self.spike.rollbacks
        self.checkpointer.wait()
        state = self.checkpointer.load_latest(self.parts, self.optimizers.optimizers)
        if state is None:
            raise TrainingError(f"{problem} at step {spike_step}, and no checkpoint loads to roll back to")
        self._restore(state)
        skip = self.cfg.train.spike.skip_batches
        for _ in range(skip):  # the batches after the checkpoint's position, as any loader yields them
            self.loader.next_batch()
        self.spike.rollbacks = history + [{"step": spike_step, "to_step": self.step, "reason": problem}]
        for m in self.moe_layers().values():
            m.reset_stats()
        self.metrics.rewind(self.step)
        self.metrics.log(spike_step, {"step": spike_step, "rollbacks": len(self.spike.rollbacks),
                                      "rolled_back_to": self.step, "skipped_batches": skip, "reason": problem})
        log.warning("step %d: %s; rolled back to step %d, skipping %d batches (rollback %d of %d)", spike_step,
                    problem, self.step, skip, len(self.spike.rollbacks), self.cfg.train.spike.max_rollbacks)

    def _should_stop(self) -> bool:
        flag = torch.tensor([1 if self._stop_signal is not None else 0], dtype=torch.int64)
        if self.env.world > 1:  # one coordinated checkpoint: if any rank was signalled, all stop
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and self._stop_signal is None:
                self._stop_signal = -1
        return bool(flag.item())

    def _save(self) -> None:
        if self.checkpointer.last_step == self.step:
            return
        state = {"step": self.step, "scheduler": self.optimizers.scheduler_state(),
                 "loader": self.loader.state_dict(), "config": to_dict(self.cfg), "spike": self.spike.state_dict()}
        self.checkpointer.save(self.step, self.parts, self.optimizers.optimizers, state)

    def _log(self, result: dict, step_time: float, tps: float, start: int, t0: float) -> None:
        mfu = self.flops_per_token * tps / (self.peak_flops * self.env.world)
        record = {"step": self.step, "loss": result["loss"], "lr": self.optimizers.last_lr(),
                  "grad_norm": result["grad_norm"], "tokens_per_sec": tps, "mfu": mfu, "step_time": step_time,
                  "peak_mem_gb": max_over_ranks(peak_memory_gb(self.env.device), self.env.device, self.env.world),
                  "batch_size": self.batches.size(self.step - 1),
                  "tokens": self.batches.sequences_before(self.step) * self.cfg.data.seq_len}
        record.update({k: v for k, v in result.items() if k not in record})
        self.metrics.log(self.step, record)
        if self.step % self.cfg.log.moe_every == 0 and self.moe_stats is not None:
            bias = None
            if self.cfg.model.aux_loss_free_bias:
                bias = gathered_expert_bias(self.moe_layers(), self.cfg.model, self.stats_groups)
            self.metrics.log_moe(self.step, self.moe_stats.loads, self.moe_stats.layer_ids, bias)
        if self.env.rank == 0:
            print(format_progress(self.step, self.cfg.train.steps, result["loss"], tps, mfu,
                                  self.batches.seconds_left(start, self.step, self.cfg.train.steps,
                                                            time.perf_counter() - t0)), flush=True)

    @torch.no_grad()
    def _validate(self) -> None:
        for part in self.parts:
            part.eval()
        # held-out batches of the training step's size, whatever the layout; each is the mean of its micro-batches
        local = self.cfg.train.global_batch_size // self.dp_world
        batches = self.sequence_part(self.val_loader.val_batches(self.cfg.data.val_batches, local))
        with self.gemm_mode():
            losses = self._val_losses(batches)
        for m in self.moe_layers().values():
            m.reset_stats()  # validation routing is not training load
        for part in self.parts:
            part.train()
        if not losses:
            return
        val = all_mean(torch.stack(losses).mean(), self.token_world, self.token_group).item()
        self.metrics.log(self.step, {"step": self.step, "val_loss": val})
        if self.env.rank == 0:
            print(f"step {self.step} | val_loss {val:.4f}", flush=True)

    def _val_losses(self, batches) -> list[torch.Tensor]:
        if self.pipeline is not None:
            return [self._pipeline_loss([b], train=False) for b in batches]
        mb = self.cfg.train.micro_batch_size
        return [torch.stack([self.loss(x.to(self.env.device), y.to(self.env.device))
                             for x, y in zip(xs.split(mb), ys.split(mb))]).mean() for xs, ys in batches]

    def close(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()
        if self.watch is not None:
            self.watch.close()
        if dist.is_initialized() and not self.collective_failed:  # a group with a lost peer cannot be torn down
            dist.destroy_process_group()
