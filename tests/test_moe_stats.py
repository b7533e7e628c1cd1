"""train/moe_stats.py on hand-set counters: loads, dropped fraction, balance-loss values, the V3 bias update."""

import pytest
import torch

from model import Transformer, load_preset
from train.moe_stats import MoEStats, StatsGroups, gathered_expert_bias


def test_collect_reads_every_layer_and_resets_it():
    cfg = load_preset("tiny").replace(aux_loss_free_bias=True, bias_update_speed=0.01, seq_aux_loss_alpha=0.001)
    model = Transformer(cfg)
    layers = model.moe_layers()
    assert sorted(layers) == cfg.moe_layer_ids() == [1, 2, 3]
    e = cfg.n_routed_experts
    for k, (i, m) in enumerate(sorted(layers.items())):
        m.tokens_per_expert.copy_(torch.arange(e, dtype=torch.float32) + k)  # layer k: k, k+1, ..., k+7
        m.dropped.copy_(torch.tensor([k + 1.0, 40.0]))
        m.aux_values = {"expert": torch.tensor(0.1 * (k + 1)), "seq": torch.tensor(0.01)}
    stats = MoEStats.collect(layers, cfg, StatsGroups(torch.device("cpu")), update_bias=True)
    assert stats.layer_ids == [1, 2, 3]
    for k in range(3):
        counts = torch.arange(e, dtype=torch.float32) + k
        torch.testing.assert_close(stats.loads[k], counts / counts.sum())
    assert stats.dropped_fraction == pytest.approx((1 + 2 + 3) / 120)
    assert stats.aux["aux/expert"] == pytest.approx(0.6) and stats.aux["aux/seq"] == pytest.approx(0.03)
    assert set(stats.aux) == {"aux/expert", "aux/device", "aux/comm", "aux/seq"} and stats.aux["aux/device"] == 0
    metrics = stats.metrics()
    assert metrics["max_vio"] == pytest.approx(7 / 3.5 - 1)  # layer 0: max 7 over mean 3.5
    bias = gathered_expert_bias(layers, cfg, StatsGroups(torch.device("cpu")))
    assert bias.shape == (3, e)
    assert bool((bias[:, 0] > 0).all()) and bool((bias[:, -1] < 0).all())  # underloaded up, overloaded down
    for m in layers.values():  # counters reset for the next step
        assert float(m.tokens_per_expert.sum()) == 0 and float(m.dropped.sum()) == 0


def test_a_dense_model_has_no_stats():
    cfg = load_preset("tiny").replace(n_routed_experts=0, n_shared_experts=0)
    assert MoEStats.collect({}, cfg, StatsGroups(torch.device("cpu")), update_bias=False) is None
