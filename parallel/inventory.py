"""What parameters a rank holds under a parallel layout, by the mesh axes they are split over (the trainer
logs it at start-up; `python -m launch.dryrun` prints it for full-size layouts)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def shard_axes(param: torch.Tensor) -> str:
    """The mesh axes a parameter is split over ("efsdp+ep", "dp_shard", "dp_shard+tp", ...; "none")."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return "none"
    names = mesh.mesh_dim_names or ()
    split = [name for name, pl in zip(names, param.placements) if not (pl.is_replicate() or pl.is_partial())]
    return "+".join(split) or "none"


def rank_parameters(parts: list[nn.Module]) -> dict[str, int]:
    """Elements of every parameter this rank holds, summed by the axes they are split over ("experts:" for
    the routed expert stacks, "dense:" for the rest)."""
    counts: dict[str, int] = defaultdict(int)
    for part in parts:
        for name, p in part.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            kind = "experts" if ".experts." in name else "dense"
            counts[f"{kind}:{shard_axes(p)}"] += local.numel()
    return dict(sorted(counts.items()))
