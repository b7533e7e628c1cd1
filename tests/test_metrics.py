"""train/metrics.py: what lands in TensorBoard and metrics.jsonl, read back from disk; MaxVio; the progress line."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from train.metrics import MetricsWriter, figure_pixels, format_progress, heatmap_figure, max_vio

def record(step: int) -> dict:
    """What the trainer logs at `step`, with values that differ per key and per step."""
    return {"step": step, "loss": 3.0 - 0.1 * step, "lr": 1e-4 * step, "grad_norm": 0.5 + step,
            "tokens_per_sec": 1000.0 * step, "mfu": 0.01 * step, "step_time": 0.2 * step,
            "peak_mem_gb": 1.5 + step, "max_vio": 0.3 * step, "dropped_fraction": 0.02 * step,
            "aux/expert": 0.001 * step, "aux/seq": 0.002 * step, "foo": 7.0 * step, "note": "warmup"}


TAGS = {"loss": "loss/train", "lr": "optim/lr", "grad_norm": "optim/grad_norm",
        "tokens_per_sec": "perf/tokens_per_sec", "mfu": "perf/mfu", "step_time": "perf/step_time",
        "peak_mem_gb": "memory/peak_gb", "max_vio": "moe/max_vio", "dropped_fraction": "moe/dropped_fraction",
        "aux/expert": "loss/aux/expert", "aux/seq": "loss/aux/seq", "foo": "misc/foo"}


def read_tb(out) -> EventAccumulator:
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def jsonl(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three logged steps, a validation loss at step 2, and one log_moe at step 3 (model layers 1, 2, 4)."""
    out = tmp_path_factory.mktemp("run")
    loads = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])
    bias = torch.tensor([[0.01, -0.02, 0.0, 0.03]] * 3)
    with MetricsWriter(out, enabled=True) as w:
        for step in (1, 2, 3):
            w.log(step, record(step))
            if step == 2:
                w.log(step, {"step": step, "val_loss": 2.5})
        w.log_moe(3, loads, [1, 2, 4], bias)
    return out, read_tb(out), loads, bias


def test_every_scalar_tag_has_the_values_and_steps_written(run):
    out, acc, _, _ = run
    for key, tag in TAGS.items():
        want = [(s, pytest.approx(record(s)[key], rel=1e-6)) for s in (1, 2, 3)]
        assert scalars(acc, tag) == want, tag
    assert scalars(acc, "loss/val") == [(2, 2.5)]
    tags = set(acc.Tags()["scalars"])
    per_layer = {f"moe/layer_{i}/max_vio" for i in (1, 2, 4)}  # from log_moe
    assert tags == set(TAGS.values()) | {"loss/val"} | per_layer  # no misc/step, nothing for the string "note"


def test_moe_histograms_hold_each_layers_loads_and_the_bias(run):
    out, acc, loads, bias = run
    hists = acc.Tags()["histograms"]
    assert {"moe/layer_1/load", "moe/layer_2/load", "moe/layer_4/load", "moe/expert_bias"} == set(hists)
    for tag, row in zip(("moe/layer_1/load", "moe/layer_2/load", "moe/layer_4/load"), loads):
        (h,) = acc.Histograms(tag)
        assert h.step == 3 and h.histogram_value.num == 4  # one value per expert
        assert h.histogram_value.sum == pytest.approx(float(row.sum()))
        assert (h.histogram_value.min, h.histogram_value.max) == pytest.approx((float(row.min()), float(row.max())))
    (b,) = acc.Histograms("moe/expert_bias")
    assert b.histogram_value.num == 12 and b.histogram_value.sum == pytest.approx(float(bias.sum()))

    # per-layer MaxVio: uniform 0; 0.5 / 0.25 - 1; 0.4 / 0.25 - 1
    for layer, want in ((1, 0.0), (2, 1.0), (4, 0.6)):
        assert scalars(acc, f"moe/layer_{layer}/max_vio") == [(3, pytest.approx(want, abs=1e-6))]
    (img,) = acc.Images("moe/load_heatmap")
    fig = heatmap_figure(loads, [1, 2, 4], 3)
    w, h = (fig.get_size_inches() * fig.dpi).round().astype(int)
    assert img.step == 3 and (img.width, img.height) == (w, h) and w >= 500 and h >= 300
    pixels = np.asarray(Image.open(io.BytesIO(img.encoded_image_string)).convert("RGB"))
    assert np.array_equal(pixels, figure_pixels(fig))


TOP = (253, 231, 36)  # viridis at 1.0 (the colour bar's maximum) as Agg renders it


def cell_centre(fig, layer: int, expert: int, shape) -> tuple[int, int]:
    """Pixel (row, column) of the centre of cell (layer, expert) in the rendered figure."""
    box = fig.axes[0].get_window_extent()
    n_layers, n_experts = shape
    x = box.x0 + (expert + 0.5) / n_experts * box.width
    y = box.y1 - (layer + 0.5) / n_layers * box.height  # matplotlib counts y from the bottom
    return int(round(fig.get_size_inches()[1] * fig.dpi - y)), int(round(x))


