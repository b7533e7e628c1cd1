"""Model math: absorbed generation, presets, balance losses, dropping, bias update, MTP, FLOPs."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from conftest import counted_training_flops, tiny
from model import Transformer, load_preset
from model.analysis import kv_cache_elements_per_token, param_counts, training_flops_per_token, \
    forward_flops_per_token
from model.generate import generate
from model.moe import MoE, Routing, capacity_keep_mask, comm_balance_loss, device_balance_loss, \
    expert_balance_loss, sequence_balance_loss, grouped_mm

YARN = {"type": "yarn", "factor": 8.0, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
        "mscale_all_dim": 0.707, "original_max_position_embeddings": 16}


# ------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("over", [{}, {"q_lora_rank": None, "rope_scaling": YARN}])
def test_absorbed_cache_decoding_equals_full_sequence_logits(over):
    torch.manual_seed(0)
    model = Transformer(tiny(initializer_range=0.05, **over)).eval()
    tokens = torch.randint(0, 512, (2, 24))
    full = model(tokens)
    cache = model.new_cache(2, 24)
    prefill = model.decode(tokens[:, :10], cache, start=0)  # several tokens at once, then one by one
    steps = [model.decode(tokens[:, t:t + 1], cache, start=t) for t in range(10, 24)]
    cached = torch.cat([prefill] + steps, dim=1)
    assert full.abs().max() > 0.1
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-4)


def test_greedy_generate_equals_repeated_full_forward():
    torch.manual_seed(1)
    model = Transformer(tiny(initializer_range=0.05)).eval()
    prompt = torch.randint(0, 512, (2, 5))
    out = generate(model, prompt, max_new_tokens=8)
    seq = prompt
    for _ in range(8):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampled_generate_is_reproducible_and_respects_top_k():
    torch.manual_seed(2)
    model = Transformer(tiny(initializer_range=0.05)).eval()
    prompt = torch.randint(0, 512, (1, 4))
    a = generate(model, prompt, 6, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    greedy = generate(model, prompt, 6)
    assert torch.equal(a, greedy)  # top_k=1 sampling is greedy
    b1 = generate(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b2 = generate(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(b1, b2)


def test_deepseek_v2_mla_caches_57x_fewer_elements_than_mha():
    mla, mha = kv_cache_elements_per_token(load_preset("deepseek_v2"))
    assert (mla, mha) == (576, 32768)
    assert round(mha / mla, 1) == 56.9  # the "57x" of the paper


# ------------------------------------------------------------------------------------------ presets
# (total, activated) in billions, and the tolerance on activated. Activated excludes the input embedding
# (the convention that best fits all three papers); the exact counts are V2-Lite 2.451B, V2 20.85B,
# V3 36.63B: the published figures are rounded to two digits, so V2-Lite (+2.1%) and V3 (-1.01%) need
# more than 1%. Including the embedding instead gives 2.66B (+11%), 21.38B, 37.55B (+1.5%).
PUBLISHED = {
    "deepseek_v2_lite": (15.7, 2.4, 0.025),
    "deepseek_v2": (236.0, 21.0, 0.01),
    "deepseek_v3": (671.0, 37.0, 0.0125),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_parameter_counts_match_papers(name):
    cfg = load_preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    counted = sum(p.numel() for p in model.parameters())
    pc = param_counts(cfg)
    assert counted == pc.total + pc.mtp  # analytic count == the built model
    total, active, tol = PUBLISHED[name]
    assert abs(pc.total / 1e9 - total) / total < 0.01
    assert abs(pc.active / 1e9 - active) / active < tol


def test_presets_hold_published_hyperparameters():
    v2, v3, lite = load_preset("deepseek_v2"), load_preset("deepseek_v3"), load_preset("deepseek_v2_lite")
    routing = (v2.n_routed_experts, v2.n_shared_experts, v2.num_experts_per_tok, v2.n_group, v2.topk_group)
    assert routing == (160, 2, 6, 8, 3)
    assert v2.routed_scaling_factor == 16.0 and v2.rope_scaling["mscale_all_dim"] == 0.707
    routing = (v3.scoring_func, v3.topk_method, v3.routed_scaling_factor, v3.norm_topk_prob)
    assert routing == ("sigmoid", "noaux_tc", 2.5, True)
    assert lite.q_lora_rank is None and lite.intermediate_size == 10944 and lite.num_hidden_layers == 27
    assert v2.initializer_range == v3.initializer_range == lite.initializer_range == 0.006  # DeepSeek's init std


def test_meta_build_then_init_weights_std():
    cfg = tiny()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    w = model.layers["1"].mlp.experts.gate_up_proj
    assert abs(w.std().item() - cfg.initializer_range) < 0.05 * cfg.initializer_range
    assert torch.equal(model.norm.weight, torch.ones(cfg.hidden_size))


@pytest.mark.parametrize("bad,msg", [
    ({"n_routed_experts": 10, "n_group": 4}, "n_routed_experts=10 must be divisible by n_group=4"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"topk_group": 5}, "topk_group=5"),
    ({"scoring_func": "relu"}, "scoring_func"),
])
def test_config_validation_names_the_numbers(bad, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**bad)


def test_unknown_preset_lists_available():
    with pytest.raises(ValueError, match="tiny"):
        load_preset("no_such_model")


# ------------------------------------------------------------------------------------------ routing
def test_v3_group_selection_scores_groups_by_top2_sum():
    cfg = tiny(scoring_func="sigmoid", topk_method="noaux_tc", n_routed_experts=8, n_group=4, topk_group=1,
               num_experts_per_tok=2, norm_topk_prob=True, routed_scaling_factor=2.5, aux_loss_free_bias=True)
    moe = MoE(cfg)
    # logits per expert for one token: group 0 has the single best expert, group 1 the best pair
    logits = torch.tensor([[3.0, -5.0, 2.0, 2.0, -5.0, -5.0, -5.0, -5.0]])
    moe.gate.weight.data = torch.zeros(8, cfg.hidden_size)
    x = torch.zeros(1, cfg.hidden_size)
    x[0, 0] = 1.0
    moe.gate.weight.data[:, 0] = logits[0]
    r = moe.gate(x)
    assert sorted(r.indices[0].tolist()) == [2, 3]  # V2's max rule would pick group 0 (expert 0)
    s = torch.sigmoid(torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(r.weights[0], 2.5 * s / s.sum())
    moe.gate.expert_bias[:] = torch.tensor([0, 0, 0, 0, 0, 0, 5.0, 5.0])  # bias moves selection, not weights
    r = moe.gate(x)
    assert sorted(r.indices[0].tolist()) == [6, 7]
    s = torch.sigmoid(torch.tensor([-5.0, -5.0]))
    torch.testing.assert_close(r.weights[0], 2.5 * s / s.sum())


def test_grouped_experts_equal_a_loop_over_experts():
    torch.manual_seed(0)
    e, d, i = 5, 12, 7
    x = torch.randn(11, d, requires_grad=True)
    w = torch.randn(e, d, i, requires_grad=True)
    counts = torch.tensor([3, 0, 4, 0, 4])
    offs = counts.cumsum(0).int()
    out = grouped_mm(x, w, offs)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    parts, start = [], 0
    for j, c in enumerate(counts.tolist()):
        parts.append(x2[start:start + c] @ w2[j])
        start += c
    ref = torch.cat(parts)
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


# ------------------------------------------------------------------------------------------ balance
# An asymmetric example: E=6 experts on D=3 devices (2 each), K=2 picks per token, M=1 device a token may reach,
# T=5 tokens; sigmoid-like scores whose rows do not sum to 1. Sizes all differ, so a formula that swaps two of
# them gives another number. Expected values below are plain Python from the papers' equations.
E, D, K, M = 6, 3, 2, 1
SCORES = [[0.91, 0.12, 0.55, 0.33, 0.07, 0.64],
          [0.21, 0.83, 0.18, 0.72, 0.45, 0.09],
          [0.38, 0.27, 0.96, 0.14, 0.61, 0.52],
          [0.05, 0.44, 0.31, 0.88, 0.79, 0.23],
          [0.67, 0.58, 0.11, 0.26, 0.34, 0.93]]
PICKS = [[0, 5], [1, 3], [2, 4], [3, 4], [5, 0]]  # token 1 and 3 reach two devices, the others one or two
SEQ_SCORES = SCORES + [[0.15, 0.71, 0.48, 0.62, 0.29, 0.36], [0.82, 0.09, 0.57, 0.41, 0.66, 0.13],
                       [0.24, 0.35, 0.77, 0.19, 0.53, 0.86], [0.49, 0.92, 0.16, 0.08, 0.74, 0.31],
                       [0.63, 0.28, 0.39, 0.97, 0.12, 0.45]]
SEQ_PICKS = PICKS + [[1, 3], [0, 4], [5, 2], [1, 4], [3, 0]]  # two sequences of 5 tokens


def hand_f(picks, t):  # V2 eq. 13: f_i = E / (K T) * (number of tokens picking i)
    return [E / (K * t) * sum(i in row for row in picks) for i in range(E)]


def hand_p(scores):  # V2 eq. 14: P_i = (1 / T) sum_t s_{i,t}
    return [sum(row[i] for row in scores) / len(scores) for i in range(E)]


def hand_losses():
    """The four balance losses of the example, from DeepSeek-V2 eq. 12-20 and DeepSeek-V3 eq. 17-20."""
    t, per = len(SCORES), E // D
    f, p = hand_f(PICKS, t), hand_p(SCORES)
    groups = [range(d * per, (d + 1) * per) for d in range(D)]
    f_dev = [sum(f[i] for i in g) / per for g in groups]  # mean of f over the device's experts
    p_dev = [sum(p[i] for i in g) for g in groups]  # sum of P over them
    sent = [sum(any(i in g for i in row) for row in PICKS) for g in groups]  # tokens sent to device d
    f_comm = [D / (M * t) * n for n in sent]
    seq = 0.0
    for b in range(2):
        s, picks = SEQ_SCORES[5 * b:5 * b + 5], SEQ_PICKS[5 * b:5 * b + 5]
        s = [[v / sum(row) for v in row] for row in s]  # per-token normalised affinities
        seq += sum(a * c for a, c in zip(hand_f(picks, 5), hand_p(s))) / 2  # mean over the 2 sequences
    return {"expert": sum(a * c for a, c in zip(f, p)), "device": sum(a * c for a, c in zip(f_dev, p_dev)),
            "comm": sum(a * c for a, c in zip(f_comm, p_dev)), "seq": seq}


def model_losses(moe=None):
    import model.moe as m
    moe = moe or m
    s, i = torch.tensor(SCORES), torch.tensor(PICKS)
    return {"expert": moe.expert_balance_loss(s, i).item(), "device": moe.device_balance_loss(s, i, D).item(),
            "comm": moe.comm_balance_loss(s, i, D, M).item(),
            "seq": moe.sequence_balance_loss(torch.tensor(SEQ_SCORES), torch.tensor(SEQ_PICKS), batch=2).item()}


def test_balance_losses_equal_the_papers_equations_on_an_asymmetric_example():
    want, got = hand_losses(), model_losses()
    for name in want:
        assert math.isclose(got[name], want[name], rel_tol=1e-6), (name, got[name], want[name])
    assert len({round(v, 6) for v in want.values()}) == 4  # four different numbers: no term equals another


def _wrong_f(c, e, k):  # E and T swapped in f
    return c.per_expert * c.tokens / (k * e)


def _mutants():
    """Plausible wrong versions of the balance losses, each as a function replacing the right one."""
    import model.moe as m
    lc = m.LoadCounts.of

    def expert_e_t_swapped(scores, indices, counts=None):
        c = lc(indices, scores.shape[-1], 1)
        return (_wrong_f(c, scores.shape[-1], indices.shape[-1]) * scores.mean(0)).sum()

    def device_both_means(scores, indices, n, counts=None):
        c, e, k = lc(indices, scores.shape[-1], n), scores.shape[-1], indices.shape[-1]
        f = (c.per_expert * e / (k * c.tokens)).view(n, -1).mean(-1)
        return (f * scores.mean(0).view(n, -1).mean(-1)).sum()

    def device_interleaved_groups(scores, indices, n, counts=None):  # expert i on device i % D
        c, e, k = lc(indices, scores.shape[-1], n), scores.shape[-1], indices.shape[-1]
        f = (c.per_expert * e / (k * c.tokens)).view(-1, n).mean(0)
        return (f * scores.mean(0).view(-1, n).sum(0)).sum()

    def comm(swap_dm=False, k_for_m=False):
        def loss(scores, indices, n, max_devices, counts=None):
            c = lc(indices, scores.shape[-1], n)
            m_ = indices.shape[-1] if k_for_m else max_devices
            f = c.per_device * (m_ / n if swap_dm else n / m_) / c.tokens
            return (f * scores.mean(0).view(n, -1).sum(-1)).sum()
        return loss

    def seq(normalise=True, k_for_t=False):
        def loss(scores, indices, batch, reduce_sum=None):
            e, k = scores.shape[-1], indices.shape[-1]
            s = (scores / scores.sum(-1, keepdim=True) if normalise else scores).view(batch, -1, e)
            t = s.shape[1]
            chosen = torch.zeros_like(s).scatter_(2, indices.view(batch, t, k), 1.0).sum(1)
            return (chosen * e / (k * (k if k_for_t else t)) * s.mean(1)).sum(-1).mean()
        return loss

    return {"expert: E and T swapped in f": ("expert_balance_loss", expert_e_t_swapped),
            "device: mean for P' as for f'": ("device_balance_loss", device_both_means),
            "device: experts dealt to devices round-robin": ("device_balance_loss", device_interleaved_groups),
            "comm: D and M swapped": ("comm_balance_loss", comm(swap_dm=True)),
            "comm: K used for M": ("comm_balance_loss", comm(k_for_m=True)),
            "seq: no per-token normalisation": ("sequence_balance_loss", seq(normalise=False)),
            "seq: K used for T": ("sequence_balance_loss", seq(k_for_t=True))}


@pytest.mark.parametrize("mutant", list(_mutants()))
def test_each_wrong_balance_formula_fails_the_example(monkeypatch, mutant):
    """Each plausible wrong formula, patched in, moves its loss on the example by more than 1e-3, a thousand times
    the tolerance of the equality test above. (Swapping sum and mean between f' and P' in the device loss is no
    mutant: per device, sum f x mean P = mean f x sum P, so no example can tell them apart.)"""
    import model.moe as m
    name, wrong = _mutants()[mutant]
    monkeypatch.setattr(m, name, wrong)
    want, got = hand_losses(), model_losses(m)
    term = {"expert_balance_loss": "expert", "device_balance_loss": "device", "comm_balance_loss": "comm",
            "sequence_balance_loss": "seq"}[name]
    assert abs(got[term] / want[term] - 1) > 1e-3, (mutant, got[term], want[term])


def test_capacity_dropping_drops_the_lowest_affinity_per_device():
    # 4 tokens, top-1, 2 experts on 2 devices, capacity factor 1 -> ceil(4*1/2) = 2 slots per device
    scores = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.7, 0.3]])
    routing = Routing(scores, torch.zeros(4, 1, dtype=torch.long), scores[:, :1])
    keep = capacity_keep_mask(routing, 2, 1.0, torch.zeros(4, dtype=torch.bool))
    assert keep.flatten().tolist() == [True, False, True, False]
    # a protected token is never dropped and takes its slot first: token 1 + best other (token 0)
    keep = capacity_keep_mask(routing, 2, 1.0, torch.tensor([False, True, False, False]))
    assert keep.flatten().tolist() == [True, True, False, False]


def test_dropped_assignments_contribute_nothing():
    torch.manual_seed(0)
    cfg = tiny(capacity_factor=0.5, no_drop_fraction=0.0, n_shared_experts=0, aux_loss_alpha=0.0,
               device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.5)
        moe.experts.gate_up_proj.normal_(0, 0.1)
        moe.experts.down_proj.normal_(0, 0.1)
    x = torch.randn(2, 16, cfg.hidden_size)
    out = moe.train()(x)
    dropped, total = moe.dropped.tolist()
    assert dropped >= total / 2 - cfg.balance_groups  # half the budget -> about half dropped
    # reference: drop by hand with the same rule, then compute each kept assignment one by one
    flat = x.reshape(-1, cfg.hidden_size)
    r = moe.gate(flat)
    keep = capacity_keep_mask(r, cfg.balance_groups, 0.5, torch.zeros(32, dtype=torch.bool))
    ref = torch.zeros_like(flat)
    for t in range(32):
        for j in range(cfg.num_experts_per_tok):
            if keep[t, j]:
                e = r.indices[t, j]
                gate, up = (flat[t] @ moe.experts.gate_up_proj[e]).chunk(2)
                ref[t] += r.weights[t, j] * ((F.silu(gate) * up) @ moe.experts.down_proj[e])
    torch.testing.assert_close(out.reshape(-1, cfg.hidden_size), ref, atol=1e-6, rtol=1e-5)


def test_aux_loss_gradient_reaches_router_without_the_output():
    torch.manual_seed(0)
    cfg = tiny(seq_aux_loss_alpha=0.01)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.3)
    x = torch.randn(2, 8, cfg.hidden_size)
    g = torch.randn(2, 8, cfg.hidden_size)
    (moe(x) * g).sum().backward()
    injected = moe.gate.weight.grad.clone()
    moe.zero_grad()
    moe.aux_loss_scale = 0.0  # reference: add the same losses to the objective explicitly
    out = moe(x)
    r = moe.gate(x.reshape(-1, cfg.hidden_size))
    d = cfg.balance_groups
    aux = (cfg.aux_loss_alpha * expert_balance_loss(r.scores, r.indices)
           + cfg.device_aux_loss_alpha * device_balance_loss(r.scores, r.indices, d)
           + cfg.comm_aux_loss_alpha * comm_balance_loss(r.scores, r.indices, d, cfg.topk_group)
           + cfg.seq_aux_loss_alpha * sequence_balance_loss(r.scores, r.indices, 2))
    ((out * g).sum() + aux).backward()
    torch.testing.assert_close(injected, moe.gate.weight.grad)
    assert set(moe.aux_values) == {"expert", "device", "comm", "seq"}


def test_expert_bias_update_balances_a_skewed_router():
    torch.manual_seed(0)
    cfg = tiny(scoring_func="sigmoid", topk_method="greedy", n_group=1, topk_group=1, aux_loss_free_bias=True,
               bias_update_speed=0.01, aux_loss_alpha=0.0, device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0)
    moe = MoE(cfg).eval()
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.2)
        moe.gate.weight[0] += 0.5  # experts 0 and 1 attract most tokens
        moe.gate.weight[1] += 0.4
    x = torch.randn(4, 64, cfg.hidden_size) + 1.0

    def max_vio():
        moe.reset_stats()
        with torch.no_grad():
            moe(x)
        load = moe.tokens_per_expert
        return (load.max() / load.mean() - 1).item()

    before = max_vio()
    for _ in range(200):
        max_vio()
        moe.update_expert_bias()
    after = max_vio()
    assert before > 1.0 and after < 0.3 * before
    assert moe.gate.expert_bias[0] < 0 and moe.gate.expert_bias[1] < 0


# ------------------------------------------------------------------------------------------ MTP
def test_mtp_logits_predict_the_right_offsets():
    torch.manual_seed(0)
    cfg = tiny(num_nextn_predict_layers=2, initializer_range=0.05)
    model = Transformer(cfg)
    tokens = torch.randint(0, 512, (2, 12))
    logits, mtp = model.forward_with_mtp(tokens)
    assert [m.shape[1] for m in mtp] == [11, 10]
    torch.testing.assert_close(logits, model(tokens))
    # depth 1 by hand: combine the main hidden state at i with the embedding of token i+1
    h = model.hidden_states(tokens)
    m1 = model.mtp[0]
    cos, sin = model._rope(0, 11, h.device)
    joined = torch.cat([m1.enorm(model.embed_tokens(tokens[:, 1:])), m1.hnorm(h[:, :11])], -1)
    h1 = m1.block(m1.eh_proj(joined), cos, sin)
    torch.testing.assert_close(mtp[0], model.lm_head(m1.norm(h1)))
    sum(m.sum() for m in mtp).backward()
    assert model.mtp[1].eh_proj.weight.grad.abs().sum() > 0


def test_mtp_on_the_first_part_of_a_sequence_reads_the_lookahead():
    """The first of two parts of each sequence (what a context-parallel rank holds) with the next 2 tokens as
    lookahead: every depth covers the whole part and equals the whole sequence's logits there (causal)."""
    torch.manual_seed(0)
    cfg = tiny(num_nextn_predict_layers=2, initializer_range=0.05)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 512, (2, 12))
    logits, mtp = model.forward_with_mtp(tokens)
    model.sequence_shard = (0, 2)
    part_logits, part_mtp = model.forward_with_mtp(tokens[:, :6], tokens[:, 6:8])
    assert [m.shape[1] for m in part_mtp] == [6, 6]
    torch.testing.assert_close(part_logits, logits[:, :6])
    for whole, part in zip(mtp, part_mtp):
        torch.testing.assert_close(part, whole[:, :6])


