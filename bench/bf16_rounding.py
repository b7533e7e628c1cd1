"""Which part of bf16's numerics costs loss: bf16 training (autocast) against fp32 training whose GEMMs alone
see bf16 rounding, every run the same model, data and seed, side by side.

Variants (each `--seeds` entry trains every variant once; the comparison is paired by seed, against fp32):
  fp32        the fp32 run
  bf16        `precision=bf16` (autocast; on CPU its GEMMs computed in fp32 on the bf16 operands, as
              bench/precision.py runs it)
  gemm_in     fp32, but every GEMM (forward, dgrad, wgrad, grouped, bmm) rounds its operands to bf16 first
  gemm_inout  as gemm_in, and rounds the GEMM's result to bf16 too: bf16 GEMMs with bf16 outputs, while
              norms, activations, softmax, rotary and every elementwise op and their gradients stay fp32

    python bench/bf16_rounding.py --preset tiny --steps 200 --batch 16 --seq-len 256 --seeds 0 1 2 --jobs 2

bench/RESULTS.md has nine seeds: bf16 and gemm_inout end equally far above fp32 (+1.3% and +1.5%, each +- 1.0).
On a CPU whose bf16 GEMMs are slower than fp32 (bench/machine.py) the bf16 variant computes its GEMMs in fp32 on the
bf16 operands (`precision.bf16_gemm_emulate`); with AMX or AVX512-BF16 it runs native bf16.

Last line: bf16_vs_fp32=<mean %> gemm_inout_vs_fp32=<mean %> (step-`--steps` validation loss, paired by seed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from precision_forward import emulation_overrides  # noqa: E402  (bench/, beside this file)
from train.config import compose_config  # noqa: E402
from train.precision import GEMMS  # noqa: E402
from train.trainer import Trainer  # noqa: E402
from machine import describe  # noqa: E402  (bench/, beside this file)

VARIANTS = ("fp32", "bf16", "gemm_in", "gemm_inout")


def _round(x):
    return x.to(torch.bfloat16).float() if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x


class GemmRounding(TorchDispatchMode):
    """fp32 GEMMs on bf16-rounded operands; with `outputs`, the result rounded to bf16 as well."""

    def __init__(self, outputs: bool):
        super().__init__()
        self.outputs = outputs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in GEMMS:
            return func(*args, **(kwargs or {}))
        out = func(*[_round(a) for a in args], **(kwargs or {}))
        return _round(out) if self.outputs else out


def train_one(variant: str, seed: int, args, out: Path) -> float:
    """The run's last validation loss (in this process: the rounding mode wraps the trainer's steps)."""
    recipe = "bf16" if variant == "bf16" else "fp32"
    precision = [f"precision={recipe}", *emulation_overrides(recipe)]  # as bench/precision.py runs the recipe
    cfg = compose_config([f"model={args.preset}", f"train.steps={args.steps}", f"train.global_batch_size={args.batch}",
                          f"train.micro_batch_size={args.batch}", f"data.seq_len={args.seq_len}", f"train.seed={seed}",
                          "checkpoint.every=0", "checkpoint.load=false", f"output_dir={out}", *precision])
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        if variant.startswith("gemm"):  # the GEMM mode every step and validation of the run enters
            trainer.step_fn.gemm_mode = lambda: GemmRounding(outputs=variant == "gemm_inout")
        trainer.run()
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def spawn(variant: str, seed: int, args, scratch: Path) -> float:
    """One run in a fresh process (its own threads when runs share the CPU)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.jobs)))
    cmd = [sys.executable, __file__, "--one", variant, str(seed), "--preset", args.preset, "--steps", str(args.steps),
           "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--out", str(scratch / f"{variant}_{seed}")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(train_one(args.one[0], int(args.one[1]), args, args.out))
        return
    print(describe(), flush=True)
    if "fp32" not in args.variants:
        raise SystemExit("--variants must include fp32 (the reference)")
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(args.jobs) as pool:
        losses = dict(zip(jobs, pool.map(lambda j: spawn(*j, args, Path(scratch)), jobs)))
    summary = {}
    for v in args.variants:
        vals = [losses[v, s] for s in args.seeds]
        rel = [100 * (losses[v, s] / losses["fp32", s] - 1) for s in args.seeds]
        err = statistics.stdev(rel) / len(rel) ** 0.5 if len(rel) > 1 else float("nan")
        summary[v] = statistics.mean(rel)
        print(f"{v:11s} val {' '.join(f'{x:.4f}' for x in vals)}  mean {statistics.mean(vals):.4f}  "
              f"vs fp32 {' '.join(f'{r:+.2f}' for r in rel)} %  mean {summary[v]:+.2f}% +- {err:.2f}")
    print(" ".join(f"{v}_vs_fp32={summary[v]:+.2f}" for v in args.variants if v != "fp32"))


if __name__ == "__main__":
    main()
