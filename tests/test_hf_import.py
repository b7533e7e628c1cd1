"""Hugging Face weights into a run under any layout (`checkpoint.init_from=<HF dir>`).

Directories are written by transformers from random tiny DeepseekV2 / DeepseekV3 models (V3: sigmoid scores,
noaux_tc, a non-zero e_score_correction_bias). The run's first loss, under one process and under 2-process
layouts (ep, tp, pp, cp, HSDP), equals the cross-entropy transformers computes on the same batch; under the
emulated FP8 recipes the loaded master weights equal the directory's tensors and the first loss is the FP8
model's.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,  # noqa: E402
                          DeepseekV3ForCausalLM)

from model import Transformer  # noqa: E402
from train.hf.format import config_to_hf, hf_items  # noqa: E402
from conftest import base_args, metrics, tiny, train  # noqa: E402
from parallel.fp8 import Fp8Recipe, convert_to_fp8  # noqa: E402
from train.data.loader import TokenDataset, TokenLoader  # noqa: E402
from safetensors import safe_open  # noqa: E402
from train.hf.load import HFReader, check_hf_dir, load_hf_weights  # noqa: E402

SEQ = 32
V3_RUN = {"model.scoring_func": "sigmoid", "model.topk_method": "noaux_tc", "model.aux_loss_free_bias": "true",
          "model.norm_topk_prob": "true", "model.routed_scaling_factor": 2.5}


def hf_dict(cfg) -> dict:
    d = config_to_hf(cfg)
    d.pop("torch_dtype")
    return d


def write_v2(directory: Path, seed: int = 0) -> DeepseekV2ForCausalLM:
    torch.manual_seed(seed)
    ref = DeepseekV2ForCausalLM(DeepseekV2Config(**hf_dict(tiny()), attn_implementation="eager")).eval()
    ref.save_pretrained(directory, max_shard_size="200KB")  # sharded, with an index
    return ref


def write_v3(directory: Path, seed: int = 0, extra: dict | None = None) -> DeepseekV3ForCausalLM:
    cfg = tiny(scoring_func="sigmoid", topk_method="noaux_tc", aux_loss_free_bias=True, norm_topk_prob=True,
               routed_scaling_factor=2.5, num_nextn_predict_layers=1)
    torch.manual_seed(seed)
    ref = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_dict(cfg), attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, b in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape) * 0.2)  # large enough to change which experts win
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()} | (extra or {})
    ref.save_pretrained(directory, state_dict=sd)
    return ref


def first_batch(dataset: Path) -> list:
    loader = TokenLoader(TokenDataset(dataset, "train"), seq_len=SEQ, global_batch_size=4, micro_batch_size=2,
                         dp_rank=0, dp_world=1, seed=0)
    return loader.next_batch()


def hf_loss(ref, batches) -> float:
    with torch.no_grad():
        losses = [F.cross_entropy(ref(x).logits.flatten(0, 1), y.flatten()) for x, y in batches]
    return float(torch.stack(losses).mean())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, dataset):
    base = tmp_path_factory.mktemp("hf")
    v2, v3 = write_v2(base / "v2"), write_v3(base / "v3")
    batches = first_batch(dataset)
    return {"v2": (base / "v2", hf_loss(v2, batches)), "v3": (base / "v3", hf_loss(v3, batches))}


def first_loss(dataset, out, src, nproc=1, **over) -> float:
    train(base_args(dataset, out, 1, **{"data.seq_len": SEQ, "checkpoint.init_from": src, **over}), nproc)
    return metrics(out)[1]


@pytest.mark.parametrize("kind,layout,nproc", [
    ("v2", {}, 1),
    ("v2", {"parallel.ep": 2}, 2), ("v2", {"parallel.tp": 2}, 2), ("v3", {"parallel.pp": 2}, 2),
    ("v3", {"parallel.cp": 2}, 2), ("v2", {"parallel.dp_replicate": 2}, 2),
], ids=["one", "ep2", "tp2", "v3_pp2", "v3_cp2", "hsdp2"])
def test_init_from_hf_gives_transformers_first_loss(dataset, dirs, tmp_path, kind, layout, nproc):
    src, want = dirs[kind]
    got = first_loss(dataset, tmp_path / "run", src, nproc, **layout, **(V3_RUN if kind == "v3" else {}))
    assert math.isclose(got, want, rel_tol=1e-5), (got, want)


def test_v3_mtp_layer_and_fp8_blocks_map_onto_ours(tmp_path):
    """An MTP layer (index num_hidden_layers) lands in mtp.0; FP8 weights with 128x128 scale_inv blocks are
    dequantized block by block (a weight spanning 2 x 3 blocks, scales all different)."""
    n = 4
    mtp = {f"model.layers.{n}.enorm.weight": torch.rand(320), f"model.layers.{n}.hnorm.weight": torch.rand(320),
           f"model.layers.{n}.eh_proj.weight": torch.randn(320, 640),
           f"model.layers.{n}.shared_head.norm.weight": torch.rand(320)}
    cfg = tiny(scoring_func="sigmoid", topk_method="noaux_tc", aux_loss_free_bias=True, norm_topk_prob=True,
               routed_scaling_factor=2.5, num_nextn_predict_layers=1, vocab_size=300, hidden_size=320)
    w = torch.randn(300, 320)
    q = w.to(torch.float8_e4m3fn)
    scales = torch.rand(3, 3) + 0.5
    fp8 = {"lm_head.weight": q, "lm_head.weight_scale_inv": scales}
    d = tmp_path / "v3"
    torch.manual_seed(0)
    ref = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_dict(cfg), attn_implementation="eager"))
    extra = dict(mtp)
    for k, v in ref.state_dict().items():
        name = k.replace(".layers.1.", f".layers.{n}.")
        if k.startswith("model.layers.1.") and name not in extra:  # the MTP block's other tensors
            extra[name] = v.clone()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()} | extra | fp8
    ref.save_pretrained(d, state_dict=sd)
    ours = Transformer(cfg)
    load_hf_weights(d, [ours], cfg)
    p = dict(ours.named_parameters())
    assert torch.equal(p["mtp.0.enorm.weight"], mtp[f"model.layers.{n}.enorm.weight"])
    assert torch.equal(p["mtp.0.eh_proj.weight"], mtp[f"model.layers.{n}.eh_proj.weight"])
    assert torch.equal(p["mtp.0.norm.weight"], mtp[f"model.layers.{n}.shared_head.norm.weight"])
    for name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "self_attn.kv_b_proj.weight"):
        assert torch.equal(p[f"mtp.0.block.{name}"], p[f"layers.1.{name}"]), name  # the file holds copies
    want = q.float() * scales.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :320]
    assert torch.equal(p["lm_head.weight"], want)
    # pieces as a sharded layout asks for them: FP8 blocks cut mid-block, expert columns across gate | up
    checked = check_hf_dir(d, cfg)
    files = checked.files
    reader = HFReader(checked.sources, files, cfg, checked.block)
    with safe_open(str(files["lm_head.weight"]), framework="pt") as h:
        reader._handles = {files["lm_head.weight"]: h}
        assert torch.equal(reader.read("lm_head.weight", (slice(100, 250), slice(130, 300))), want[100:250, 130:300])
        piece = (slice(2, 5), slice(7, 300), slice(20, 45))  # experts 2..4, inputs 7..299, gate 20..31 + up 0..12
        got = reader.read("layers.2.mlp.experts.gate_up_proj", piece)
    assert torch.equal(got, p["layers.2.mlp.experts.gate_up_proj"][piece])


# ------------------------------------------------------------------------------------------ FP8 recipes
FP8_CASES = [("tensorwise", False), ("rowwise", False), ("blockwise", False), ("tensorwise", True)]


def to_fp8(model: Transformer, granularity: str, all_gather: bool = False) -> Transformer:
    """The model converted to an emulated FP8 recipe (parallel/fp8.py)."""
    convert_to_fp8(model, Fp8Recipe(granularity, emulate=True, fsdp_all_gather=all_gather))
    return model


def bf16_loss(model, batches) -> float:
    """The mean first-step loss as a one-process bf16-autocast run computes it (train/trainer.py)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()) for x, y in batches]
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("granularity,all_gather", FP8_CASES,
                         ids=["tensorwise", "rowwise", "blockwise", "tensorwise_fp8_all_gather"])
