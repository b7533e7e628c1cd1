"""metrics.jsonl, MaxVio, the load heatmap, the progress line."""

import json

import numpy as np
import pytest
import torch

from train.metrics import MetricsWriter, format_progress, heatmap_image, max_vio, tag_for


def test_max_vio_hand_examples():
    assert max_vio(torch.tensor([[0.5, 0.25, 0.25, 0.0]])) == pytest.approx(1.0)
    assert max_vio(torch.tensor([[0.25] * 4, [0.4, 0.2, 0.2, 0.2]])) == pytest.approx(0.6)


def test_heatmap_shape_and_scale():
    loads = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.0, 0.5, 0.0]])
    img = heatmap_image(loads, block=8)
    assert img.shape == (16, 32, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (33, 145, 140)  # uniform load is the middle colour of the ramp
    assert tuple(img[8, 0]) == (253, 231, 37) and tuple(img[8, 8]) == (68, 1, 84)  # 2/E: top, 0: bottom


def test_tags():
    assert [tag_for(k) for k in ("loss", "val_loss", "aux/seq", "mfu", "whatever")] == \
        ["loss/train", "loss/val", "loss/aux/seq", "perf/mfu", "misc/whatever"]


def test_jsonl_resume_drops_orphan_steps(tmp_path):
    with MetricsWriter(tmp_path, enabled=True) as w:
        for s in range(1, 6):
            w.log(s, {"step": s, "loss": float(s)})
    with MetricsWriter(tmp_path, enabled=True, resume_step=3) as w:
        w.log(4, {"step": 4, "loss": 40.0})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "x", enabled=False)
    w.log(1, {"step": 1, "loss": 1.0})
    w.log_moe(1, torch.ones(1, 4) / 4, [1])
    w.close()
    assert not (tmp_path / "x").exists()


def test_progress_line():
    line = format_progress(120, 1000, 2.34567, 12345.4, 0.03214, 60.0)
    assert line == "step 120/1000 | loss 2.3457 | 12,345 tok/s | mfu 3.21% | eta 00:07:20"