# ------------------------------------------------------------------------------------------ FLOPs
@register_flop_formula(torch.ops.aten._grouped_mm, get_raw=True)
def _grouped_mm_flops(a, b, *args, out_val=None, **kwargs):
    return 2 * a.shape[0] * a.shape[1] * b.shape[-1] if b.dim() == 3 else 2 * a.shape[0] * a.shape[1] * b.shape[1]


def test_training_flops_match_a_direct_count():
    torch.manual_seed(0)
    cfg = tiny(aux_loss_alpha=0.0, device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0)
    model = Transformer(cfg)
    b, t = 2, 32
    tokens = torch.randint(0, 512, (b, t))
    counted = counted_training_flops(model, tokens)
    analytic = training_flops_per_token(cfg, t, causal=False) * b * t
    # the attention kernel runs on v zero-padded to the q/k width (for the fused kernel): count that too
    pad = 3 * 2 * cfg.num_attention_heads * (cfg.qk_head_dim - cfg.v_head_dim) * t * cfg.num_hidden_layers * b * t
    assert abs(counted - (analytic + pad)) / analytic < 0.01
    assert forward_flops_per_token(cfg, t, causal=True) < forward_flops_per_token(cfg, t, causal=False)


def test_mtp_loss_equals_cross_entropy_on_labels_shifted_by_depth():
    """DeepSeek-V3 eq. 24-25 by hand: L = CE(main) + lambda / D * (CE_1 + ... + CE_D), where depth k's logits at
    position i predict token i + k + 1 (the labels shifted by k), each CE a mean over its own T - k positions.
    D = 2 depths, lambda = 0.3; the cross-entropies are written out (log-softmax at the target), in fp64."""
    from model.transformer import lm_and_mtp_loss
    from train.runtime import lm_loss

    torch.manual_seed(0)
    model = Transformer(tiny(num_nextn_predict_layers=2, initializer_range=0.05))
    tokens = torch.randint(0, 512, (3, 12))  # B = 3 sequences of T + 1 = 12 tokens
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    logits, mtp = model.forward_with_mtp(inputs)

    def ce(lg, targets):  # mean over every (sequence, position) both cover of -log p(target)
        lp = lg.detach().double().log_softmax(-1)
        b, n = lp.shape[0], min(lp.shape[1], targets.shape[1])
        return -sum(lp[s, i, int(targets[s, i])] for s in range(b) for i in range(n)).item() / (b * n)

    main = ce(logits, labels)
    depths = [ce(m, tokens[:, k + 1:]) for k, m in enumerate(mtp, start=1)]
    assert [m.shape[1] for m in mtp] == [10, 9]
    got = lm_and_mtp_loss(lm_loss, logits, mtp, labels, 0.3).item()
    assert got == pytest.approx(main + 0.3 / 2 * sum(depths), rel=1e-5)
    without = lm_and_mtp_loss(lm_loss, logits, mtp, labels, 0.0).item()
    assert without == pytest.approx(main, rel=1e-6)
    assert got - without == pytest.approx(0.15 * sum(depths), rel=1e-4)  # the weight, divided by D = 2
    # the shift is what the test can see: labels shifted by k - 1 or k + 1 give other cross-entropies
    for off in (0, 2):
        other = [ce(m, tokens[:, k + off:]) for k, m in enumerate(mtp, start=1)]
        assert abs(sum(other) - sum(depths)) > 0.05


