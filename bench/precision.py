"""Step time, peak memory and loss of each precision recipe, side by side in one run.

Each recipe trains the same model on the same data from the same seed through the real entry point
(`python -m train`, one fresh process per recipe, so peak memory is that recipe's own). Printed per recipe:
median step time after the first `--skip` steps, tokens/s, peak memory (GPU: max allocated; CPU: peak RSS of
the process), the final training loss (mean of the last 10 steps), the mean training loss of the second half
of the run, the final validation loss, and the ratios against bf16 (fp32 when bf16 is not run).
Last line: worst_fp8_val_loss_vs_bf16=<max over FP8 recipes of
|val / bf16 val - 1|>.

With several `--seeds` every recipe runs once per seed (the seed sets the initial weights and the data order)
and the comparison is paired: per seed, val(recipe) / val(reference) - 1, then the mean over the seeds and the
standard error of that mean. One run cannot resolve 1%: after 200 steps of a small model, one recipe on two
seeds, or two precisions on one seed, end several percent apart (top-k routing is discontinuous, so
trajectories decorrelate early). The mean over seeds, with its error, is the number to read. DeepSeek's
initializer_range 0.006 (for width 5,120) made that spread several times larger on `tiny` than 0.02 does, which
`tiny` and `small` have used since (bench/RESULTS.md, 2026-12-04).

    python bench/precision.py                                   # timing: small preset, 12 steps
    python bench/precision.py --steps 200 --seeds 0 1 2         # convergence (issue 5: FP8 within 1% of bf16):
                                                                # every recipe on each seed, paired by seed
    python bench/precision.py --set model=deepseek_v2_lite model.num_hidden_layers=4 ...   # on a GPU
    python bench/precision.py --init-from runs/x --steps 220 ...   # every recipe continues one trained run's
                                                                # checkpoint (step 200) for 20 steps: a short
                                                                # horizon, before trajectories decorrelate

On a machine without FP8 kernels (any CPU) the FP8 recipes run emulated (`precision.fp8_emulate=true`):
their loss is the real recipe's, their speed is not (quantize -> dequantize around high-precision GEMMs).
CPUs without bf16 units (AVX2 only) run torch's bf16 GEMMs very slowly (the `small` preset: 22 tok/s in bf16
against 349 tok/s with emulated bf16 GEMMs on a 2-core AMD Zen 3), so on such a CPU (bf16 GEMMs measured slower
than fp32 at start, bench/machine.py) every bf16 run computes its GEMMs in fp32 on the bf16 operands and rounds
the result to bf16 (`precision.bf16_gemm_emulate=true`, train/precision.py): the numbers of a bf16 GEMM with
fp32 accumulation, at fp32 speed. `--native-bf16-gemms` forces native bf16. With AMX or AVX512-BF16, bf16 GEMMs
are faster than fp32 and run natively.
    python bench/precision.py --steps 200 --batch 8 --seq-len 128 --recipes bf16 fp8_tensorwise fp8_rowwise \
        fp8_blockwise --seeds 0 1 --jobs 2                     # issue 5's check on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from machine import bf16_gemms_fast, describe  # noqa: E402  (bench/, beside this file)

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("fp32", "bf16", "fp8_tensorwise", "fp8_rowwise", "fp8_blockwise")


def fp8_native() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def run_recipe(recipe: str, args, out: Path) -> list[dict] | None:
    cmd = [sys.executable, "-m", "train", f"precision={recipe}", f"model={args.preset}", f"train.steps={args.steps}",
           f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
           f"data.seq_len={args.seq_len}", f"train.val_every={args.val_every}", "log.every=1",
           "checkpoint.every=0", f"output_dir={out}", f"checkpoint.load={args.init_from is not None}".lower(),
           *args.set]
    if args.init_from is not None:  # every recipe continues the same trained model (and data position)
        shutil.copytree(args.init_from / "checkpoints", out / "checkpoints")
        cmd.append("checkpoint.allow_changes=[precision]")  # a resume in another precision is the point here
    if recipe.startswith("fp8") and not fp8_native():
        cmd.append("precision.fp8_emulate=true")
    if emulate_bf16_gemms(recipe, args):
        cmd.append("precision.bf16_gemm_emulate=true")
    env = dict(os.environ)
    if args.jobs > 1:  # concurrent CPU runs: split the cores so the runs do not oversubscribe them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # e.g. a recipe this GPU cannot run: say why, and let the other recipes finish
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"{recipe:15s} FAILED (rc={proc.returncode}): {last[:300]}", flush=True)
        return None
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def emulate_bf16_gemms(recipe: str, args) -> bool:
    """On a CPU whose native bf16 GEMMs are slower than fp32 (no AMX or AVX512-BF16: `machine.bf16_gemms_fast`),
    bf16 runs compute their GEMMs in fp32 on the bf16 operands (train/precision.py), unless --native-bf16-gemms
    or a param_dtype override other than bfloat16. Where bf16 is fast, bf16 runs natively."""
    if bf16_gemms_fast() or args.native_bf16_gemms or recipe == "fp32":
        return False
    dtypes = [s.split("=", 1)[1] for s in args.set if s.startswith("precision.param_dtype=")]
    return not dtypes or dtypes[-1] == "bfloat16"


def summarize(rows: list[dict], skip: int) -> dict:
    steps = [r for r in rows if "loss" in r]
    timed_rows = steps[skip:] or steps
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    return {"step_s": statistics.median(r["step_time"] for r in timed_rows),
            "tok_s": statistics.median(r["tokens_per_sec"] for r in timed_rows),
            "mfu": statistics.median(r["mfu"] for r in timed_rows),
            "peak_gb": max(r["peak_mem_gb"] for r in steps), "loss": statistics.fmean(r["loss"] for r in steps[-10:]),
            "half": statistics.fmean(r["loss"] for r in steps[len(steps) // 2:]),
            "val": vals[-1] if vals else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--val-every", type=int, default=0, help="0: validate only after the last step")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for every run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="train.seed values; every recipe runs on each, compared with the reference seed by seed")
    p.add_argument("--native-bf16-gemms", action="store_true",
                   help="on CPU, run bf16 GEMMs with torch's bf16 kernels (slow without bf16 units) instead of in fp32")
    p.add_argument("--init-from", type=Path, default=None,
                   help="a run's output_dir: every run resumes from its newest checkpoint (the model, optimizer, "
                        "schedule and data position) and trains on to --steps; with one seed only")
    p.add_argument("--keep", type=Path, default=None,
                   help="keep every run's output_dir (metrics.jsonl, TensorBoard) under this folder instead of a "
                        "temporary one")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each with cores/jobs threads (CPU convergence runs; timings then mean less)")
    args = p.parse_args()
    print(describe(), flush=True)
    args.val_every = args.val_every or args.steps
    if args.init_from is not None and len(args.seeds) > 1:
        p.error("--init-from continues one trained run: give one seed (the seed no longer sets weights or data)")
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; FP8 "
          f"{'kernels' if fp8_native() else 'emulated'}; {args.preset}, {args.steps} steps of {args.batch} x "
          f"{args.seq_len} tokens; seeds {args.seeds}; overrides {args.set or 'none'}")
    runs = [(seed, recipe) for seed in args.seeds for recipe in args.recipes]
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(args.jobs) as pool:
        tmp = args.keep or scratch
        def one(seed: int, recipe: str) -> dict | None:
            run_args = argparse.Namespace(**{**vars(args), "set": [*args.set, f"train.seed={seed}"]})
            rows = run_recipe(recipe, run_args, Path(tmp) / f"{recipe}_seed{seed}")
            if rows is None:
                return None
            r = summarize(rows, args.skip)
            print(f"{recipe:15s} seed {seed}  step {r['step_s'] * 1e3:8.1f} ms  {r['tok_s']:9,.0f} tok/s  "
                  f"MFU {100 * r['mfu']:5.1f}%  peak {r['peak_gb']:6.2f} GB  loss {r['loss']:.4f}  "
                  f"2nd-half loss {r['half']:.4f}  val {r['val']:.4f}", flush=True)
            return r
        done = dict(zip(runs, pool.map(lambda run: one(*run), runs)))
    results = {recipe: [done[seed, recipe] for seed in args.seeds] for recipe in args.recipes
               if all(done[seed, recipe] is not None for seed in args.seeds)}
    ref = "bf16" if "bf16" in results else "fp32"
    if ref in results:
        compare(results, ref)
    if len(results) < len(args.recipes):
        raise SystemExit(1)


def _mean_err(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for one value)."""
    err = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return statistics.fmean(values), err


