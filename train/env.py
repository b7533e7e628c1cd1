"""The rank environment of a process: torchrun's variables, or SLURM's for a task `srun` started directly, and the
process group (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ConfigError


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-005,9],cpu1" -> "gpu003"; "a,b" -> "a"."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot read a host from SLURM node list {nodelist!r}")
    prefix, ranges = m.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def torch_env_from_slurm(env: dict[str, str]) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for a task that `srun` started directly
    (one task per GPU), from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the job's first node. Empty when
    torchrun already set them or this is not a multi-task SLURM step. MASTER_PORT defaults to 29500 + the job
    id modulo 1000, so two jobs sharing a node do not collide."""
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return {}
    missing = [k for k in ("SLURM_LOCALID", "SLURM_JOB_NODELIST") if k not in env]
    if missing and "MASTER_ADDR" not in env:
        raise ValueError(f"SLURM_NTASKS={env['SLURM_NTASKS']} but {missing} unset: not a SLURM job step?")
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
            "MASTER_PORT": env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000)}


@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device


def init_distributed(timeout_s: float = 600.0) -> Env:
    """This process's ranks; the process group (collectives wait at most `timeout_s` seconds for their peers)."""
    try:  # started by `srun` directly, one task per GPU: the ranks come from SLURM's variables
        os.environ.update(torch_env_from_slurm(dict(os.environ)))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if k not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE={world} but {missing} unset: launch with torchrun (or srun torchrun)")
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=timedelta(seconds=timeout_s))
    return Env(rank, world, local_rank, device)
