"""Muon (Moonlight, arXiv 2502.16982) for the hidden matrices, AdamW for the rest, in one optimizer.

Muon: momentum buffer M <- mu M + G, update direction G + mu M (Nesterov) or M, orthogonalised by the quintic
Newton-Schulz iteration X <- a X + (b A + c A^2) X with A = X X^T, X_0 = U / |U|_F, (a, b, c) = (3.4445, -4.7750,
2.0315) for 5 steps (Keller Jordan's coefficients, used by Moonlight), then W <- W (1 - lr wd) - lr s sqrt(max(m, n))
O with s = 0.2, so the update RMS matches AdamW's and AdamW's lr and weight decay carry over.

Which parameters: every matrix (2-D) but the embedding and the output head, and each routed expert's matrices
(the stacks [E, ., .] one matrix per expert; the fused gate|up stack as two, like the dense gate_proj and
up_proj), the routers too by default (Moonlight's examples/toy_train.py gives Muon every parameter with
ndim >= 2 but embed_tokens and lm_head). Norms, the embedding, the head and any other shape go to AdamW.
The state of a Muon parameter is one buffer, `momentum_buffer`, shaped (and sharded) as the parameter, so DCP
saves it by parameter name like AdamW's moments.

Sharded parameters (FSDP, HSDP, TP, EP: DTensors): the update direction is gathered whole over every mesh
dimension (an expert stack stays split by expert over "ep": each rank its own experts, each whole),
orthogonalised, and each rank keeps its own shard of the result. The ranks holding parts of a matrix all compute
it whole (redundant compute, no second collective): the result is the one process's whatever the layout.
"""

from __future__ import annotations

import math
from typing import get_args

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from model.config import TORCH_DTYPES
from model.moe import GroupedExperts, Router
from parallel.tensor import local_tensor

from .config import MuonNsDtype, OptimConfig
from .optim import AdamWLowPrecisionMoments

NS_DTYPES = {name: TORCH_DTYPES[name] for name in get_args(MuonNsDtype) if name != "auto"}


def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients=(3.4445, -4.7750, 2.0315),
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthogonalised direction of each matrix of g [..., m, n] (leading dimensions: a batch of matrices,
    each normalised by its own Frobenius norm), in `dtype`; returned in g's dtype."""
    a, b, c = coefficients
    x = g.to(dtype)
    wide = x.shape[-2] > x.shape[-1]
    if wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if wide else x).to(g.dtype)


def matrix_scale(m: int, n: int, scale: float = 0.2) -> float:
    """Moonlight's update scale of an m x n matrix: its orthogonalised update has RMS 1/sqrt(max(m, n)), AdamW's
    about 0.2-0.4; scale * sqrt(max(m, n)) brings it to `scale`."""
    return scale * math.sqrt(max(m, n))


def _placements_of_whole(like: DTensor, keep_experts: bool) -> list:
    """Placements of the whole matrices: replicated everywhere, but for an expert stack (`keep_experts`) still
    split by expert over the mesh's "ep" dimension (each rank orthogonalises its own experts)."""
    names = like.device_mesh.mesh_dim_names or ()
    return [Shard(0) if keep_experts and name == "ep" else Replicate() for name in names] or \
        [Replicate()] * like.device_mesh.ndim


def gathered(local: torch.Tensor, like: torch.Tensor, keep_experts: bool = False) -> torch.Tensor:
    """The whole tensor of which `local` is this rank's shard, laid out as the DTensor `like` (`keep_experts`: an
    expert stack's experts of this rank's ep coordinate, each whole)."""
    if not isinstance(like, DTensor):
        return local
    if local.device.type != like.device_mesh.device_type:  # parallel.cpu_offload: host shards, device collectives
        local = local.to(like.device_mesh.device_type)
    sharded = DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(),
                                 run_check=False)
    return sharded.redistribute(like.device_mesh, _placements_of_whole(like, keep_experts)).to_local()


def shard_of(whole: torch.Tensor, like: torch.Tensor, keep_experts: bool = False) -> torch.Tensor:
    """This rank's shard of `whole` (what `gathered` returned) in the layout of the DTensor `like` (no
    communication)."""
    if not isinstance(like, DTensor):
        return whole
    mesh = like.device_mesh
    joined = DTensor.from_local(whole, mesh, _placements_of_whole(like, keep_experts), shape=like.shape,
                                stride=like.stride(), run_check=False)
    return joined.redistribute(mesh, like.placements).to_local()


