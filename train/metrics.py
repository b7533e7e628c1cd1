"""Run metrics: `metrics.jsonl` (one JSON object per logged step), TensorBoard scalars, expert-load
histograms and a layers x experts load heatmap, and the console progress line. Rank 0 only: a disabled
writer does nothing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

# caller key -> TensorBoard tag (DESIGN.md "Metrics"); aux/<name> -> loss/aux/<name>; others -> misc/<key>
TAGS = {"loss": "loss/train", "val_loss": "loss/val", "lr": "optim/lr", "grad_norm": "optim/grad_norm",
        "tokens_per_sec": "perf/tokens_per_sec", "mfu": "perf/mfu", "step_time": "perf/step_time",
        "peak_mem_gb": "memory/peak_gb", "max_vio": "moe/max_vio", "dropped_fraction": "moe/dropped_fraction"}

# a viridis-like colour ramp (dark blue -> teal -> green -> yellow), interpolated piecewise-linearly
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)


def tag_for(key: str) -> str:
    if key in TAGS:
        return TAGS[key]
    if key.startswith("aux/"):
        return "loss/" + key
    return "misc/" + key


def max_vio(loads: torch.Tensor) -> float:
    """MaxVio (arXiv 2408.15664): max over layers of max_i load_i / mean_i load_i - 1; loads [L, E]."""
    loads = loads.float()
    per_layer = loads.max(-1).values / loads.mean(-1).clamp_min(1e-12) - 1
    return float(per_layer.max())


def heatmap_image(loads: torch.Tensor, block: int = 8) -> np.ndarray:
    """[L, E] load fractions -> HWC uint8 image; uniform load (1/E) sits mid-scale, 2/E and above at the top."""
    loads = loads.float().numpy()
    e = loads.shape[1]
    scaled = np.clip(loads * e / 2.0, 0.0, 1.0) * (len(_RAMP) - 1)  # 0 -> 0, 1/E -> middle, 2/E -> 1
    lo = np.floor(scaled).astype(int).clip(0, len(_RAMP) - 2)
    frac = (scaled - lo)[..., None]
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac  # (L, E, 3)
    rgb = rgb.repeat(block, axis=0).repeat(block, axis=1)
    return rgb.round().astype(np.uint8)


def format_progress(step: int, total_steps: int, loss: float, tokens_per_sec: float, mfu: float,
                    elapsed_s: float) -> str:
    eta = elapsed_s / max(step, 1) * max(total_steps - step, 0)
    h, rem = divmod(int(round(eta)), 3600)
    m, s = divmod(rem, 60)
    return (f"step {step}/{total_steps} | loss {loss:.4f} | {tokens_per_sec:,.0f} tok/s | mfu {mfu * 100:.2f}% "
            f"| eta {h:02d}:{m:02d}:{s:02d}")


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (a resumed run re-logs them), atomically."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


class MetricsWriter:
    def __init__(self, output_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = output_dir / "metrics.jsonl"
        _truncate_jsonl(self.jsonl_path, resume_step if resume_step is not None else 0)
        self._jsonl = open(self.jsonl_path, "a")
        self.tb = SummaryWriter(log_dir=str(output_dir / "tb"), purge_step=(resume_step or 0) + 1)

    def log(self, step: int, record: dict) -> None:
        """One JSON line and the matching TensorBoard scalars."""
        if not self.enabled:
            return
        self._write_jsonl(record)
        self._write_scalars(step, record)

    def _write_jsonl(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def _write_scalars(self, step: int, record: dict) -> None:
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.tb.add_scalar(tag_for(key), value, step)
        self.tb.flush()

    def log_moe(self, step: int, loads: torch.Tensor, layer_ids: list[int],
                expert_bias: torch.Tensor | None = None) -> None:
        """Per-layer expert-load histograms, the bias histogram and the layers x experts heatmap image."""
        if not self.enabled:
            return
        for row, layer in zip(loads, layer_ids):
            self.tb.add_histogram(f"moe/layer_{layer}/load", row.float(), step)
        if expert_bias is not None:
            self.tb.add_histogram("moe/expert_bias", expert_bias.float().flatten(), step)
        self.tb.add_image("moe/load_heatmap", heatmap_image(loads), step, dataformats="HWC")
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self.tb.close()
            self.enabled = False

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
