"""Dry run of a full-size layout on this one CPU: the real mesh and the real sharded model of chosen ranks,
built with torch's fake process-group backend (collectives are no-ops) on the meta device (no memory).

    python -m launch.dryrun model=deepseek_v2 parallel.pp=16 parallel.ep=8 launch=slurm launch.nodes=256 \
        launch.procs_per_node=8

World size = launch.nodes x launch.procs_per_node. For the first rank of every pipeline stage (or the ranks
given by `--ranks 0,5,...` before the overrides) it prints the parameters this rank holds, split by the mesh
axes they are sharded over, and the bytes of fp32 master weights, fp32 gradients and AdamW moments
(precision.moment_dtype). The trainer logs the same accounting for every real rank at start-up. Counts are
of the elements a rank owns; FSDP pads uneven shards to the largest one, which these counts leave out.
Each line ends with the capacity planner's count for the rank (launch/plan/memory.py, arithmetic on the
config, no process group) and whether the two agree.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from launch.plan.memory import StageShapes, layout_of, meta_model, rank_parameter_elements
from parallel.inventory import rank_parameters
from train.config import ConfigError, compose_config
from train.env import Env
from train.runtime import build_runtime


def memory_bytes(counts: dict[str, int], moment_bytes: int) -> dict[str, int]:
    n = sum(counts.values())
    return {"params_fp32": 4 * n, "grads_fp32": 4 * n, "adam_moments": 2 * moment_bytes * n,
            "total": (8 + 2 * moment_bytes) * n}


def build_rank(cfg, world: int, rank: int) -> list[nn.Module]:
    """This rank's sharded model parts, on meta, under a fake process group of `world` ranks: the runtime's own
    model build (train/runtime.py), FP8, offload, recomputation and compile included."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        env = Env(rank=rank, world=world, local_rank=0, device=torch.device("cpu"),
                  ranks_per_host=cfg.launch.procs_per_node)
        return build_runtime(cfg, env, data=False, optimizers=False, meta=True).parts
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    ranks = None
    if argv and argv[0].startswith("--ranks"):
        ranks = [int(r) for r in (argv[0].split("=", 1)[1] if "=" in argv[0] else argv.pop(1)).split(",")]
        argv = argv[1:]
    try:
        cfg = compose_config(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    world = cfg.launch.max_nodes * cfg.launch.procs_per_node
    if ranks is None:
        ranks = [s * world // cfg.parallel.pp for s in range(cfg.parallel.pp)]
    moment = 2 if cfg.precision.moment_dtype == "bfloat16" else 4
    shapes = StageShapes(meta_model(cfg.model))
    print(f"dry run: world={world} "
          f"parallel=(pp={cfg.parallel.pp}, dp_replicate={cfg.parallel.dp_replicate}, "
          f"dp_shard={cfg.parallel.dp_shard}, "
          f"tp={cfg.parallel.tp}, ep={cfg.parallel.ep})")
    for rank in ranks:
        t = time.perf_counter()
        try:
            counts = rank_parameters(build_rank(cfg, world, rank))
        except ValueError as e:  # LayoutError and friends: one line
            print(f"config error: {e}", file=sys.stderr)
            return 2
        mem = memory_bytes(counts, moment)
        planned = rank_parameter_elements(shapes, layout_of(cfg, world, False, cfg.launch.procs_per_node), rank)
        built = {kind: sum(v for k, v in counts.items() if k.startswith(kind + ":")) for kind in planned}
        print(f"rank {rank} holds parameters {json.dumps(counts)} | GiB: " +
              ", ".join(f"{k} {v / 2**30:.2f}" for k, v in mem.items()) +
              f" | built in {time.perf_counter() - t:.1f} s | planner {json.dumps(planned)} " +
              ("agrees" if planned == built else "DIFFERS"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