def test_fp8_model_loads_the_hf_tensors_exactly(dirs, granularity, all_gather):
    """Into a model already converted to FP8 (torchao's Float8Linear, the blockwise forward, or weights wrapped
    for FP8 all-gather), every high-precision master weight equals the directory's tensor bit for bit, and the
    FP8 forward equals that of a model loaded unconverted and converted afterwards."""
    d = dirs["v2"][0]
    cfg, want = tiny(), {}
    for f in sorted(d.glob("*.safetensors")):  # the Hub's per-expert layout, as the directory holds it
        with safe_open(str(f), framework="pt") as h:
            want |= {k: h.get_tensor(k) for k in h.keys()}
    model = Transformer(cfg)
    model.init_weights(seed=1)
    to_fp8(model, granularity, all_gather)  # before loading, as parallelize converts a run's model
    wrapped = type(model.layers["1"].mlp.shared_experts.up_proj.weight).__name__
    assert wrapped == ("WeightWithDynamicFloat8CastTensor" if all_gather else "Parameter")
    load_hf_weights(d, [model], cfg)
    checked = 0
    for name, p in model.named_parameters():
        for hf, t in hf_items(cfg, name, p.detach()):
            assert torch.equal(t, want[hf]), hf
            checked += 1
    assert checked == len(want)
    after = Transformer(cfg)
    load_hf_weights(d, [after], cfg)
    to_fp8(after, granularity, all_gather)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), after(tokens))


