"""The rank environment of a process: torchrun's variables, or SLURM's for a task `srun` started directly, and the
process group (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ConfigError


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-005,9],cpu1" -> "gpu003"; "a,b" -> "a"."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r} in the environment: cannot read a host from it")
    prefix, ranges = m.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def torch_env_from_slurm(env: dict[str, str]) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for a task that `srun` started directly
    (one task per GPU), from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the job's first node. Empty when
    torchrun already set them or this is not a multi-task SLURM step. MASTER_PORT defaults to 29500 + the job
    id modulo 1000, so two jobs sharing a node do not collide."""
    if "RANK" in env or _int_var(env, "SLURM_NTASKS", 1) <= 1 or "SLURM_PROCID" not in env:
        return {}
    missing = [k for k in ("SLURM_LOCALID", "SLURM_JOB_NODELIST") if k not in env]
    if missing and "MASTER_ADDR" not in env:
        raise ConfigError(f"SLURM_NTASKS={env['SLURM_NTASKS']} but {missing} unset: not a SLURM job step?")
    ranks = [str(_int_var(env, k, 0)) for k in ("SLURM_PROCID", "SLURM_LOCALID")]
    return {"RANK": ranks[0], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": ranks[1],
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
            "MASTER_PORT": env.get("MASTER_PORT") or str(29500 + _int_var(env, "SLURM_JOB_ID", 0) % 1000)}


def _int_var(env: Mapping[str, str], name: str, default: int) -> int:
    """The environment variable `name` as an integer >= 0 (`default` when unset); ConfigError naming it."""
    text = env.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{name}={text!r} in the environment: expected an integer >= 0 (torchrun and srun set it)")
    return value


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: global rank, world size, rank on its node."""
    rank: int
    world: int
    local_rank: int


def rank_env(env: Mapping[str, str]) -> Ranks:
    """WORLD_SIZE, RANK and LOCAL_RANK (torchrun's, or SLURM's for a task `srun` started directly), checked for type
    and range before any work: ConfigError naming the variable."""
    env = {**env, **torch_env_from_slurm(env)}
    world, rank, local = (_int_var(env, k, d) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if world < 1 or rank >= world:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} in the environment: expected 0 <= RANK < WORLD_SIZE")
    return Ranks(rank, world, local)


def ranks_per_host(env: Mapping[str, str]) -> int | None:
    """The job's ranks on each host: torchrun's LOCAL_WORLD_SIZE, else SLURM's SLURM_NTASKS_PER_NODE ("8" or
    "8(x4)"), else None (unknown: taken as one host). Both launchers number ranks host by host."""
    if "LOCAL_WORLD_SIZE" in env:
        return _int_var(env, "LOCAL_WORLD_SIZE", 1) or None
    m = re.match(r"(\d+)", env.get("SLURM_NTASKS_PER_NODE", ""))
    return int(m.group(1)) if m else None


def reports_for_job(env: Mapping[str, str]) -> bool:
    """Whether this process prints the errors every rank finds alike (configuration, layout): rank 0 only, or every
    process when the rank environment itself is unreadable."""
    try:
        return rank_env(env).rank == 0
    except ConfigError:
        return True


@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    ranks_per_host: int | None = None  # see ranks_per_host(); None: one host


def init_distributed(timeout_s: float = 600.0) -> Env:
    """This process's ranks; the process group (collectives wait at most `timeout_s` seconds for their peers)."""
    # started by `srun` directly, one task per GPU: the ranks come from SLURM's variables
    os.environ.update(torch_env_from_slurm(dict(os.environ)))
    rank, world, local_rank = dataclasses.astuple(rank_env(os.environ))
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
    return Env(rank, world, local_rank, device, ranks_per_host(os.environ))
