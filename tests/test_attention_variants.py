"""model.attention = mla | mha | gqa | mqa: cached generation, a hand-written MHA reference, MQA = GQA with one
K/V head, the analytic parameter and FLOP counts against built models, config errors."""

import math

import pytest
import torch

from conftest import counted_training_flops
from model import ModelConfig, Transformer, load_preset
from model.analysis import attention_params, kv_cache_elements, param_counts, training_flops_per_token
from model.attention import Attention, KVCache, LatentKVCache
from model.rope import rope_cos_sin

# asymmetric sizes: 6 query heads of width 10, 2 or 3 K/V heads, hidden 48
VARIANTS = {
    "mla": {},
    "mha": {"attention": "mha", "head_dim": 10},
    "gqa": {"attention": "gqa", "num_key_value_heads": 2, "head_dim": 10},
    "mqa": {"attention": "mqa", "head_dim": 10},
}


def tiny(**over) -> ModelConfig:
    base = dict(hidden_size=48, num_attention_heads=6, initializer_range=0.05, num_hidden_layers=3)
    return load_preset("tiny").replace(**{**base, **over})


@pytest.mark.parametrize("variant,latent", [(v, True) for v in VARIANTS] + [("mla", False)])
def test_cached_decoding_equals_full_sequence_logits(variant, latent):
    torch.manual_seed(0)
    model = Transformer(tiny(**VARIANTS[variant])).eval()
    tokens = torch.randint(0, 512, (2, 21))
    full = model(tokens)
    cache = model.new_cache(2, 21, latent=latent)
    assert isinstance(cache[0], LatentKVCache if (variant == "mla" and latent) else KVCache)
    prefill = model.decode(tokens[:, :9], cache, start=0)  # several tokens at once, then one by one
    steps = [model.decode(tokens[:, t:t + 1], cache, start=t) for t in range(9, 21)]
    cached = torch.cat([prefill] + steps, dim=1)
    assert full.abs().max() > 0.1
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant,latent", [(v, True) for v in VARIANTS] + [("mla", False)])
def test_left_padded_batch_decodes_each_row_as_alone(variant, latent):
    """Two prompts of 5 and 9 tokens as one batch, the shorter padded on the left (pad [3 + 1, 0]: pad tokens
    are garbage ids): every row's logits, prefill and 4 cached steps, equal that row decoded alone."""
    torch.manual_seed(0)
    model = Transformer(tiny(**VARIANTS[variant])).eval()
    short, long = torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 9))
    batch = torch.cat([torch.cat([torch.randint(0, 512, (1, 4)), short], 1), long])
    nxt = torch.randint(0, 512, (2, 4))
    pad = torch.tensor([4, 0])
    cache = model.new_cache(2, 13, latent=latent)
    got = [model.decode(batch, cache, start=0, pad=pad)[:, -1]]
    got += [model.decode(nxt[:, t:t + 1], cache, start=9 + t, pad=pad)[:, -1] for t in range(4)]
    for row, prompt in enumerate((short, long)):
        alone = model(torch.cat([prompt, nxt[row:row + 1]], 1))[0]  # full forward of the row without padding
        want = alone[prompt.shape[1] - 1:]
        torch.testing.assert_close(torch.stack([g[row] for g in got]), want, atol=2e-5, rtol=1e-4)


def test_kv_cache_tensors_hold_the_variant_widths():
    """Cache shapes per token per layer equal model.analysis.kv_cache_elements."""
    for variant, over in VARIANTS.items():
        cfg = tiny(**over)
        layer = Transformer(cfg).new_cache(1, 1)[0]
        held = sum(t.numel() for t in vars(layer).values())  # one sequence, one position
        assert held == kv_cache_elements(cfg), variant
    assert kv_cache_elements(tiny(**VARIANTS["gqa"])) == 2 * 2 * 10
    assert kv_cache_elements(tiny(), "mla_decompressed") == 6 * (24 + 16)


