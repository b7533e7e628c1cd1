"""Every FP8 GEMM this product runs, real kernel against our emulation and against bf16, on the same operands:
the first thing to run on a GPU (issue 5). One line per recipe and GEMM:

    dense    a linear y = x W^T  (torchao Float8Linear for tensorwise/rowwise, torchao's blockwise linear)
    experts  the routed experts' grouped GEMM over tokens sorted by expert (torchao's rowwise or blockwise)

with the relative difference of y, dx and dW between the real kernel and `precision.fp8_emulate=true`
(different accumulation order and, for torchao's own scaling, possibly other scales: expect a few 1e-3 at most),
the relative error of the real kernel against the bf16 GEMM (expect 2-6%, the FP8 rounding of two operands),
and the time of forward + backward against bf16.

    python bench/fp8_kernels.py                       # DeepSeek-V2-Lite shapes: 8192 tokens, 2048 -> 1408, 64 experts
    python bench/fp8_kernels.py --tokens 4096 --dim 5120 --hidden 1536 --experts 160    # DeepSeek-V2

On a CPU only torchao's dense tensorwise/rowwise path is real (torch._scaled_mm has a CPU kernel; FP8 there is
not faster); the other GEMMs print why they cannot run. Last line: worst_real_vs_emulated=<max relative difference>.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parallel.fp8 import RECIPES, Fp8Recipe, convert_to_fp8, fp8_grouped_gemm  # noqa: E402
from machine import describe  # noqa: E402  (bench/, beside this file)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of fn() after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def dense_gemm(recipe: str | None, emulate: bool, weight: torch.Tensor):
    """x -> (y, dx, dW) of a linear with fp32 master `weight` under bf16 autocast, as the trainer runs it."""
    linear = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device))
    linear[0].weight.data.copy_(weight)
    if recipe is not None:
        convert_to_fp8(linear, Fp8Recipe(recipe, emulate=emulate))

    def run(x: torch.Tensor, g: torch.Tensor):
        x = x.detach().requires_grad_()
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            y = linear(x)
        dx, dw = torch.autograd.grad(y, (x, linear[0].weight), g)
        return y, dx, dw
    return run


def expert_gemm(recipe: str | None, emulate: bool):
    """(x, w, offs) -> (y, dx, dW) of the grouped GEMM in bf16."""
    op = None if recipe is None else fp8_grouped_gemm(Fp8Recipe(recipe, emulate=emulate))

    def run(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, g: torch.Tensor):
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        y = torch._grouped_mm(x, w, offs=offs) if op is None else op(x, w, offs)
        dx, dw = torch.autograd.grad(y, (x, w), g)
        return y, dx, dw
    return run


def compare(name: str, recipe: str, make, args: tuple, device, repeat: int, worst: list[float]) -> None:
    reference = make(None, False)
    try:
        real = make(recipe, False)
        got = real(*args)
    except Exception as e:  # noqa: BLE001  (a missing kernel: say which and go on)
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:140]}"
        print(f"{recipe:10s} {name:8s} real kernel unavailable here: {why}")
        return
    want, ref = make(recipe, True)(*args), reference(*args)
    diffs = [rel(a, b) for a, b in zip(got, want)]
    errors = [rel(a, b) for a, b in zip(got, ref)]
    t_real, t_bf16 = timed(lambda: real(*args), device, repeat), timed(lambda: reference(*args), device, repeat)
    worst.append(max(diffs))
    print(f"{recipe:10s} {name:8s} real vs emulated y/dx/dW {diffs[0]:.1e} {diffs[1]:.1e} {diffs[2]:.1e}   "
          f"vs bf16 {errors[0]:.3f} {errors[1]:.3f} {errors[2]:.3f}   fwd+bwd {t_real * 1e3:8.2f} ms, "
          f"bf16 {t_bf16 * 1e3:8.2f} ms: FP8 speedup x{t_bf16 / t_real:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1408)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    args = p.parse_args()
    print(describe(), flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"{args.tokens} tokens, dense {args.dim} -> {args.hidden}, {args.experts} experts x top-{args.top_k}")
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    x = randn(args.tokens, args.dim)
    dense_args = (x, randn(args.tokens, args.hidden))
    weight = randn(args.hidden, args.dim, scale=0.02)
    rows = args.tokens * args.top_k  # (token, expert) assignments, uneven over the experts
    share = torch.rand(args.experts, generator=gen) + 0.2
    counts = (share / share.sum() * rows).floor().long()
    counts[-1] += rows - counts.sum()
    offs = counts.cumsum(0).to(torch.int32).to(device)
    grouped_args = (randn(rows, args.dim).bfloat16(), randn(args.experts, args.dim, args.hidden, scale=0.02).bfloat16(),
                    offs, randn(rows, args.hidden).bfloat16())
    worst: list[float] = []
    for recipe in args.recipes:
        compare("dense", recipe, lambda r, e: dense_gemm(r, e, weight), dense_args, device, args.repeat, worst)
        compare("experts", recipe, expert_gemm, grouped_args, device, args.repeat, worst)
    print(f"worst_real_vs_emulated={max(worst) if worst else float('nan'):.2e}")


if __name__ == "__main__":
    main()
