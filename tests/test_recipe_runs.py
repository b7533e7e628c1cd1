"""DeepSeek's schedules in real runs (the entry point, gloo): a batch-size ramp-up under data and pipeline
parallelism equals one process, a killed run resumes mid-ramp bit for bit, and the MTP-weight and expert-bias
switches take effect at their step."""

import pytest
import torch
import yaml

from model import Transformer
from model.config import config_from_dict
from test_parallel_layouts import assert_same_run, final_params, run
from train.data.loader import TokenDataset, TokenLoader
from train.runtime import lm_loss
from conftest import base_args, metrics, train, train_killed

STEPS = 6
# 4 -> 12 sequences by 4 over 500 tokens of 32-token sequences (one increase per 250 tokens): two steps of 4
# (256 tokens consumed), one of 8 (512), then 12
RAMP = {"train.global_batch_size": 12, "train.rampup_batch_size": 4, "train.rampup_increment": 4,
        "train.rampup_tokens": 500}
SIZES = [4, 4, 8, 12, 12, 12]
# MTP weight 0.3 -> 0.05 from half of the run's tokens on (step index 4: 28 of 52 sequences consumed before it,
# 16 before index 3); the expert bias moves after step indices 0-4 only (40 >= 75% of 52 before index 5)
SWITCHES = {"model.num_nextn_predict_layers": 1, "train.mtp_loss_weight_after": "[0.5,0.05]",
            "train.bias_update_until": 0.75}


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ramp") / "ref"
    run(dataset, out, 1, steps=STEPS, **RAMP, **SWITCHES, **{"train.micro_batch_size": 2})
    assert [metrics(out, "batch_size")[s] for s in range(1, STEPS + 1)] == SIZES
    assert metrics(out, "tokens")[STEPS] == sum(SIZES) * 32
    return out


def test_ramp_up_feeds_its_sizes(dataset, reference):
    """Step 1 trains on the first 4 sequences of the stream, not on the global batch of 12: its loss is what
    the initial model gives those 4 (two micro-batches of 2, MTP weight 0.3), computed here in one process."""
    from model.transformer import lm_and_mtp_loss

    cfg = yaml.safe_load((reference / "config.yaml").read_text())
    model = Transformer(config_from_dict(cfg["model"]))
    model.init_weights(seed=cfg["train"]["seed"])
    stream = TokenLoader(TokenDataset(dataset, "train"), 32, 12, 2, seed=cfg["train"]["seed"])
    with torch.no_grad():
        def loss(x, y):
            return lm_and_mtp_loss(lm_loss, *model.forward_with_mtp(x), y, 0.3).item()
        first12 = [loss(x, y) for x, y in stream.next_batch()]
    assert metrics(reference)[1] == pytest.approx(sum(first12[:2]) / 2, rel=1e-5)
    assert abs(sum(first12) / 6 - sum(first12[:2]) / 2) > 1e-3  # the whole batch would have given another loss


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_ramp_up_with_switches_equals_one_process(dataset, reference, tmp_path, layout):
    """dp=2 splits every batch of the ramp-up over two ranks; pp=2 (1F1B) runs 2, 4 and 6 microbatches a step,
    a new schedule at each change, with the MTP head and its switched weight on the last stage."""
    over = {"train.micro_batch_size": 1} if layout == "dp2" else {"train.micro_batch_size": 2, "parallel.pp": 2}
    out = tmp_path / layout
    run(dataset, out, 2, steps=STEPS, **RAMP, **SWITCHES, **over)
    assert_same_run(reference, out, tmp_path, steps=range(1, STEPS + 1))


def test_killed_mid_ramp_resumes_bit_exact_under_pipelining(dataset, tmp_path):
    """Checkpoint after step 2 (batch 4), killed after step 3, resumed: its first step runs 8 sequences, a
    schedule of 8 microbatches where the interrupted process had started with 4."""
    over = {**RAMP, "train.micro_batch_size": 1, "parallel.pp": 2, "data.seq_len": 32}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(base_args(dataset, straight, STEPS, **over), 2)
    args = base_args(dataset, killed, STEPS, **over, **{"checkpoint.every": 2})
    train_killed(args, 2, killed, after_step=3, checkpoint=2)
    train(args, 2)
    assert metrics(killed) == metrics(straight)  # identical floats
    assert metrics(killed, "grad_norm") == metrics(straight, "grad_norm")
    assert [metrics(killed, "batch_size")[s] for s in range(1, STEPS + 1)] == SIZES


