"""Measure a configuration's peak tensor memory on CPU and set it beside the planner's estimate.

    python -m launch.memcheck model=small train.micro_batch_size=4            # one process
    torchrun --standalone --nproc-per-node 4 -m launch.memcheck parallel.ep=2 # a layout, every rank

Builds the runtime as `python -m train` does (train/runtime.py), in a temporary output_dir unless one is given
(no checkpoint, no validation), runs `--steps` (default 3) optimizer steps under torch's profiler memory accounting,
and prints one line per rank: the peak of live tensor bytes allocated through torch's CPU allocator since
the process began building the model (weights, gradients, optimizer states, activations, communication
buffers), the planner's estimate for that rank, and their ratio. This is how the planner is checked against
reality (tests/test_plan.py); on GPUs, `memory/peak_gb` in the run's metrics is the measured number.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from torch.profiler import ProfilerActivity, profile

from train.config import compose_config
from train.config import ConfigError
from train.env import rank_env, ranks_per_host


def peak_allocated(prof) -> int:
    """Peak of the bytes of live CPU allocations the profiler saw (by address, in time order).

    The allocator's own 'Total Allocated' counter is not used: frees that happen on a thread the profiler does
    not follow (gloo's workers dropping the last reference to a collective's tensor) never reach it, so it
    drifts upwards in distributed runs. An address that is handed out again was freed, whoever freed it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = sorted((e["ts"], e["args"]["Addr"], e["args"]["Bytes"]) for e in events
                    if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    live: dict[int, int] = {}
    now = peak = 0
    for _, addr, nbytes in memory:
        now -= live.pop(addr, 0)
        if nbytes > 0:
            live[addr] = nbytes
            now += nbytes
        peak = max(peak, now)
    return peak


def measure(cfg, steps: int) -> tuple[int, int]:
    """(rank, peak bytes) of `steps` training steps of `cfg` on this process."""
    import torch.distributed as dist

    from train.runtime import build_runtime
    from train.step import Step

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        try:
            rt = build_runtime(cfg)
            step = Step(rt)
            for i in range(steps):
                step(step.sequence_part(rt.loader.next_batch()), i)
            rank = rt.env.rank
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return rank, peak_allocated(prof)


def main(argv: list[str]) -> int:
    steps = 3
    if argv and argv[0].startswith("--steps="):
        steps, argv = int(argv[0].split("=", 1)[1]), argv[1:]
    from launch.plan.memory import rank_memory

    with tempfile.TemporaryDirectory() as tmp:
        given = any(a.startswith("output_dir=") for a in argv)
        try:
            # a stated peak skips the trainer's CPU GEMM benchmark (an MFU denominator, not training memory)
            cfg = compose_config(["train.peak_tflops=1.0", *argv, "checkpoint.load=false"]
                                 + ([] if given else [f"output_dir={tmp}"]))
            world = rank_env(os.environ).world
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        rank, peak = measure(cfg, steps)
    planned = rank_memory(cfg, world, rank, ranks_per_host=ranks_per_host(os.environ))
    row = json.dumps({"rank": rank, "measured_bytes": peak, "planned_bytes": planned.total,
                      "ratio": planned.total / peak if peak else None, "planned": planned.as_dict()})
    os.write(sys.stdout.fileno(), (row + "\n").encode())  # one write: ranks sharing a pipe never interleave
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