def _reference_mha(x, wq, wk, wv, wo, heads, positions, theta):
    """Einsum softmax attention with RoPE written as complex rotation of interleaved pairs."""
    b, t, _ = x.shape
    hd = wq.shape[0] // heads
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rot = torch.polar(torch.ones(t, hd // 2, dtype=torch.float64), positions[:, None].double() * inv)

    def rope(y):  # (B, T, H, D)
        z = torch.view_as_complex(y.reshape(b, t, heads, hd // 2, 2).contiguous())
        return torch.view_as_real(z * rot[:, None]).reshape(b, t, heads, hd)

    q, k, v = (torch.einsum("btd,ed->bte", x, w).reshape(b, t, heads, hd) for w in (wq, wk, wv))
    scores = torch.einsum("bihd,bjhd->bhij", rope(q), rope(k)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(b, t, heads * hd)
    return torch.einsum("bte,de->btd", out, wo)


def test_mha_equals_hand_written_einsum_attention():
    torch.manual_seed(3)
    cfg = tiny(**VARIANTS["mha"], rope_theta=500.0)
    attn = Attention(cfg).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 7, 48, dtype=torch.float64)
    positions = torch.arange(5, 12)  # not starting at 0: the rotation must use the positions
    cos, sin = rope_cos_sin(cfg, positions)
    got = attn(x, cos.double(), sin.double())
    want = _reference_mha(x, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
                          6, positions, 500.0)
    assert want.abs().max() > 0.1
    # RoPE runs in fp32 (model/rope.py): agreement to fp32 rounding
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_mqa_equals_gqa_with_one_kv_head():
    torch.manual_seed(4)
    mqa = Transformer(tiny(**VARIANTS["mqa"])).eval()
    gqa = Transformer(tiny(attention="gqa", num_key_value_heads=1, head_dim=10)).eval()
    gqa.load_state_dict(mqa.state_dict())  # same names and shapes
    assert mqa.layers["0"].self_attn.k_proj.weight.shape == (10, 48)
    tokens = torch.randint(0, 512, (2, 13))
    torch.testing.assert_close(gqa(tokens), mqa(tokens), atol=0, rtol=0)
    # and GQA with one K/V head is not MHA with its K/V weights repeated by accident: replicating the one K/V head
    # six times in an MHA model gives the same function
    mha = Transformer(tiny(**VARIANTS["mha"])).eval()
    state = {k: (v.repeat(6, 1) if k.endswith(("k_proj.weight", "v_proj.weight")) else v)
             for k, v in mqa.state_dict().items()}
    mha.load_state_dict(state)
    torch.testing.assert_close(mha(tokens), mqa(tokens), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_counts_equal_the_built_model(variant):
    cfg = tiny(**VARIANTS[variant], num_nextn_predict_layers=1)
    model = Transformer(cfg)
    pc = param_counts(cfg)
    assert sum(p.numel() for p in model.parameters()) == pc.total + pc.mtp
    assert sum(p.numel() for p in model.layers["0"].self_attn.parameters()) == attention_params(cfg)


@pytest.mark.parametrize("variant", ["mha", "gqa"])
def test_training_flops_match_a_direct_count(variant):
    torch.manual_seed(0)
    cfg = tiny(**VARIANTS[variant], n_routed_experts=0)  # dense layers: every GEMM has a flop formula
    model = Transformer(cfg)
    b, t = 2, 16
    tokens = torch.randint(0, 512, (b, t))
    analytic = training_flops_per_token(cfg, t, causal=False) * b * t
    assert abs(counted_training_flops(model, tokens) - analytic) / analytic < 0.01


@pytest.mark.parametrize("over,msg", [
    ({"attention": "mlp"}, "model.attention must be one of"),
    ({"attention": "gqa"}, "needs model.num_key_value_heads dividing num_attention_heads=6, got None"),
    ({"attention": "gqa", "num_key_value_heads": 4}, "num_attention_heads=6, got 4"),
    ({"attention": "mqa", "num_key_value_heads": 2}, "num_key_value_heads=2 does not fit model.attention=mqa"),
    ({"attention": "mha", "head_dim": 9}, "head width 9"),
])
def test_attention_config_errors_name_the_numbers(over, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**over)


def test_hf_export_refuses_other_attention_in_one_line(tmp_path):
    from train.hf.format import to_hf

    with pytest.raises(ValueError, match="hold MLA only; this model has model.attention=gqa") as err:
        to_hf(Transformer(tiny(**VARIANTS["gqa"])), tmp_path / "hf")
    assert "\n" not in str(err.value) and not (tmp_path / "hf").exists()


def test_fp8_and_selective_recompute_reach_the_qkv_projections():
    """FP8 converts q/k/v/o of gqa (4 per layer + the MLPs' linears) and changes the output only by FP8 rounding;
    selective recomputation wraps q_proj, k_proj and v_proj (the per-head up-projections of this variant)."""
    from parallel.fp8 import Fp8Recipe, convert_to_fp8
    from parallel.recompute import _selective_targets

    torch.manual_seed(5)
    model = Transformer(tiny(**VARIANTS["gqa"], n_routed_experts=0))
    tokens = torch.randint(0, 512, (2, 16))
    want = model(tokens)
    counts = convert_to_fp8(model, Fp8Recipe("blockwise", emulate=True))
    assert counts["linears"] == 3 * (4 + 3)  # 3 dense layers: q, k, v, o + gate, up, down
    got = model(tokens)
    assert not torch.equal(got, want)
    rel = ((got - want).norm() / want.norm()).item()
    assert 1e-4 < rel < 0.1, rel  # E4M3 keeps 3 mantissa bits: a few % per GEMM
    attn = model.layers["1"].self_attn
    targets = _selective_targets(model.layers["1"])
    assert [m for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj) if any(m is t for t in targets)] == \
        [attn.q_proj, attn.k_proj, attn.v_proj]


def test_plan_prints_the_variant_kv_cache(capsys):
    """launch.plan's model line: GQA with 8 groups at DeepSeek-V2's shapes caches 2 x 8 x 128 per layer."""
    from types import SimpleNamespace

    from launch.plan.__main__ import print_model

    print_model(SimpleNamespace(model=load_preset("deepseek_v2").replace(attention="gqa", num_key_value_heads=8)))
    out = capsys.readouterr().out
    assert "GQA (8 K/V heads of 128) 2048 elements/layer (122880 in all, 240.0 KiB in BF16)" in out
    print_model(SimpleNamespace(model=load_preset("deepseek_v2")))
    assert "MLA 576 elements/layer" in capsys.readouterr().out