def test_router_logits_stay_fp32_under_bf16_autocast():
    """Under bf16 autocast (the one-process bf16 path) the router computes its logits, scores and gate weights
    in fp32 from fp32 weights: equal to the fp32 computation, not to a bf16 GEMM's result."""
    from model.moe import Router

    torch.manual_seed(0)
    router = Router(tiny(initializer_range=0.5))
    x = torch.randn(40, router.weight.shape[1])
    want = F.linear(x, router.weight).softmax(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
    assert got.scores.dtype == torch.float32 and got.weights.dtype == torch.float32
    torch.testing.assert_close(got.scores, want, rtol=1e-6, atol=1e-7)
    bf16 = F.linear(x.bfloat16(), router.weight.bfloat16()).float().softmax(-1)
    assert float((bf16 - want).abs().max()) > 1e-4  # what a bf16 GEMM would have given instead


def test_token_spans_and_expert_counts_equal_tensor_split_and_bincount():
    from model.moe import expert_counts, token_spans

    for n, chunks in [(0, 3), (1, 3), (7, 3), (10, 4), (5, 1)]:
        want = [(int(s[0]), int(s[-1]) + 1) if len(s) else (0, 0)
                for s in torch.arange(n).tensor_split(min(chunks, max(n, 1)))]
        assert token_spans(n, chunks) == want, (n, chunks)
    ids = torch.tensor([4, 0, 4, 2, 4, 2, 0])  # expert 1, 3 and 5 unused; 6 ids of 7 below n
    assert expert_counts(ids, 7).tolist() == torch.bincount(ids, minlength=7).tolist() == [2, 0, 2, 0, 3, 0, 0]


def test_moe_under_bf16_autocast_combines_in_bf16_with_the_fp32_router_weights():
    """The routed outputs are weighted and summed in the experts' bf16 (no fp32 copy of the [N*K, D] rows): the
    same numbers as upcasting them to fp32 first and letting autocast round them back for the bmm."""
    from model.moe import MoE

    torch.manual_seed(0)
    moe = MoE(tiny(initializer_range=0.2)).eval()
    x = torch.randn(2, 9, moe.cfg.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = moe(x)
        flat = x.reshape(-1, x.shape[-1])
        routing = moe.gate(flat)
        [(chunk, y)] = moe.dispatcher.compute(moe.experts, moe.dispatcher.dispatch(moe._chunks(flat, routing, None)))
        full = flat.new_zeros(flat.shape[0] * routing.indices.shape[1], flat.shape[1])
        full = full.index_copy(0, chunk.order, y.float())  # the fp32 round trip
        routed = torch.bmm(routing.weights.unsqueeze(1), full.view(flat.shape[0], -1, flat.shape[1])).squeeze(1)
        want = routed.view_as(x) + moe.shared_experts(x)
    assert y.dtype == torch.bfloat16 and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
