"""Validation loss of ONE trained checkpoint evaluated in every precision recipe: the recipes' effect on the
forward pass alone, with training dynamics taken out (the trajectories of separate training runs decorrelate
within tens of steps, which hides effects this size; see bench/precision.py).

The run directory's newest checkpoint is copied once per recipe, loaded through the trainer (the recipe's
FP8 conversion, autocast and, on CPU, emulation as in training) and validated on the same held-out batches.

    python bench/precision_forward.py runs/small_fp32 model=small data.seq_len=256 train.global_batch_size=8 \
        train.micro_batch_size=8 train.steps=200

The overrides must describe the run as it was trained (its model, data and batch; train.steps = the
checkpoint's step, so nothing is trained). Last line: worst_fp8_forward_vs_bf16=<max |val / bf16 val - 1|>.
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
from train.__main__ import compose_config  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def emulation_overrides(recipe: str) -> list[str]:
    """As bench/precision.py runs the recipes: FP8 emulated without FP8 kernels; on a CPU, bf16 GEMMs computed
    in fp32 on the bf16 operands."""
    fp8 = ["precision.fp8_emulate=true"] if recipe.startswith("fp8") and not fp8_native() else []
    bf16 = ["precision.bf16_gemm_emulate=true"] if recipe != "fp32" and not torch.cuda.is_available() else []
    return fp8 + bf16


def forward_val_loss(run_dir: Path, recipe: str, overrides: list[str], scratch: Path) -> float:
    out = scratch / recipe
    shutil.copytree(run_dir / "checkpoints", out / "checkpoints")
    cfg = compose_config([*overrides, f"output_dir={out}", f"precision={recipe}", *emulation_overrides(recipe)])
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        if trainer.step != cfg.train.steps:
            raise SystemExit(f"the checkpoint is at step {trainer.step}; pass train.steps={trainer.step}")
        trainer._validate()
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a training run's output_dir (with checkpoints/)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of that run (model, data, batch, train.steps)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        val = {r: forward_val_loss(args.run_dir, r, args.overrides, Path(scratch)) for r in args.recipes}
    ref = val.get("bf16", val[args.recipes[0]])
    for recipe, v in val.items():
        print(f"{recipe:15s} val {v:.5f}  vs bf16 {100 * (v / ref - 1):+.3f}%")
    worst = max((abs(v / ref - 1) for r, v in val.items() if r.startswith("fp8")), default=float("nan"))
    print(f"worst_fp8_forward_vs_bf16={worst:.5f}")


if __name__ == "__main__":
    main()
