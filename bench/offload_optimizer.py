"""Optimizer step time on CPU, the work `parallel.cpu_offload=true` moves to the host: DeepSpeed's vectorized
DeepSpeedCPUAdam (train/cpu_adam.py's OffloadAdamW, AdamW mode), torch's fused AdamW and torch's foreach AdamW.

Parameters are fp32 matrices of 4,096 x 4,096 (the last one smaller) adding up to each size, with fp32
gradients; weight decay on. One optimizer exists at a time (parameters, gradients and two moments: 16 bytes per
parameter), timed over --steps steps after one untimed step (the one that creates the states). The first use of
DeepSpeedCPUAdam builds its C++ op (cached in ~/.cache/torch_extensions); its load time is printed.

    python bench/offload_optimizer.py [--params 60e6 1e9] [--steps 3]
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


def step_times(name: str, n: float, steps: int) -> list[float]:
    params = make_params(n)
    opt = build(name, params)
    opt.step()  # creates the moments
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, nargs="+", default=[60e6, 1e9])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    t = time.perf_counter()
    from train.cpu_adam import cpu_adam_problem
    problem = cpu_adam_problem()
    print(f"DeepSpeedCPUAdam op: {'unusable: ' + problem if problem else 'loaded'} in {time.perf_counter() - t:.1f} s "
          f"({torch.get_num_threads()} threads)")
    names = (["DeepSpeedCPUAdam"] if problem is None else []) + ["torch fused", "torch foreach"]
    first = None
    for n in args.params:
        row = {}
        for name in names:
            times, others = others_cpu_share(lambda: step_times(name, n, args.steps))
            row[name] = statistics.median(times)
            print(f"{n / 1e6:7.0f}M params  {name:17s} {row[name] * 1e3:9.1f} ms/step (median of {args.steps}; "
                  f"other processes used {others:.0%} of the CPU meanwhile)", flush=True)
        first = first or row
    if "DeepSpeedCPUAdam" in first:
        print(f"cpu_adam_vs_fused={first['torch fused'] / first['DeepSpeedCPUAdam']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