@pytest.mark.parametrize("shape,hot", [((5, 12), (3, 7)), ((59, 160), (40, 131))])
def test_load_heatmap_puts_the_hot_expert_where_it_is(shape, hot):
    """Layers down, experts across: one expert at 6x the mean load is the colour bar's top colour at its own
    cell and nowhere else in the plot; a readable size at DeepSeek-V2's 59 MoE layers x 160 experts."""
    loads = torch.full(shape, 1.0 / shape[1])
    loads[hot] = 6.0 / shape[1]
    loads[hot[0]] /= loads[hot[0]].sum()
    fig = heatmap_figure(loads, list(range(1, shape[0] + 1)), 7)
    pixels = figure_pixels(fig)
    assert tuple(pixels[cell_centre(fig, *hot, shape)]) == TOP
    for other in ((0, 0), (hot[0], (hot[1] + 1) % shape[1]), ((hot[0] + 1) % shape[0], hot[1])):
        assert tuple(pixels[cell_centre(fig, *other, shape)]) != TOP
    if shape == (59, 160):
        assert pixels.shape[1] / 160 >= 8 and pixels.shape[0] / 59 >= 15  # pixels a cell: wide and tall enough
    assert "step 7" in fig.axes[0].get_title() and "max_vio" in fig.axes[0].get_title()


def test_jsonl_keeps_the_callers_keys(run):
    out, *_ = run
    rows = jsonl(out)
    assert rows == [record(1), record(2), {"step": 2, "val_loss": 2.5}, record(3)]


def test_max_vio_equals_hand_examples_and_rejects_a_vector():
    assert max_vio(torch.tensor([[0.5, 0.25, 0.25, 0.0]])) == pytest.approx(0.5 / 0.25 - 1)
    two_layers = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.4, 0.2, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]])
    assert max_vio(two_layers) == pytest.approx(0.6)  # layer 2: 0.4 / 0.25 - 1
    with pytest.raises(ValueError):
        max_vio(torch.tensor([0.5, 0.5]))


def test_resume_drops_orphan_steps_in_jsonl_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path, enabled=True) as w:
        for s in range(1, 6):
            w.log(s, {"step": s, "loss": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    with MetricsWriter(tmp_path, enabled=True, resume_step=3) as w:
        w.log(4, {"step": 4, "loss": 40.0})
    assert [(r["step"], r["loss"]) for r in jsonl(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert scalars(read_tb(tmp_path), "loss/train") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert not list(tmp_path.glob("*.tmp"))


def test_fresh_run_in_a_used_output_dir_starts_over(tmp_path):
    with MetricsWriter(tmp_path, enabled=True) as w:
        w.log(1, {"step": 1, "loss": 1.0})
    with MetricsWriter(tmp_path, enabled=True) as w:
        w.log(1, {"step": 1, "loss": 9.0})
    assert jsonl(tmp_path) == [{"step": 1, "loss": 9.0}]


def test_disabled_writer_creates_no_files(tmp_path):
    out = tmp_path / "rank1"
    with MetricsWriter(out, enabled=False) as w:
        w.log(1, {"step": 1, "loss": 1.0})
        w.log_scalars(1, {"loss": 1.0})
        w.log_moe(1, torch.full((2, 4), 0.25), [1, 2], torch.zeros(2, 4))
    assert not out.exists()


def test_log_moe_rejects_mismatched_layer_ids(tmp_path):
    with MetricsWriter(tmp_path, enabled=True) as w, pytest.raises(ValueError, match="2 layer ids for 3 rows"):
        w.log_moe(1, torch.full((3, 4), 0.25), [1, 2])


def test_progress_line_rounds_loss_throughput_mfu_and_eta():
    assert format_progress(120, 1000, 2.34567, 12345.4, 0.03214, 440.0) == \
        "step 120/1000 | loss 2.3457 | 12,345 tok/s | mfu 3.21% | eta 00:07:20"
    assert format_progress(1, 10001, 10.0, 1234567.0, 0.5, 36000.4) == \
        "step 1/10001 | loss 10.0000 | 1,234,567 tok/s | mfu 50.00% | eta 10:00:00"


def _peak_of_rank(rank: int, world: int) -> float:
    from train.components import max_over_ranks

    return max_over_ranks([1.25, 3.5][rank], torch.device("cpu"), world)


def test_logged_peak_memory_is_the_fullest_ranks(tmp_path):
    """memory/peak_gb is the largest peak of any rank (pipeline stages differ), the same on every rank."""
    from conftest import run_ranks

    assert run_ranks(_peak_of_rank, 2, tmp_path) == [3.5, 3.5]
