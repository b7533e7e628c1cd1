"""One trained checkpoint evaluated in every precision recipe: the recipes' effect on the forward pass (validation
loss) and, with `--grad-batches N`, on the gradient, with training dynamics taken out (the trajectories of separate
training runs decorrelate within tens of steps, which hides effects this size; see bench/precision.py).

The run directory's newest checkpoint is copied once per recipe, loaded through the trainer (the recipe's
FP8 conversion, autocast and, on CPU, emulation as in training) and validated on the same held-out batches.

    python bench/precision_forward.py runs/small_fp32 model=small data.seq_len=256 train.global_batch_size=8 \
        train.micro_batch_size=8 train.steps=200 --grad-batches 4

The overrides must describe the run as it was trained (its model, data and batch; train.steps = the
checkpoint's step, so nothing is trained). Last line: worst_fp8_forward_vs_bf16=<max |val / bf16 val - 1|>.

Gradients: the next N training batches after the checkpoint (the same for every recipe, restored with the data
position), each through the training step's forward and backward (balance losses included; no optimizer step),
compared with fp32's gradient of the same batch: ||g - g_fp32|| / ||g_fp32|| over all parameters and per kind
of parameter, mean over the batches. The yardstick printed first is fp32 against itself on the next batch: the
difference between two batches' gradients, which training averages away.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from precision import RECIPES, fp8_native  # noqa: E402  (bench/precision.py, beside this file)
from train.config import compose_config  # noqa: E402
from train.trainer import Trainer  # noqa: E402
from machine import bf16_gemms_fast, describe  # noqa: E402  (bench/, beside this file)

KINDS = ("embed", "attention", "router", "experts", "shared", "dense_mlp", "norms", "head")


def emulation_overrides(recipe: str) -> list[str]:
    """As bench/precision.py runs the recipes: FP8 emulated without FP8 kernels; on a CPU whose bf16 GEMMs are
    slower than fp32, bf16 GEMMs computed in fp32 on the bf16 operands."""
    fp8 = ["precision.fp8_emulate=true"] if recipe.startswith("fp8") and not fp8_native() else []
    bf16 = ["precision.bf16_gemm_emulate=true"] if recipe != "fp32" and not bf16_gemms_fast() else []
    return fp8 + bf16


def kind(name: str) -> str:
    """The kind of parameter, for the per-kind gradient errors."""
    checks = (("embed_tokens", "embed"), ("lm_head", "head"), ("norm", "norms"), ("mlp.gate.", "router"),
              ("shared_experts", "shared"), ("experts", "experts"), ("self_attn", "attention"), ("mlp", "dense_mlp"))
    return next((k for key, k in checks if key in name), "other")


def batch_gradients(trainer: Trainer, n: int) -> list[dict[str, torch.Tensor]]:
    """fp32 copies of every parameter's gradient, for each of the next `n` training batches; weights unchanged."""
    grads = []
    for _ in range(n):
        step = trainer.step_fn
        with step.gemm_mode():
            step.accumulate(step.sequence_part(trainer.rt.loader.next_batch()), trainer.step)
        grads.append({name: p.grad.detach().float().clone() for name, p in trainer.rt.parts[0].named_parameters()
                      if p.grad is not None})
        trainer.rt.optimizers.zero_grad()
    return grads


def relative_errors(grad: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """||grad - ref|| / ||ref|| over all parameters and over each kind."""
    err, norm = {}, {}
    for name, r in ref.items():
        for k in ("all", kind(name)):
            err[k] = err.get(k, 0.0) + (grad[name] - r).pow(2).sum().item()
            norm[k] = norm.get(k, 0.0) + r.pow(2).sum().item()
    return {k: (err[k] / norm[k]) ** 0.5 for k in err if norm[k] > 0}


def measure(run_dir: Path, recipe: str, overrides: list[str], scratch: Path, grad_batches: int):
    """(validation loss, per-batch gradients) of the checkpoint in one recipe."""
    out = scratch / recipe
    shutil.copytree(run_dir / "checkpoints", out / "checkpoints")
    cfg = compose_config([*overrides, f"output_dir={out}", f"precision={recipe}", *emulation_overrides(recipe)])
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        if trainer.step != cfg.train.steps:
            raise SystemExit(f"the checkpoint is at step {trainer.step}; pass train.steps={trainer.step}")
        trainer.validator(trainer.step)
        grads = batch_gradients(trainer, grad_batches)
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1], grads


def mean_errors(grads: list[dict], refs: list[dict]) -> dict[str, float]:
    per_batch = [relative_errors(g, r) for g, r in zip(grads, refs)]
    return {k: sum(e[k] for e in per_batch) / len(per_batch) for k in per_batch[0]}


def print_gradient_errors(errors: dict[str, dict[str, float]]) -> None:
    kinds = ["all", *(k for k in KINDS if k in next(iter(errors.values())))]
    print("gradient vs fp32, ||g - g_fp32|| / ||g_fp32||, mean over batches (%):")
    print(f"{'':28s}" + "".join(f"{k:>10s}" for k in kinds))
    for label, e in errors.items():
        print(f"{label:28s}" + "".join(f"{100 * e[k]:10.3f}" for k in kinds))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a training run's output_dir (with checkpoints/)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of that run (model, data, batch, train.steps)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--grad-batches", type=int, default=0, help="also compare gradients on this many batches")
    args = p.parse_args()
    print(describe(), flush=True)
    recipes = (["fp32"] if args.grad_batches and "fp32" not in args.recipes else []) + args.recipes
    with tempfile.TemporaryDirectory() as scratch:
        runs = {r: measure(args.run_dir, r, args.overrides, Path(scratch), args.grad_batches) for r in recipes}
    val = {r: v for r, (v, _) in runs.items() if r in args.recipes}
    ref = val.get("bf16", val[args.recipes[0]])
    for recipe, v in val.items():
        print(f"{recipe:15s} val {v:.5f}  vs bf16 {100 * (v / ref - 1):+.3f}%")
    if args.grad_batches:
        fp32 = runs["fp32"][1]
        errors = {"fp32, next batch (yardstick)": mean_errors(fp32[1:], fp32[:-1])} if len(fp32) > 1 else {}
        errors.update({r: mean_errors(g, fp32) for r, (_, g) in runs.items() if r != "fp32"})
        print_gradient_errors(errors)
    worst = max((abs(v / ref - 1) for r, v in val.items() if r.startswith("fp8")), default=float("nan"))
    print(f"worst_fp8_forward_vs_bf16={worst:.5f}")


if __name__ == "__main__":
    main()