def compare(results: dict[str, list[dict]], ref: str) -> None:
    """Each recipe against `ref`, seed by seed: speed and memory ratios, and the relative loss differences
    (mean over seeds +- standard error). Last line: the worst |mean val difference| of the FP8 recipes."""
    base = results[ref]
    worst = 0.0
    for recipe, runs in results.items():
        rel = {key: [100 * (r[key] / b[key] - 1) for r, b in zip(runs, base)] for key in ("loss", "half", "val")}
        speed = statistics.fmean(r["tok_s"] / b["tok_s"] for r, b in zip(runs, base))
        memory = statistics.fmean(r["peak_gb"] / b["peak_gb"] for r, b in zip(runs, base))
        vals = _mean_err([r["val"] for r in runs])
        text = "  ".join(f"{name} {m:+.2f}% +- {e:.2f}" for name, (m, e) in
                         (("train loss", _mean_err(rel["loss"])), ("2nd-half loss", _mean_err(rel["half"])),
                          ("val loss", _mean_err(rel["val"]))))
        print(f"{recipe:15s} vs {ref}: speed x{speed:.2f}  memory x{memory:.2f}  val {vals[0]:.4f} +- {vals[1]:.4f}  "
              f"{text}")
        if recipe.startswith("fp8"):
            worst = max(worst, abs(statistics.fmean(rel["val"])) / 100)
    print(f"worst_fp8_val_loss_vs_{ref}={worst:.4f}")


if __name__ == "__main__":
    main()
