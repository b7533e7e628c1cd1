"""Muon against AdamW on the built-in corpus, each at a small learning-rate sweep, side by side in one run.

Every (optimizer, lr, seed) trains the same model on the same data through the real entry point (`python -m train`,
one fresh process each), validating every `--val-every` steps. Per optimizer the best lr is the one with the lowest
final validation loss (mean over seeds); the target is AdamW's best final validation loss, and the number to read
is the steps Muon (at its best lr) takes to reach it, as a fraction of the run (issue 42: at most 0.7), the first
validation step at or below the target, linearly interpolated between validation points. Also printed: median step
time after the first 5 steps and peak memory (CPU: the process's peak RSS; GPU: max allocated) at each best lr, and,
with `--qk-clip-tau` or `--qk-clip-frac`, Muon's best lr again without and with QK-clip: the largest logit over
the run each time, and the final validation loss the clip costs.

    python bench/muon.py                                  # tiny, 300 steps, lrs 1e-3 3e-3 1e-2, seed 0
    python bench/muon.py --qk-clip-frac 0.5 --seeds 0 1 2  # + QK-clip at half the unclipped run's largest logit
    python bench/muon.py --preset small --steps 300 --batch 8 --seq-len 128
    python bench/muon.py --preset small --steps 200 --muon-set optim.muon_ns_dtype=bfloat16  # bf16 Newton-Schulz
    python bench/muon.py --preset small --optimizer-step --threads 2  # the optimizer step alone, AdamW and Muon
    python bench/muon.py --preset small --steps 200 --qk-clip-lr 3e-3 --qk-clip-frac 0.5  # QK-clip only, no sweep
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
from contextlib import nullcontext
from pathlib import Path

from machine import describe  # noqa: E402  (bench/, beside this file)

ROOT = Path(__file__).resolve().parent.parent


def run(out: Path, args, optim: str, lr: float, seed: int, tau: float | None = None) -> list[dict]:
    """One training run's metrics.jsonl rows."""
    over = [f"model={args.preset}", f"optim={optim}", f"optim.lr={lr}", f"train.steps={args.steps}",
            f"train.seed={seed}", f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
            f"data.seq_len={args.seq_len}", f"train.val_every={args.val_every}", "log.every=1",
            "checkpoint.every=0", f"output_dir={out}", "train.peak_tflops=1.0", *args.set,
            *(args.muon_set if optim == "muon" else [])]
    if tau is not None:
        over.append(f"optim.qk_clip_tau={tau}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, "-m", "train", *over], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{optim} lr={lr} seed={seed}: rc={proc.returncode}: {proc.stderr.strip()[-500:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def val_curve(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def mean_curve(runs: list[list[dict]]) -> dict[int, float]:
    curves = [val_curve(r) for r in runs]
    return {s: statistics.fmean(c[s] for c in curves) for s in curves[0]}


def steps_to(curve: dict[int, float], target: float) -> float | None:
    """The first step at which the validation curve reaches `target`, interpolated; None: never."""
    prev = None
    for step in sorted(curve):
        if curve[step] <= target:
            if prev is None:
                return float(step)
            s0, v0 = prev
            return s0 + (step - s0) * (v0 - target) / (v0 - curve[step])
        prev = (step, curve[step])
    return None


def summary(runs: list[list[dict]], key: str, skip: int = 5) -> float:
    """Median over seeds of a run's median `key` after the first `skip` steps (step_time), or its max; a run of
    `skip` steps or fewer counts all of them."""
    per_run = []
    for rows in runs:
        vals = [r[key] for r in rows if key in r and r["step"] > skip] or [r[key] for r in rows if key in r]
        per_run.append(statistics.median(vals) if key == "step_time" else max(vals))
    return statistics.median(per_run)


def sweep(args, tmp: Path) -> dict[tuple[str, float], list[list[dict]]]:
    jobs = [(o, lr, s) for o, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs)) for lr in lrs
            for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda j: run(tmp / f"{j[0]}_{j[1]}_{j[2]}", args, *j), jobs))
    out: dict[tuple[str, float], list[list[dict]]] = {}
    for (o, lr, _), rows in zip(jobs, done):
        out.setdefault((o, lr), []).append(rows)
    return out


def report(args, results: dict, tmp: Path) -> None:
    finals = {key: curve[max(curve)] for key, runs in results.items() for curve in [mean_curve(runs)]}
    for (o, lr), v in sorted(finals.items()):
        print(f"{o:6s} lr={lr:<8g} final val_loss {v:.4f}")
    best = {o: min((k for k in finals if k[0] == o), key=finals.get) for o in ("adamw", "muon")}
    target = finals[best["adamw"]]
    reach = steps_to(mean_curve(results[best["muon"]]), target)
    for o, key in best.items():
        runs = results[key]
        print(f"best {o}: lr={key[1]:g} val {finals[key]:.4f} | step {summary(runs, 'step_time') * 1e3:.1f} ms | "
              f"peak memory {summary(runs, 'peak_mem_gb'):.3f} GB")
    frac = "never" if reach is None else f"{reach:.0f} steps = {reach / args.steps:.2f}x"
    print(f"muon_steps_to_adamw_final_val={frac} (target {target:.4f}, adamw's {args.steps} steps)")
    if args.qk_clip_tau or args.qk_clip_frac:
        qk_clip(args, best["muon"][1], tmp, finals[best["muon"]])


