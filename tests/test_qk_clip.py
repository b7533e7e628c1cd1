"""QK-clip (train/qk_clip.py): the per-head logit measurement, the rescaled weights by the formula, the next
forward's logits at most tau; MLA and GQA; the same clip under FSDP (2 ranks) as on one process."""

import math

import pytest
import torch

from conftest import base_args, fixed_batch, full, metrics, run_ranks, tiny, tiny_model, train
from model.attention import max_logits
from train.qk_clip import attention_modules, qk_clip, track_max_logits

# one dense layer, N=16, R=8, V=24 (no two head widths equal), 4 heads
MLA_CFG = dict(num_hidden_layers=1, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24)


def logits_of(model, inputs) -> torch.Tensor:
    """Each attention layer's largest logit per head in one forward: (layers, H)."""
    track_max_logits([model], True)
    with torch.no_grad():
        model(inputs)
    out = torch.stack([m.max_logits for m in attention_modules([model])])
    track_max_logits([model], False)
    return out


def test_max_logits_equal_the_masked_score_matrix():
    """Blocked measurement (block 3 of T=8) against the whole causal score matrix, GQA (H=4, K=2)."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, 4, 5, generator=gen), torch.randn(2, 8, 2, 5, generator=gen)
    scores = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(2, 2)) * 0.3
    scores = scores.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(max_logits(q, k, 0.3, block=3), scores.amax(dim=(0, 2, 3)))


def test_mla_clip_rescales_by_the_formula_and_caps_the_next_logits():
    model = tiny_model(tiny(**MLA_CFG))
    inputs, _ = fixed_batch(512, 2, 32)
    before = logits_of(model, inputs)[0]  # (H,)
    tau = float(before.sort().values[1]) * 0.999  # heads 1.. of the sorted order clip, the smallest does not
    attn = model.layers["0"].self_attn
    q_b, kv_b, kv_a = (w.detach().clone() for w in (attn.q_b_proj.weight, attn.kv_b_proj.weight,
                                                      attn.kv_a_proj_with_mqa.weight))
    track_max_logits([model], True)
    with torch.no_grad():
        model(inputs)
    assert qk_clip([model], tau) == pytest.approx(float(before.max()))
    gamma = (tau / before).clamp(max=1.0)
    assert int((gamma < 1).sum()) == 3
    for h in range(4):
        g = float(gamma[h])
        q_rows, kv_rows = slice(h * 24, h * 24 + 16), slice(h * 40, h * 40 + 16)
        torch.testing.assert_close(attn.q_b_proj.weight[q_rows], q_b[q_rows] * math.sqrt(g))
        torch.testing.assert_close(attn.q_b_proj.weight[h * 24 + 16:(h + 1) * 24], q_b[h * 24 + 16:(h + 1) * 24] * g)
        torch.testing.assert_close(attn.kv_b_proj.weight[kv_rows], kv_b[kv_rows] * math.sqrt(g))
        torch.testing.assert_close(attn.kv_b_proj.weight[h * 40 + 16:(h + 1) * 40], kv_b[h * 40 + 16:(h + 1) * 40])
    assert torch.equal(attn.kv_a_proj_with_mqa.weight, kv_a)  # the shared RoPE key untouched
    after = logits_of(model, inputs)[0]
    assert bool((after <= tau * (1 + 1e-5)).all())
    torch.testing.assert_close(after, torch.minimum(before, torch.tensor(tau)), rtol=1e-5, atol=0)


def test_gqa_clip_scales_a_shared_key_by_the_smallest_gamma():
    """H=4 query heads on K=2 key heads, 3 heads clip: one key head serves a clipped and an unclipped head."""
    model = tiny_model(tiny(num_hidden_layers=1, attention="gqa", num_key_value_heads=2))
    inputs, _ = fixed_batch(512, 2, 32)
    before = logits_of(model, inputs)[0]
    tau = float(before.sort().values[1]) * 0.999
    attn = model.layers["0"].self_attn
    q, k = attn.q_proj.weight.detach().clone(), attn.k_proj.weight.detach().clone()
    track_max_logits([model], True)
    with torch.no_grad():
        model(inputs)
    qk_clip([model], tau)
    gamma = (tau / before).clamp(max=1.0)
    hd = k.shape[0] // 2
    for h in range(4):
        rows = slice(h * hd, (h + 1) * hd)
        torch.testing.assert_close(attn.q_proj.weight[rows], q[rows] * math.sqrt(float(gamma[h])))
    for kv in range(2):
        rows, shared = slice(kv * hd, (kv + 1) * hd), float(gamma[2 * kv:2 * kv + 2].min())
        torch.testing.assert_close(attn.k_proj.weight[rows], k[rows] * math.sqrt(shared))
    assert bool((logits_of(model, inputs)[0] <= tau * (1 + 1e-5)).all())


def clip_rank(rank: int, world: int, tau: float, layout: str) -> dict:
    """2 ranks: FSDP (each its half of the batch), TP (each its half of the heads, the whole batch) or CP (each its
    half of every sequence; Ulysses attention sees whole sequences for half of the heads)."""
    from torch.distributed.fsdp import FSDPModule

    from parallel import ParallelDims, parallelize

    dims = ParallelDims.resolve(world, **{{"fsdp": "dp_shard"}.get(layout, layout): world})
    mesh = dims.build_mesh("cpu")
    model = parallelize(tiny_model(tiny(**MLA_CFG)), mesh, dims)
    inputs, _ = fixed_batch(512, 4, 32)
    mine = {"fsdp": inputs.chunk(world)[rank], "tp": inputs, "cp": inputs.chunk(world, dim=1)[rank]}[layout]
    track_max_logits([model], True)
    with torch.no_grad():
        model(mine)
    for m in model.modules():  # as after a backward: the parameters sharded again
        if isinstance(m, FSDPModule):
            m.reshard()
    heads = mesh[layout].get_group() if layout in ("tp", "cp") else None
    largest = qk_clip([model], tau, mesh["dp_cp"].get_group(), head_group=heads)
    return largest, {n: full(p) for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["fsdp", "tp", "cp"])
def test_clip_under_a_layout_equals_one_process(tmp_path, layout):
    """The same heads clip by the same gamma as on one process, whichever ranks hold the heads and tokens: the
    weights after the clip equal one process's. Half of the heads clip, so a rank that took another rank's
    share of heads for its own, or missed the other tokens' maximum, would scale other rows."""
    model = tiny_model(tiny(**MLA_CFG))
    inputs, _ = fixed_batch(512, 4, 32)
    before = logits_of(model, inputs)[0]
    tau = float(before.median())  # half of the heads clip, each by its own gamma
    assert 0 < int((before > tau).sum()) < before.numel()
    track_max_logits([model], True)
    with torch.no_grad():
        model(inputs)
    want = qk_clip([model], tau)
    for largest, got in run_ranks(clip_rank, 2, tmp_path, tau, layout):
        assert largest == pytest.approx(want, rel=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name], p.detach(), rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_training_with_qk_clip_logs_and_lowers_the_largest_logit(dataset, tmp_path):
    """optim=muon with tau below the logits of step 1: every step clips, the logged maximum comes down towards tau
    (a step's update moves it again after each clip), below an unclipped run's (tau 1000: never clips)."""
    logged = {}
    for tau in (0.05, 1000.0):
        out = tmp_path / f"tau{tau}"
        train(base_args(dataset, out, 4, optim="muon", **{"optim.qk_clip_tau": tau}))
        logged[tau] = metrics(out, "max_logit")
    clipped, free = logged[0.05], logged[1000.0]
    assert sorted(clipped) == [1, 2, 3, 4]
    assert clipped[1] == free[1] > 0.05  # measured before the first clip
    assert clipped[4] < 0.05 * 1.2 and clipped[4] < free[4] * 0.9, logged