def test_switches_take_effect_at_their_step(dataset, tmp_path):
    """Against the same run without them: equal up to the switch; then the MTP term's weight drops from 0.3 to
    0.05 (the loss falls by 0.25 x the MTP loss), and the expert bias stays where step 5 left it."""
    common = {"model.num_nextn_predict_layers": 1, "train.micro_batch_size": 4, "checkpoint.every": 5, **RAMP}
    plain, switched = tmp_path / "plain", tmp_path / "switched"
    run(dataset, plain, 1, steps=STEPS, **common)
    run(dataset, switched, 1, steps=STEPS, **{**common, **SWITCHES})
    a, b = metrics(plain), metrics(switched)
    assert [b[s] for s in range(1, 5)] == [a[s] for s in range(1, 5)]  # steps 1-4 (indices 0-3): weight 0.3
    drop = a[5] - b[5]  # same weights entering step 5: 0.25 x that step's MTP loss, itself near the LM loss
    assert 0.25 * 0.5 * b[5] < drop < 0.25 * 2 * b[5]
    at5, at6 = (_expert_bias(switched, step, tmp_path) for step in (5, 6))
    assert any(t.abs().sum() > 0 for t in at5.values())
    assert all(torch.equal(at5[k], at6[k]) for k in at5)  # no update after step 6 (index 5)
    moved5, moved6 = (_expert_bias(plain, step, tmp_path) for step in (5, 6))
    assert not all(torch.equal(moved5[k], moved6[k]) for k in moved5)  # without the switch it would have moved


def _expert_bias(out, step: int, tmp) -> dict[str, torch.Tensor]:
    """The expert-bias buffers of the run's checkpoint at `step`."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dest = tmp / f"{out.name}_{step}.pt"
    dcp_to_torch_save(str(out / "checkpoints" / f"step_{step:08d}"), str(dest))
    return {k: v for k, v in torch.load(dest, weights_only=False)["model"].items() if k.endswith("expert_bias")}


# mscale 10: YaRN's attention temperature (x5.7 here) makes the switch show in a barely trained model's loss
YARN = ("{type:yarn,factor:4,original_max_position_embeddings:16,beta_fast:32,beta_slow:1,mscale:10,"
        "mscale_all_dim:10}")


def test_init_from_starts_a_new_run_from_another_runs_weights(dataset, tmp_path):
    """DeepSeek's long-context extension in small: a new run (two processes, YaRN switched on) from a finished
    run's weights. Its first loss is what those weights (expert biases included) give its first batch, computed
    here in one process; step, optimizer and data start afresh."""
    src, new = tmp_path / "src", tmp_path / "new"
    run(dataset, src, 1, steps=3, **{"train.micro_batch_size": 4})
    run(dataset, new, 2, steps=2,
        **{"train.micro_batch_size": 2, "checkpoint.init_from": src, "model.rope_scaling": YARN})
    cfg = yaml.safe_load((new / "config.yaml").read_text())
    model = Transformer(config_from_dict(cfg["model"]))
    assert model.cfg.rope_scaling["factor"] == 4
    missing, unexpected = model.load_state_dict(final_params(src, tmp_path), strict=False)
    assert not missing and not unexpected
    assert any(b.abs().sum() > 0 for n, b in model.named_buffers() if n.endswith("expert_bias"))
    x, y = TokenLoader(TokenDataset(dataset, "train"), 32, 4, 4).next_batch()[0]
    with torch.no_grad():
        want = lm_loss(model(x), y).item()
    assert metrics(new)[1] == pytest.approx(want, rel=1e-6)
    assert sorted(metrics(new)) == [1, 2] and metrics(new, "tokens")[1] == 4 * 32
    plain = yaml.safe_load((src / "config.yaml").read_text())
    with torch.no_grad():  # without YaRN the same weights give another loss, well outside the bound above
        other = Transformer(config_from_dict(plain["model"]))
        other.load_state_dict(final_params(src, tmp_path), strict=False)
        assert abs(lm_loss(other(x), y).item() - want) > 2e-5 * want


def test_init_from_a_different_model_is_one_clear_error(dataset, tmp_path):
    src = tmp_path / "src"
    run(dataset, src, 1, steps=1, **{"train.micro_batch_size": 4})
    proc = train(base_args(dataset, tmp_path / "new", 1, **{"checkpoint.init_from": src, "model.hidden_size": 96}),
                 check=False)
    assert proc.returncode == 1
    assert "checkpoint error: checkpoint.init_from: no checkpoint there loads into this model" in proc.stderr
    assert "step_00000001" in proc.stderr.strip().splitlines()[-1]
