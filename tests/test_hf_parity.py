"""External parity: transformers' DeepseekV2ForCausalLM is the reference for the model math."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM  # noqa: E402

from train.hf.format import config_from_hf, from_hf, to_hf  # noqa: E402
from model import Transformer  # noqa: E402

YARN = {"type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
        "mscale_all_dim": 0.707, "original_max_position_embeddings": 32}

CASES = {
    "qlora_greedy": dict(q_lora_rank=24, topk_method="greedy", n_group=1, topk_group=1, rope_scaling=None),
    "noq_group_limited": dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                              rope_scaling=None, routed_scaling_factor=2.5),
    "qlora_group_yarn": dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                             rope_scaling=YARN),
    "noq_greedy_yarn_dense0": dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
                                   rope_scaling=YARN, first_k_dense_replace=0),
}


def hf_config(**over) -> DeepseekV2Config:
    kw = dict(vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=16, num_hidden_layers=3,
              num_attention_heads=4, kv_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10,
              n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
              max_position_embeddings=256, rope_theta=10000.0, routed_scaling_factor=1.0,
              norm_topk_prob=False, initializer_range=0.1, attn_implementation="eager")
    kw.update(over)
    return DeepseekV2Config(**kw)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("case", list(CASES))
def test_from_hf_matches_transformers(tmp_path, case):
    torch.manual_seed(0)
    ref = DeepseekV2ForCausalLM(hf_config(**CASES[case])).eval()
    ref.save_pretrained(tmp_path)
    ours = from_hf(tmp_path).eval()
    tokens = torch.randint(0, 96, (2, 40))
    want, got = hf_logits(ref, tokens), ours(tokens).detach()
    assert want.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["qlora_group_yarn", "noq_greedy_yarn_dense0"])
def test_to_hf_loads_back_into_transformers(tmp_path, case):
    torch.manual_seed(1)
    cfg = config_from_hf(hf_config(**CASES[case]).to_dict())
    ours = Transformer(cfg.replace(initializer_range=0.1)).eval()
    to_hf(ours, tmp_path, max_shard_bytes=40_000)  # force several shards
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ref = DeepseekV2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = torch.randint(0, 96, (2, 40))
    torch.testing.assert_close(hf_logits(ref, tokens), ours(tokens).detach(), atol=1e-4, rtol=1e-4)
    # and the round trip through our own loader is exact
    again = from_hf(tmp_path).eval()
    assert torch.equal(again(tokens), ours(tokens))


def test_from_hf_rejects_foreign_tensor(tmp_path):
    torch.manual_seed(0)
    ref = DeepseekV2ForCausalLM(hf_config(**CASES["qlora_greedy"]))
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    sd["model.layers.0.self_attn.bogus.weight"] = torch.zeros(2, 2)
    ref.save_pretrained(tmp_path, state_dict=sd)
    with pytest.raises(ValueError, match="bogus"):
        from_hf(tmp_path)
