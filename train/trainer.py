"""The training loop: set-up, then steps, with the components that decide for themselves when to act.

One `Trainer` per process. Single process on CPU or one GPU; under torchrun, gloo (CPU) or NCCL (GPU) with
the layout of `parallel.*`. The runtime (train/runtime.py) holds what a step runs on, the `Step`
(train/step.py) runs one; the loop hands each finished step to the spike guard, the progress log, the validator
and the checkpointer (train/components.py). Exact resume: model, optimizer, scheduler, data position and RNG
come back from the newest complete checkpoint, so a killed-and-resumed run continues the uninterrupted loss curve.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.analysis import training_flops_per_token

from .checkpoint import CheckpointError, Checkpointer, load_model_weights
from .components import ProgressLog, TrainState, Validator
from .config import ConfigError, RunConfig, to_dict
from .hardware import device_bf16_tflops
from .hf.load import check_hf_dir, is_hf_dir, load_hf_weights
from .metrics import MetricsWriter
from .resume import check_resume, record_config
from .runtime import complete_runtime, start_runtime
from .spike import SpikeGuard, TrainingError
from .step import Step
from .watch import Watch, is_collective_failure

log = logging.getLogger("train")


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


# --------------------------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.rt = start_runtime(cfg)  # environment, mesh, groups, layout checks: nothing written yet
        self.env = self.rt.env
        # a failed collective's report (train/watch.py): the loop's phase names the operation the stack does not
        self.watch = Watch.of_job(self.env.rank, self.env.world, cfg.parallel.collective_timeout_s)
        self.phase = "set-up"
        self.collective_failed = False
        if cfg.checkpoint.init_from and not Path(cfg.checkpoint.init_from).exists():
            raise CheckpointError(f"checkpoint.init_from={cfg.checkpoint.init_from} does not exist (expected a run's "
                                  f"output_dir, one of its checkpoints/step_N or a Hugging Face model directory)")
        self.hf_init = None  # a Hugging Face directory to start from: checked before anything is written
        if cfg.checkpoint.init_from and is_hf_dir(Path(cfg.checkpoint.init_from)):
            self.hf_init = check_hf_dir(Path(cfg.checkpoint.init_from), cfg.model)
        sp = cfg.train.spike
        self.spike = SpikeGuard(sp.factor, sp.window, sp.max_rollbacks)
        self.state = TrainState(self.rt, self.spike)
        self._stop_signal: int | None = None
        self.metrics: MetricsWriter | None = None
        self.progress: ProgressLog | None = None

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg, rt = self.cfg, self.rt
        if self.env.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        complete_runtime(rt)  # data, model parts, optimizers
        self.step_fn = Step(rt)
        self.checkpointer = Checkpointer(self.out / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save,
                                         every=cfg.checkpoint.every, steps=cfg.train.steps,
                                         on_error=cfg.checkpoint.on_error)
        resumed = self._resume() if cfg.checkpoint.load else None
        self._init_weights(resumed)
        if self.env.rank == 0:
            record_config(self.out, to_dict(cfg), resumed)
        self.metrics = MetricsWriter(self.out, enabled=self.env.rank == 0, resume_step=resumed)
        self.validator = Validator(rt, self.step_fn, self.metrics)
        self.progress = ProgressLog(rt, self.step_fn, self.metrics,
                                    training_flops_per_token(cfg.model, cfg.data.seq_len),
                                    peak_tflops(cfg, self.env.device) * 1e12, start=self.step)
        self._install_signal_handlers()

    def _init_weights(self, resumed: int | None) -> None:
        """A new run's weights from checkpoint.init_from (Hugging Face or another run), if it names one."""
        cfg = self.cfg
        if resumed is None and self.hf_init is not None:  # a new run from Hugging Face weights
            load_hf_weights(Path(cfg.checkpoint.init_from), self.rt.parts, cfg.model, self.hf_init)
            log.info("model weights from %s (Hugging Face)", cfg.checkpoint.init_from)
        elif resumed is None and cfg.checkpoint.init_from:  # a new run from another run's weights
            path = load_model_weights(Path(cfg.checkpoint.init_from), self.rt.parts)
            log.info("model weights from %s; optimizer, schedule and data start afresh", path)

    def _resume(self) -> int | None:
        forced = self._check_resumable()  # before loading: a different model would otherwise look like corruption
        state = self.checkpointer.load_latest(self.rt.parts, self.rt.optimizers.optimizers)
        if state is None:
            return None
        self.state.load_state_dict(state)
        for key, before, after in forced:
            log.warning("resumed with %s = %r (the checkpoint's run had %r), from step %d on", key, after, before,
                        self.step)
        log.info("resuming at step %d", self.step)
        return self.step

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
        while self.step < cfg.train.steps:
            self.phase = "the training step"
            result = self.step_fn(self.step_fn.sequence_part(self.rt.loader.next_batch()), self.step)
            self.progress.count(self.step)
            self.state.step += 1
            if not self._accept(result):
                continue
            self.phase = "logging and validation"
            self._after_step(result)
            self.phase = "the end-of-step check (all-reduce)"
            stop, written = self._end_of_step()
            if written:  # an async save every rank has written: published now, not at the next save
                self.phase = "the checkpoint publication"
                self.checkpointer.wait()
            if stop:
                self.phase = "the checkpoint save"
                self._save()
                log.info("signal %s: checkpoint at step %d written, exiting", self._stop_signal, self.step)
                return 0
            if self.checkpointer.should_save(self.step):
                self.phase = "the checkpoint save"
                self._save()
        self._save()
        self.checkpointer.wait()
        return 0

    def _after_step(self, result: dict) -> None:
        """What the components do with an accepted step: log, the MoE histograms, validate."""
        if self.progress.should_log(self.step):
            self.progress(self.step, result)
        if self.progress.should_log_moe(self.step):
            self.progress.moe(self.step)
        if self.validator.should_validate(self.step):
            self.validator(self.step)

    def _accept(self, result: dict) -> bool:
        """False when the step's losses were a spike and the run rolled back (train/spike.py)."""
        losses = {k: v for k, v in result.items() if k == "loss" or k.startswith("aux/")}
        problem = self.spike.problem(losses)
        if problem is not None and self.spike.can_roll_back():
            self._roll_back(problem)
            return False
        if problem is not None and not all(math.isfinite(v) for v in losses.values()):
            last = self.checkpointer.last_good()
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
        state = self.checkpointer.load_latest(self.rt.parts, self.rt.optimizers.optimizers)
        if state is None:
            raise TrainingError(f"{problem} at step {spike_step}, and no checkpoint loads to roll back to")
        self.state.load_state_dict(state)
        skip = self.cfg.train.spike.skip_batches
        for _ in range(skip):  # the batches after the checkpoint's position, as any loader yields them
            self.rt.loader.next_batch()
        self.spike.rollbacks = history + [{"step": spike_step, "to_step": self.step, "reason": problem}]
        for m in self.rt.moe_layers().values():
            m.reset_stats()
        self.metrics.rewind(self.step)
        self.metrics.log(spike_step, {"step": spike_step, "rollbacks": len(self.spike.rollbacks),
                                      "rolled_back_to": self.step, "skipped_batches": skip, "reason": problem})
        log.warning("step %d: %s; rolled back to step %d, skipping %d batches (rollback %d of %d)", spike_step,
                    problem, self.step, skip, len(self.spike.rollbacks), self.cfg.train.spike.max_rollbacks)

    def _end_of_step(self) -> tuple[bool, bool]:
        """(whether to stop: any rank was signalled, so all take one coordinated checkpoint; whether an async save
        is in flight and every rank has written its part), agreed by all ranks in one all-reduce."""
        flags = torch.tensor([self._stop_signal is not None, not self.checkpointer.written()], dtype=torch.int64)
        if self.env.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0].item() and self._stop_signal is None:
                self._stop_signal = -1
        return bool(flags[0].item()), self.checkpointer.in_flight() and not flags[1].item()

    def _save(self) -> None:
        if self.checkpointer.last_step == self.step:
            return
        self.checkpointer.save(self.step, self.rt.parts, self.rt.optimizers.optimizers, self.state.state_dict())

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.progress is not None:
            self.progress.close()
        if self.watch is not None:
            self.watch.close()
        if dist.is_initialized() and not self.collective_failed:  # a group with a lost peer cannot be torn down
            dist.destroy_process_group()