def qk_clip(args, lr: float, tmp: Path, unclipped_val: float | None = None) -> None:
    """Muon at `lr` without QK-clip (tau 1e9: measured, never clipped), then with tau = --qk-clip-frac x that run's
    largest logit (or --qk-clip-tau): largest logit over the run, final validation loss against `unclipped_val` (the
    sweep's, or else the unclipped run's)."""
    tau = 1e9
    for label in ("off", "on"):
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(lambda s: run(tmp / f"clip_{label}_{s}", args, "muon", lr, s, tau), args.seeds))
        top = max(r["max_logit"] for rows in runs for r in rows if "max_logit" in r)
        val = mean_curve(runs)
        unclipped_val = unclipped_val or val[max(val)]
        print(f"muon lr={lr:g} qk-clip {label} (tau {tau:g}): largest logit over the run {top:.3f} | final val "
              f"{val[max(val)]:.4f} ({val[max(val)] / unclipped_val - 1:+.2%} vs unclipped)")
        tau = args.qk_clip_tau or args.qk_clip_frac * top


def optimizer_steps(args) -> None:
    """The optimizer step alone on `--preset`'s model, random gradients: AdamW (torch's fused), Muon with Newton-
    Schulz in fp32 and in bf16, one step of each in turn, median of 5 after one warm-up each; also Newton-Schulz's
    FLOPs a step (5 (4 m^2 n + 2 m^3) per m x n matrix, m <= n) and the rate they ran at."""
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from model import Transformer
    from train.config import compose_config
    from train.muon import muon_param_groups
    from train.optim import build_optimizer

    torch.set_num_threads(args.threads)
    kinds = {"adamw": ["optim=adamw"], "muon fp32": ["optim=muon", "optim.muon_ns_dtype=float32"],
             "muon bf16": ["optim=muon", "optim.muon_ns_dtype=bfloat16"]}
    steps = {}
    for name, over in kinds.items():
        cfg = compose_config([f"model={args.preset}", *over])
        model = Transformer(cfg.model)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        steps[name] = build_optimizer(model, cfg.optim).step
    times = {name: [] for name in steps}
    for _ in range(6):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    flops = 0.0
    for group in muon_param_groups(model, cfg.optim):
        for p in group["params"] if group.get("muon") else []:
            rows = p.shape[-2] // 2 if group.get("split") else p.shape[-2]
            m, n = sorted((rows, p.shape[-1]))
            flops += p[..., 0, 0].numel() * (2 if group.get("split") else 1) * 5 * (4 * m * m * n + 2 * m ** 3)
    median = {name: statistics.median(t[1:]) for name, t in times.items()}
    print(f"{args.preset}, {args.threads} threads, optimizer step alone (median of 5): " + ", ".join(
        f"{name} {sec * 1e3:.1f} ms" for name, sec in median.items()))
    print(f"Newton-Schulz {flops / 1e9:.1f} GFLOP a step: {flops / median['muon fp32'] / 1e9:.0f} GFLOP/s in fp32, "
          f"{flops / median['muon bf16'] / 1e9:.0f} GFLOP/s in bf16 (the whole Muon step's time)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--val-every", type=int, default=10)
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--muon-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--qk-clip-tau", type=float, default=None, help="QK-clip runs at this tau")
    p.add_argument("--qk-clip-frac", type=float, default=None, help="QK-clip runs at this fraction of the largest "
                   "logit of the unclipped run")
    p.add_argument("--qk-clip-lr", type=float, default=None, help="no sweep: only the QK-clip runs, Muon at this lr")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per run")
    p.add_argument("--set", nargs="*", default=[], help="more overrides for every run")
    p.add_argument("--muon-set", nargs="*", default=[], help="more overrides for Muon's runs, e.g. "
                   "optim.muon_ns_dtype=bfloat16")
    p.add_argument("--optimizer-step", action="store_true", help="time the optimizer step alone (no training)")
    p.add_argument("--keep", help="the runs' directories (config, metrics) go here, kept; default: a temporary one")
    args = p.parse_args()
    print(describe())
    if args.optimizer_step:
        return optimizer_steps(args)
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    with nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory() as out:
        if args.qk_clip_lr:
            qk_clip(args, args.qk_clip_lr, Path(out))
        else:
            report(args, sweep(args, Path(out)), Path(out))


if __name__ == "__main__":
    main()
