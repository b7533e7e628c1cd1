"""Optimizer step time on CPU, the work `parallel.cpu_offload=true` moves to the host: DeepSpeed's vectorized
DeepSpeedCPUAdam (train/cpu_adam.py's OffloadAdamW, AdamW mode), torch's fused AdamW and torch's foreach AdamW.

Parameters are fp32 matrices of 4,096 x 4,096 (the last one smaller) adding up to each size, with fp32
gradients; weight decay on. The three optimizers exist side by side, each on its own copy (parameters, gradients,
two moments: 16 bytes per parameter, 48 for the three), and are stepped in turn, the order rotating every round, so
that the load of other processes on a shared machine falls on all alike; --steps timed rounds follow one untimed
round (the one that creates the states). The first use of
DeepSpeedCPUAdam builds its C++ op (cached in ~/.cache/torch_extensions); its load time is printed.

    python bench/offload_optimizer.py [--params 60e6 1e9] [--steps 5]
Last line: cpu_adam_vs_fused=<fused step time / DeepSpeedCPUAdam step time> at the first size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_step import others_cpu_share  # noqa: E402
from machine import describe  # noqa: E402  (bench/, beside this file)

SIDE = 4096


def make_params(n: float) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params, left = [], int(n)
    while left > 0:
        rows = min(SIDE, -(-left // SIDE))
        p = torch.nn.Parameter(torch.randn(rows, SIDE, generator=gen) * 0.02)
        p.grad = torch.randn(rows, SIDE, generator=gen) * 1e-3
        params.append(p)
        left -= rows * SIDE
    return params


def build(name: str, params):
    kwargs = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    if name == "DeepSpeedCPUAdam":
        from train.cpu_adam import OffloadAdamW
        return OffloadAdamW(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs, **({"fused": True} if name == "torch fused" else {"foreach": True}))


def step_times(names: list[str], n: float, steps: int) -> dict[str, list[float]]:
    opts = {name: build(name, make_params(n)) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(steps + 1):  # round 0 creates the moments
        for name in names[i % len(names):] + names[:i % len(names)]:
            t = time.perf_counter()
            opts[name].step()
            if i:
                times[name].append(time.perf_counter() - t)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, nargs="+", default=[60e6, 1e9])
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    print(describe(), flush=True)
    t = time.perf_counter()
    from train.cpu_adam import cpu_adam_problem
    problem = cpu_adam_problem()
    print(f"DeepSpeedCPUAdam op: {'unusable: ' + problem if problem else 'loaded'} in {time.perf_counter() - t:.1f} s "
          f"({torch.get_num_threads()} threads)")
    names = (["DeepSpeedCPUAdam"] if problem is None else []) + ["torch fused", "torch foreach"]
    first = None
    for n in args.params:
        times, others = others_cpu_share(lambda: step_times(names, n, args.steps))
        row = {name: statistics.median(t) for name, t in times.items()}
        for name in names:
            print(f"{n / 1e6:7.0f}M params  {name:17s} {row[name] * 1e3:9.1f} ms/step (median of {args.steps})")
        print(f"other processes used {others:.0%} of the CPU meanwhile", flush=True)
        first = first or row
    if "DeepSpeedCPUAdam" in first:
        print(f"cpu_adam_vs_fused={first['torch fused'] / first['DeepSpeedCPUAdam']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
