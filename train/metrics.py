"""Run metrics, written on rank 0 only (a disabled writer does nothing and creates no files).

- `<output_dir>/metrics.jsonl`: one JSON object per `log` call, keys exactly as the caller gave them.
- `<output_dir>/tb/`: TensorBoard scalars under the tags of `tag_for`, per-layer
  expert-load histograms, the expert-bias histogram and a layers x experts load heatmap image.
- `format_progress`: the console progress line; `max_vio`: the routing-imbalance number.

Resuming at step s drops what the killed run logged after s (jsonl rewritten atomically, TensorBoard
events hidden through `purge_step`), so the resumed log has no duplicate or orphan steps.
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path

import numpy as np
import torch

# caller key -> TensorBoard tag; aux/<name> -> loss/aux/<name>; anything else -> misc/<key>
TAGS = {"loss": "loss/train", "val_loss": "loss/val", "lr": "optim/lr", "grad_norm": "optim/grad_norm",
        "tokens_per_sec": "perf/tokens_per_sec", "mfu": "perf/mfu", "step_time": "perf/step_time",
        "peak_mem_gb": "memory/peak_gb", "max_vio": "moe/max_vio", "dropped_fraction": "moe/dropped_fraction",
        "batch_size": "train/batch_size", "tokens": "train/tokens", "rollbacks": "train/rollbacks"}

def tag_for(key: str) -> str:
    """TensorBoard tag for a metrics.jsonl key."""
    if key in TAGS:
        return TAGS[key]
    if key.startswith("aux/"):
        return "loss/" + key
    if key.startswith("step_time/"):  # the straggler metrics (train/straggler.py)
        return "perf/" + key
    return "misc/" + key


def _check_loads(loads: torch.Tensor) -> None:
    if loads.dim() != 2 or loads.numel() == 0:
        raise ValueError(f"loads must be a non-empty [n_moe_layers, n_experts] tensor, got {tuple(loads.shape)}")


def max_vio(loads: torch.Tensor) -> float:
    """MaxVio (arXiv 2408.15664): max over layers of (max_i load_i / mean_i load_i) - 1; loads [L, E]."""
    _check_loads(loads)
    return float(layer_max_vio(loads).max())


def layer_max_vio(loads: torch.Tensor) -> torch.Tensor:
    """Per layer: max_i load_i / mean_i load_i - 1 of [L, E] loads."""
    loads = loads.float()
    return loads.max(-1).values / loads.mean(-1).clamp_min(1e-12) - 1


def heatmap_figure(loads: torch.Tensor, layer_ids: list[int], step: int):
    """A matplotlib Figure of [L, E] loads: MoE layers down, experts across, colour in units of the layer's mean
    load (1 = balanced) with a colour bar, the step and max_vio in the title; about 9 x 20 pixels a cell, so
    DeepSeek-V2's 59 layers x 160 experts stay readable."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    _check_loads(loads)
    rel = (loads.float() / loads.float().mean(-1, keepdim=True).clamp_min(1e-12)).cpu().numpy()
    n_layers, n_experts = rel.shape
    # constrained layout: the axis labels and the colour bar are fitted inside the figure when it is drawn
    fig = Figure(figsize=(min(max(5.0, 0.09 * n_experts + 2.5), 18.0), min(max(3.0, 0.2 * n_layers + 1.5), 14.0)),
                 dpi=100, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rel, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(2.0, float(rel.max())),
                      interpolation="nearest")
    every = max(1, -(-n_layers // 20))  # at most ~20 layer labels
    ax.set_yticks(range(0, n_layers, every), labels=[str(layer_ids[i]) for i in range(0, n_layers, every)])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # experts are whole numbers
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"expert load, step {step}, max_vio {float(layer_max_vio(loads).max()):.3f}")
    fig.colorbar(image, ax=ax, label="load / mean load of the layer")
    return fig


def figure_pixels(fig) -> np.ndarray:
    """The figure rendered to an (H, W, 3) uint8 array (Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def format_progress(step: int, total_steps: int, loss: float, tokens_per_sec: float, mfu: float,
                    eta_s: float) -> str:
    """One console line; `mfu` is a 0..1 fraction, `eta_s` the seconds left."""
    h, rem = divmod(int(round(max(eta_s, 0.0))), 3600)
    m, s = divmod(rem, 60)
    return (f"step {step}/{total_steps} | loss {loss:.4f} | {tokens_per_sec:,.0f} tok/s | mfu {mfu * 100:.2f}% "
            f"| eta {h:02d}:{m:02d}:{s:02d}")


def _step_of(line: str) -> int | None:
    """The record's step, or None for a torn line (a kill mid-write) or a record without one."""
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only records with step <= `last_step` (a resumed run logs the rest again), atomically."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if (s := _step_of(ln)) is not None and s <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(ln + "\n" for ln in keep))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsWriter:
    """metrics.jsonl + TensorBoard for one run. `resume_step`: the step the run resumes from; None means a
    fresh run from step 0, so anything an earlier attempt logged into this output_dir is dropped too."""

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported here: other ranks never pay for it

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        last = resume_step or 0
        self.jsonl_path = output_dir / "metrics.jsonl"
        truncate_jsonl(self.jsonl_path, last)
        self._jsonl = open(self.jsonl_path, "a")
        # purge_step hides events with step > last from earlier event files in tb/
        self.tb = SummaryWriter(log_dir=str(output_dir / "tb"), purge_step=last + 1)

    def rewind(self, step: int) -> None:
        """Drop what was logged after `step` (a run rolled back to it), as a resume at `step` would."""
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._jsonl.close()
        truncate_jsonl(self.jsonl_path, step)
        self._jsonl = open(self.jsonl_path, "a")
        log_dir = self.tb.log_dir
        self.tb.close()
        self.tb = SummaryWriter(log_dir=log_dir, purge_step=step + 1)

    def log(self, step: int, record: dict) -> None:
        """The main entry point: one JSON line and the matching TensorBoard scalars."""
        if not self.enabled:
            return
        self._write_jsonl(record)
        self.log_scalars(step, record)

    def _write_jsonl(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def log_scalars(self, step: int, record: dict) -> None:
        """Numeric values of `record` as TensorBoard scalars at global step `step` (the `step` key itself
        and non-numeric values are skipped)."""
        if not self.enabled:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.tb.add_scalar(tag_for(key), float(value), step)
        self.tb.flush()

    def log_moe(self, step: int, loads: torch.Tensor, layer_ids: list[int],
                expert_bias: torch.Tensor | None = None) -> None:
        """loads [n_moe_layers, n_experts] load fractions (row i is model layer layer_ids[i]) -> per-layer
        histograms `moe/layer_<id>/load` and scalars `moe/layer_<id>/max_vio`, `moe/expert_bias` and the
        `moe/load_heatmap` figure (`heatmap_figure`)."""
        if not self.enabled:
            return
        _check_loads(loads)
        if len(layer_ids) != loads.shape[0]:
            raise ValueError(f"{len(layer_ids)} layer ids for {loads.shape[0]} rows of loads")
        loads = loads.detach().float().cpu()
        for row, layer, vio in zip(loads, layer_ids, layer_max_vio(loads).tolist()):
            self.tb.add_histogram(f"moe/layer_{layer}/load", row, step)
            self.tb.add_scalar(f"moe/layer_{layer}/max_vio", vio, step)
        if expert_bias is not None:
            self.tb.add_histogram("moe/expert_bias", expert_bias.detach().float().cpu().flatten(), step)
        image = figure_pixels(heatmap_figure(loads, layer_ids, step))
        self.tb.add_image("moe/load_heatmap", image, step, dataformats="HWC")
        self.tb.flush()

    def close(self) -> None:
        """Flush and close both outputs; later calls are no-ops."""
        if self.enabled:
            self._jsonl.close()
            self.tb.close()
            self.enabled = False

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
