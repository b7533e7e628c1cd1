"""One training step, apart from the loop that calls it: gradient accumulation or the pipeline schedule,
context-parallel slicing, the tied MTP embedding's gradient sum, clipping, the optimizer and MoE statistics.

`Step(runtime)(micro_batches, step)` runs optimizer step `step` (0-based) on this rank's micro-batches and
returns its metrics; `Step.losses` gives the held-out losses of validation and `train.evaluate`.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from model.config import TORCH_DTYPES
from model.transformer import lm_and_mtp_loss
from parallel import clip_grad_norm_, end_of_step, micro_batch_sync
from parallel.fp8 import after_optimizer_step

from .config import pipeline_microbatches
from .moe_stats import MoEStats
from .precision import Bf16GemmEmulation
from .qk_clip import qk_clip, track_max_logits
from .runtime import Runtime


def all_mean(x: torch.Tensor, world: int, group=None) -> torch.Tensor:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x, group=group)
        x /= world
    return x


class Step:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.cfg = rt.cfg
        self.moe_stats: Optional[MoEStats] = None  # the last step's routing statistics
        self.qk_clip_tau = rt.cfg.optim.qk_clip_tau
        if self.qk_clip_tau is not None:
            track_max_logits(rt.parts, True)

    # ------------------------------------------------------------------------------------------ modes
    def autocast(self):
        dtype = self.cfg.precision.param_dtype
        if dtype != "float32" and self.rt.mesh is None:  # FSDP casts by its policy instead
            return torch.autocast(self.rt.env.device.type, dtype=TORCH_DTYPES[dtype])
        return contextlib.nullcontext()

    def gemm_mode(self):
        """`precision.bf16_gemm_emulate`: bf16 GEMMs (forward and backward) computed in fp32, see train/precision.py."""
        return Bf16GemmEmulation() if self.cfg.precision.bf16_gemm_emulate else contextlib.nullcontext()

    def mtp_loss_weight(self, step: int) -> float:
        """The MTP loss weight of optimizer step `step` (model.mtp_loss_weight, or train.mtp_loss_weight_after's)."""
        return self.rt.position.mtp_loss_weight(step, self.cfg.train, self.cfg.model.mtp_loss_weight)

    # ------------------------------------------------------------------------------------------ the step
    def __call__(self, micro_batches, step: int) -> dict:
        """Optimizer step `step` (0-based) on this rank's micro-batches of (inputs, labels): its metrics."""
        rt = self.rt
        if rt.pipeline is not None:
            rt.pipeline.mtp_loss_weight = self.mtp_loss_weight(step)  # the last stage's loss reads it
        with self.gemm_mode():
            if rt.pipeline is not None:
                total = self._pipeline_loss(micro_batches)
            else:
                total = self.accumulate(micro_batches, step)
        moe = self._moe_step(step)
        grad_norm = self._clip()
        rt.optimizers.step()
        g = rt.groups
        clip = {}
        if self.qk_clip_tau is not None:  # train/qk_clip.py: the step's largest logit, before clipping
            clip["max_logit"] = qk_clip(rt.parts, self.qk_clip_tau, g.token_group, g.pp_group, g.head_group)
        after_optimizer_step(rt.parts, rt.fp8)
        rt.optimizers.zero_grad()
        return {"loss": all_mean(total, g.token_world, g.token_group).item(), "grad_norm": grad_norm, **moe, **clip}

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        mcfg, model = self.cfg.model, self.rt.parts[0]
        with self.autocast():
            if mcfg.num_nextn_predict_layers == 0:
                return self.rt.loss_fn(model(inputs), labels)
            # labels may run past the inputs (this rank's part of longer sequences): the tokens after the part
            logits, mtp = model.forward_with_mtp(inputs, labels[:, inputs.shape[1] - 1:-1])
        return lm_and_mtp_loss(self.rt.loss_fn, logits, mtp, labels, self.mtp_loss_weight(step),
                               model.sequence_shard[1])

    def accumulate(self, micro_batches, step: int) -> torch.Tensor:
        """Forward/backward of each micro-batch in turn (gradient accumulation, no pipeline); the mean loss. The
        gradients stay for the caller (the step clips them and steps the optimizer)."""
        rt, n = self.rt, len(micro_batches)
        rt.parts[0].set_aux_loss_scale(1.0 / n)  # balance losses get the same 1/n as the LM loss
        total = torch.zeros((), device=rt.env.device)
        unsharded = self.cfg.parallel.accumulate_unsharded
        for i, (inputs, labels) in enumerate(micro_batches):
            if rt.mesh is not None:  # when FSDP reduces (parallel.micro_batch_sync)
                micro_batch_sync(rt.parts, rt.dims, first=i == 0, last=i == n - 1, keep_unsharded=unsharded)
            loss = self.loss(inputs.to(rt.env.device), labels.to(rt.env.device), step)
            (loss / n).backward()
            total += loss.detach() / n
        if rt.mesh is not None:
            end_of_step(rt.parts, unsharded)
        return total

    def _pipeline_loss(self, micro_batches, train: bool = True) -> torch.Tensor:
        """The step's whole local batch through the pipeline schedule; the mean loss on every pp rank."""
        rt = self.rt
        inputs = torch.cat([x for x, _ in micro_batches]).to(rt.env.device)
        labels = torch.cat([y for _, y in micro_batches]).to(rt.env.device)
        with self.autocast():
            if train:  # the microbatch count changes under a batch-size ramp-up (the first, the smallest, was
                # checked against the schedule's minimum at set-up)
                loss = rt.pipeline.step(inputs, labels, pipeline_microbatches(self.cfg, inputs.shape[0]))
                self._sync_tied_embedding()
            else:
                loss = rt.pipeline.evaluate(inputs, labels)
        total = torch.zeros((), device=rt.env.device) if loss is None else loss.float()
        dist.all_reduce(total, group=rt.groups.pp_group)  # only the last stage's rank holds the loss
        return total

    def _sync_tied_embedding(self) -> None:
        """Sum the gradients of stage 0's embedding and the last stage's MTP copy, so both stay equal."""
        if not self.cfg.model.num_nextn_predict_layers:
            return
        grads = [part.embed_tokens.weight.grad for part in self.rt.parts if part.embed_tokens is not None]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        if not local:  # a middle stage
            return
        total = torch.stack(local).sum(0)
        if self.rt.groups.embed_group is not None:
            dist.all_reduce(total, group=self.rt.groups.embed_group)
        for g in local:
            g.copy_(total)

    def _clip(self) -> float:
        rt = self.rt
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        params = [p for part in rt.parts for p in part.parameters()]
        copies = rt.pipeline.tied_embedding_copies() if rt.pipeline is not None else []  # count once
        return clip_grad_norm_(params, max_norm, rt.groups.pp_group, copies)

    def _moe_step(self, step: int) -> dict:
        """The step's routing statistics (train/moe_stats.py): bias update, balance metrics; counters reset."""
        stats = MoEStats.collect(self.rt.moe_layers(), self.cfg.model, self.rt.groups.stats,
                                 self.rt.position.bias_updates(step, self.cfg.train))
        self.moe_stats = stats
        return {} if stats is None else stats.metrics()

    # -------------------------------------------------------------------------------- data and held-out losses
    def sequence_part(self, batches: list) -> list:
        """This rank's part of every sequence of (inputs, labels) batches under context parallelism; with MTP
        of depth D the labels run D positions into the next part (depth k predicts the label k positions on)."""
        index, count = self.rt.groups.cp_part
        if count == 1:
            return batches
        t, ahead = self.cfg.data.seq_len // count, self.cfg.model.num_nextn_predict_layers
        return [(x[:, index * t:(index + 1) * t], y[:, index * t:(index + 1) * t + ahead]) for x, y in batches]

    @torch.no_grad()
    def losses(self, batches, step: int) -> list[torch.Tensor]:
        """This rank's mean loss of each whole held-out batch (its micro-batches', or the pipeline's), with the
        model parts in eval mode meanwhile; the routing counters are reset afterwards (held-out routing is not
        training load)."""
        rt = self.rt
        for part in rt.parts:
            part.eval()
        mb = self.cfg.train.micro_batch_size
        with self.gemm_mode():
            if rt.pipeline is not None:
                out = [self._pipeline_loss([b], train=False) for b in batches]
            else:
                out = [torch.stack([self.loss(x.to(rt.env.device), y.to(rt.env.device), step)
                                    for x, y in zip(xs.split(mb), ys.split(mb))]).mean() for xs, ys in batches]
        for m in rt.moe_layers().values():
            m.reset_stats()
        if self.qk_clip_tau is not None:  # held-out logits are not the step's
            track_max_logits(rt.parts, True)
        for part in rt.parts:
            part.train()
        return out