class Muon(AdamWLowPrecisionMoments):
    """Muon for the param groups with "muon": True (a group with "split": True holds fused gate|up expert
    stacks), AdamW (train.optim.AdamWLowPrecisionMoments: same state keys as torch's) for the others. A group's
    "decay" says whether it takes optim.weight_decay."""

    def __init__(self, groups: list[dict], cfg: OptimConfig, moment_dtype=torch.float32):
        super().__init__(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, moment_dtype=moment_dtype)
        self.cfg = cfg
        self.ns_dtype = NS_DTYPES.get(cfg.muon_ns_dtype)  # None (auto): by the device the matrix is on

    def ns_dtype_on(self, device: torch.device) -> torch.dtype:
        """optim.muon_ns_dtype; auto: float32 on a CPU, bfloat16 on an accelerator (as Moonlight)."""
        if self.ns_dtype is not None:
            return self.ns_dtype
        return torch.float32 if device.type == "cpu" else torch.bfloat16

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group.get("muon"):
                    self._muon(p, self.state[p], group)
                else:
                    self._update(p, self.state[p], group)

    def _muon(self, p: torch.Tensor, state: dict, group: dict) -> None:
        cfg, grad = self.cfg, local_tensor(p.grad)
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = local_tensor(state["momentum_buffer"])
        buf.mul_(cfg.muon_momentum).add_(grad)
        direction = grad.add(buf, alpha=cfg.muon_momentum) if cfg.muon_nesterov else buf
        stack = p.ndim == 3  # routed experts: each rank its own
        update = self.orthogonalised(gathered(direction, p, stack), group.get("split", False))
        weight = local_tensor(p)
        weight.mul_(1 - group["lr"] * group["weight_decay"])
        weight.add_(shard_of(update, p, stack).to(weight.device, weight.dtype), alpha=-group["lr"])

    def orthogonalised(self, u: torch.Tensor, split: bool) -> torch.Tensor:
        """Newton-Schulz of each matrix of a whole 2-D weight or [E, ., .] expert stack (`split`: each expert's
        last dimension holds two matrices), times its update scale."""
        cfg = self.cfg
        parts = u.chunk(2, dim=-1) if split else (u,)
        out = [newton_schulz(x, cfg.muon_ns_steps, tuple(cfg.muon_ns_coefficients), self.ns_dtype_on(u.device))
               * matrix_scale(x.shape[-2], x.shape[-1], cfg.muon_update_scale) for x in parts]
        return torch.cat(out, dim=-1) if split else out[0]


def muon_kind(name: str, p: nn.Parameter, owner: nn.Module, cfg: OptimConfig) -> str | None:
    """"matrix", "split" (a fused gate|up expert stack) or "stack" for a Muon parameter; None: AdamW's."""
    if "embed_tokens" in name or "lm_head" in name:
        return None
    if isinstance(owner, GroupedExperts) and p.ndim == 3:
        return "split" if name.endswith("gate_up_proj") and cfg.muon_split_gate_up else "stack"
    if isinstance(owner, Router) and not cfg.muon_router:
        return None
    return "matrix" if p.ndim == 2 else None


def muon_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """[Muon matrices and stacks, Muon fused gate|up stacks, AdamW decayed, AdamW not decayed] (empty ones left
    out): AdamW's decay rule is train.optim.param_groups'."""
    muon, split, decay, no_decay = [], [], [], []
    seen: set[int] = set()  # a parameter shared by two modules (a tied embedding) counted once
    for owner_name, owner in model.named_modules():
        for pname, p in owner.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{owner_name}.{pname}" if owner_name else pname
            kind = muon_kind(name, p, owner, cfg)
            if kind is not None:
                (split if kind == "split" else muon).append(p)
                continue
            exempt = p.ndim < 2 or "embed_tokens" in name
            (no_decay if exempt and not cfg.decay_norms_and_embeddings else decay).append(p)
    groups = [{"params": muon, "muon": True, "split": False, "decay": True},
              {"params": split, "muon": True, "split": True, "decay": True},
              {"params": decay, "muon": False, "split": False, "decay": True},
              {"params": no_decay, "muon": False, "split": False, "decay": False}]
    for g in groups:
        g["weight_decay"] = cfg.weight_decay if g["decay"] else 0.0
    return [g for g in groups if g["params"]]


def build_muon(model: nn.Module, cfg: OptimConfig, moment_dtype: torch.dtype = torch.float32) -> Muon:
    return Muon(muon_param_groups(model, cfg), cfg, moment_dtype)
