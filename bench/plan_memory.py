"""The capacity planner's memory estimate against the measured peak, for many layouts, side by side.

    PYTHONPATH=. python bench/plan_memory.py            # every layout below (about 4 minutes on 2 cores)
    PYTHONPATH=. python bench/plan_memory.py pp         # only layouts whose name contains "pp"

Each layout runs `python -m launch.memcheck` (3 training steps under torch's profiler, on the built-in data)
with torchrun when it has more than one process, and prints per rank: measured peak of live tensor bytes,
the planner's estimate and planned / measured. The test suite checks a subset within 15%
(tests/test_plan.py); this prints the rest too, the weaker estimates included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from machine import describe  # noqa: E402  (bench/, beside this file)

ROOT = Path(__file__).resolve().parent.parent

LAYOUTS = {
    "tiny 1 proc": (1, []),
    "tiny 1 proc, selective": (1, ["parallel.activation_checkpoint=selective"]),
    "tiny 1 proc, full": (1, ["parallel.activation_checkpoint=full"]),
    "small 1 proc (mb 4, seq 128)": (1, ["model=small", "train.micro_batch_size=4", "train.global_batch_size=8",
                                         "data.seq_len=128"]),
    "small FSDP 2 (mb 4, seq 128)": (2, ["model=small", "train.micro_batch_size=4", "train.global_batch_size=8",
                                         "data.seq_len=128"]),
    "small FSDP 2 (mb 1, seq 64)": (2, ["model=small", "train.micro_batch_size=1", "train.global_batch_size=8",
                                        "data.seq_len=64"]),
    "small FSDP 2, accumulate unsharded": (2, ["model=small", "train.micro_batch_size=1",
                                               "train.global_batch_size=8", "data.seq_len=64",
                                               "parallel.accumulate_unsharded=true"]),
    "tiny FSDP 2": (2, []),
    "tiny FSDP 2, bf16": (2, ["precision=bf16"]),
    "tiny HSDP 2x2": (4, ["parallel.dp_replicate=2", "train.micro_batch_size=4"]),
    "tiny ep 2 (no capacity limit)": (2, ["parallel.ep=2"]),
    "tiny ep 2 (capacity factor 1)": (2, ["parallel.ep=2", "model.capacity_factor=1.0", "model.no_drop_fraction=0"]),
    "tiny tp 2": (2, ["parallel.tp=2"]),
    "tiny tp 2 x ep 2, bf16": (4, ["parallel.tp=2", "parallel.ep=2", "precision=bf16", "model.capacity_factor=1.0",
                                   "model.no_drop_fraction=0"]),
    "tiny tp 2 x ep 2, full (noisy)": (4, ["parallel.tp=2", "parallel.ep=2", "parallel.activation_checkpoint=full",
                                          "model.capacity_factor=1.0", "model.no_drop_fraction=0",
                                          "train.global_batch_size=32", "train.micro_batch_size=16"]),
    "tiny pp 2 1F1B": (2, ["parallel.pp=2"]),
    "tiny pp 2 1F1B, full": (2, ["parallel.pp=2", "parallel.activation_checkpoint=full"]),
    "tiny pp 2 1F1B x FSDP 2": (4, ["parallel.pp=2", "train.micro_batch_size=2"]),
    # weights dominate: the unsharded gradients FSDP accumulates over the pipeline's micro-batches show
    "small pp 2 x FSDP 2 (mb 1, seq 64)": (4, ["model=small", "parallel.pp=2", "train.micro_batch_size=1",
                                              "train.global_batch_size=8", "data.seq_len=64"]),
    "tiny pp 2 1F1B, bf16, selective": (2, ["parallel.pp=2", "precision=bf16",
                                            "parallel.activation_checkpoint=selective"]),
    "tiny pp 2 Interleaved1F1B x2": (2, ["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B",
                                         "parallel.pp_stages_per_rank=2", "train.micro_batch_size=4"]),
    "tiny pp 2 ZBVZeroBubble": (2, ["parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble",
                                    "parallel.pp_stages_per_rank=2", "train.micro_batch_size=4"]),
    "tiny pp 2 DualPipeV": (2, ["parallel.pp=2", "parallel.pp_schedule=DualPipeV", "parallel.pp_stages_per_rank=2",
                                "train.micro_batch_size=4"]),
}


def run(nproc: int, overrides: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["train.val_every=0", *overrides]
    cmd = [sys.executable, "-m", "launch.memcheck", *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
         "launch.memcheck", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise SystemExit(f"{overrides}: rc={proc.returncode}\n{proc.stderr[-2000:]}")
    return sorted((json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")), key=lambda r: r["rank"])


def main(argv: list[str]) -> int:
    chosen = {k: v for k, v in LAYOUTS.items() if not argv or any(a in k for a in argv)}
    print(describe(), flush=True)
    print(f"{'layout':34s} {'rank':>4s} {'measured MiB':>13s} {'planned MiB':>12s} {'planned/measured':>17s}")
    for name, (nproc, overrides) in chosen.items():
        for r in run(nproc, overrides):
            print(f"{name:34s} {r['rank']:4d} {r['measured_bytes'] / 2**20:13.1f} {r['planned_bytes'] / 2**20:12.1f} "
                  f"{r['planned_bytes'] / r['measured_bytes']:17.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
