"""train.fused_loss: the head and cross-entropy through DeepSpeed's fused vocabulary-parallel linear cross-entropy
give the loss and gradients of the logits path, in one process and under tp, pp and cp (2 gloo processes each,
against a single-process run with the logits path)."""

import os

import pytest
import torch
from torch.nn import functional as F

from model import Transformer
from model.config import load_preset
from model.transformer import lm_and_mtp_loss
from parallel.deepspeed_ops import fused_lm_loss
from test_parallel_layouts import BALANCE, assert_same_run
from conftest import base_args, metrics, train


def lm_loss(logits, labels):
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def _loss_and_grads(cfg, fused: bool, tokens, labels):
    torch.manual_seed(0)
    model = Transformer(cfg, return_head_input=fused)
    loss_fn = fused_lm_loss(model) if fused else lm_loss
    logits, mtp = model.forward_with_mtp(tokens)
    loss = lm_and_mtp_loss(loss_fn, logits, mtp, labels, 0.3)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_loss_equals_logits_path_in_one_process():
    cfg = load_preset("tiny")
    cfg.vocab_size, cfg.num_nextn_predict_layers = 1000, 2  # a vocabulary that is no multiple of the block size
    tokens = torch.randint(0, cfg.vocab_size, (3, 37), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, cfg.vocab_size, (3, 37), generator=torch.Generator().manual_seed(2))
    want, want_grads = _loss_and_grads(cfg, False, tokens, labels)
    got, got_grads = _loss_and_grads(cfg, True, tokens, labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert got_grads.keys() == want_grads.keys() and "lm_head.weight" in got_grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


FUSED = {"model.num_nextn_predict_layers": 1, "data.seq_len": 32, "train.micro_batch_size": 2}
LAYOUTS = {"tp2": {"parallel.tp": 2}, "pp2": {"parallel.pp": 2}, "cp2": {"parallel.cp": 2}}


@pytest.fixture(scope="module")
def logits_reference(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "ref"
    train(base_args(dataset, out, 3, **{**BALANCE, **FUSED, "train.fused_loss": "false"}))
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_loss_under_layout_equals_logits_path(dataset, logits_reference, tmp_path, layout):
    """Losses (rel 1e-5), gradient norms and the weights after 3 steps (rel 1e-4) of the fused loss on 2 ranks
    equal the single-process logits path, MTP depth included."""
    out = tmp_path / layout
    train(base_args(dataset, out, 3, **{**BALANCE, **FUSED, "train.fused_loss": "true", **LAYOUTS[layout]}), 2)
    assert_same_run(logits_reference, out, tmp_path)


@pytest.mark.parametrize("precision", ["bf16"])
def test_fused_loss_under_precision_recipes(dataset, tmp_path, precision):
    """The head stays out of FP8 and runs in the recipe's compute dtype, fused or not: the same first-step loss
    (the same logits, whose cross-entropy is fp32 either way) and close later ones (backward sums in another order)."""
    over = {"model.num_nextn_predict_layers": 1, "data.seq_len": 32}
    if precision.startswith("fp8"):
        over.update({"precision.param_dtype": "float32", "precision.fp8_emulate": "true", "precision.fp8_block": 16})
    runs = {}
    for fused in ("false", "true"):
        runs[fused] = tmp_path / fused
        train(base_args(dataset, runs[fused], 2, **over, **{"train.fused_loss": fused}) + [f"precision={precision}"])
    want, got = metrics(runs["false"]), metrics(runs["true"])
    assert got[1] == pytest.approx(want[1], rel=1e-5)
    assert got[2] == pytest.approx(want[2], rel=1e-3) and got[2] != want[1]


def test_unusable_deepspeed_is_one_config_error_line(dataset, tmp_path):
    fake = tmp_path / "site" / "deepspeed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('deepspeed is broken here')\n")
    env = {"PYTHONPATH": f"{fake.parent}:{os.environ.get('PYTHONPATH', '')}"}
    proc = train(base_args(dataset, tmp_path / "run", 1, **{"train.fused_loss": "true"}), env_extra=env, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.fused_loss" in lines[0] and "deepspeed is broken here" in lines[0], lines


@pytest.mark.parametrize("overrides,on", [([], False), (["model=small"], False), (["train.fused_loss=true"], True),
                                          (["model=deepseek_v2"], True), (["experiment=deepseek_v3"], True),
                                          (["model=deepseek_v2_lite", "train.fused_loss=false"], False)])
def test_fused_loss_default_follows_the_vocabulary(overrides, on):
    from train.__main__ import compose_config
    from train.config import fused_loss_on

    assert fused_loss_on(compose_config(overrides)) is on