@pytest.mark.parametrize("precision", ["fp8_rowwise", "fp8_blockwise"])
def test_init_from_hf_under_fp8_gives_the_fp8_models_first_loss(dataset, dirs, tmp_path, precision):
    """A run under an emulated FP8 recipe started from the directory takes the first loss of the FP8 model
    holding the directory's weights (to 1e-5; FP8 rounding moves the loss 2e-4 to 6e-4 off the bf16 run's, so a
    run that computed in bf16, or loaded other weights, fails), and differs from the bf16 run's by under 1%."""
    d = dirs["v2"][0]
    cfg = tiny()
    batches = first_batch(dataset)
    ours = Transformer(cfg)
    load_hf_weights(d, [ours], cfg)
    want16 = bf16_loss(ours, batches)
    want8 = bf16_loss(to_fp8(ours, precision[4:]), batches)
    got8 = first_loss(dataset, tmp_path / "fp8", d, **{"precision": precision, "precision.fp8_emulate": "true"})
    got16 = first_loss(dataset, tmp_path / "bf16", d, precision="bf16")
    assert math.isclose(got8, want8, rel_tol=1e-5), (got8, want8)
    assert math.isclose(got16, want16, rel_tol=1e-5), (got16, want16)
    assert got8 != got16 and abs(got8 / got16 - 1) < 0.01, (got8, got16)


def test_init_from_hf_under_fsdp_with_fp8_all_gather_equals_one_process(dataset, dirs, tmp_path):
    """fp8_tensorwise with FSDP2 all-gathering the dense weights in FP8 (dp=2, the weights sharded and wrapped
    before the directory's tensors go in) takes the one-process FP8 run's first loss: one micro-batch of one
    sequence per FP8 cast, as in the one-process run, and fp32 compute, so only the order of fp32 sums differs
    (1e-5 is ~80x fp32's unit roundoff over a loss of ~6). A run that left the weights at their initialisation
    or skipped the FP8 cast would differ: the same run without FP8 is asserted to be further off."""
    d = dirs["v2"][0]
    fp8 = {"precision": "fp8_tensorwise", "precision.fp8_emulate": "true", "precision.param_dtype": "float32",
           "train.micro_batch_size": 1}
    one = first_loss(dataset, tmp_path / "one", d, **fp8)
    gathered = first_loss(dataset, tmp_path / "fsdp", d, 2, **fp8, **{"precision.fp8_fsdp_all_gather": "true"})
    plain = first_loss(dataset, tmp_path / "fp32", d, **{"precision": "fp32", "train.micro_batch_size": 1})
    assert math.isclose(gathered, one, rel_tol=1e-5), (gathered, one)
    assert abs(one - plain) > 10 * abs(gathered - one), (one, gathered, plain)


# ------------------------------------------------------------------------------------------ bad input
def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_bad_directories_are_one_line_and_write_nothing(dataset, dirs, tmp_path):
    src = dirs["v2"][0]
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    missing = _copy(src, tmp_path / "missing")
    (missing / shard).unlink()
    other = _copy(src, tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "kv_lora_rank": 24}))
    cases = [(missing, 1, shard), (other, 2, "kv_lora_rank")]
    for d, rc, fragment in cases:
        out = tmp_path / f"run_{d.name}"
        proc = train(base_args(dataset, out, 1, **{"data.seq_len": SEQ, "checkpoint.init_from": d}), check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == rc, proc.stderr[-2000:]
        assert fragment in lines[-1] and str(d.name) in lines[-1], lines[-1]
        assert not out.exists()  # nothing written to output_dir


@pytest.mark.parametrize("bad,fragment", [(torch.zeros(7, 64), "shape (7, 64)"),
                                          (torch.zeros(512, 64, dtype=torch.int64), "dtype I64")])
def test_wrong_shape_or_dtype_names_file_and_tensor(tmp_path, bad, fragment):
    from safetensors.torch import save_file

    from train.hf.load import HFWeightsError

    cfg = tiny()
    torch.manual_seed(0)
    ref = DeepseekV2ForCausalLM(DeepseekV2Config(**hf_dict(cfg)))
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()} | {"model.embed_tokens.weight": bad}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_dict(cfg) | {"model_type": "deepseek_v2"}))
    with pytest.raises(HFWeightsError, match=re.escape(fragment)) as e:
        check_hf_dir(tmp_path, cfg)
    assert "model.safetensors" in str(e.value) and "'model.embed_tokens.weight'" in str(e.value)


def test_a_directory_without_weights_is_not_a_model(tmp_path):
    from train.hf.load import HFWeightsError

    (tmp_path / "config.json").write_text(json.dumps(hf_dict(tiny()) | {"model_type": "deepseek_v2"}))
    with pytest.raises(HFWeightsError, match=r"is not a Hugging Face model directory: no \*\.safetensors"):
        check_hf_dir(tmp_path, tiny())
