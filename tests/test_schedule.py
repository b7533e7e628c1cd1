"""DeepSeek's training schedules: the batch-size ramp-up, learning rates placed by tokens, the V3 schedule, the
MTP-weight and expert-bias switches, and the `experiment=` recipes, against hand computations and the papers."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import compose_config
from train.config import ConfigError
from train.optim import lr_factor
from train.schedule import BatchSchedule, RunPosition

ROOT = Path(__file__).resolve().parent.parent


def test_ramp_up_sizes_by_hand():
    # 8 -> 32 by 8 over 20,000 tokens of 256-token sequences: one increase per 20,000 / 3 = 6,666.7 tokens.
    # Steps of 8 sequences (2,048 tokens) until 8,192 tokens, two of 16 (until 16,384 >= 13,333.3), one of 24
    # (22,528 >= 20,000), then 32.
    b = BatchSchedule(32, 256, start=8, increment=8, ramp_tokens=20_000)
    assert [b.size(s) for s in range(10)] == [8, 8, 8, 8, 16, 16, 24, 32, 32, 32]
    assert [b.sequences_before(s) for s in range(9)] == [0, 8, 16, 24, 32, 48, 64, 88, 120]
    assert b.sequences_before(100) == 88 + 93 * 32
    assert sorted({b.size(s) for s in range(20)}) == [8, 16, 24, 32]
    constant = BatchSchedule(32, 256)
    assert not constant.ramps and {constant.size(s) for s in range(20)} == {32}
    assert [constant.sequences_before(s) for s in (0, 1, 7)] == [0, 32, 224] and constant.size(5) == 32


def test_eta_counts_sequences_not_steps():
    """4 steps (32 sequences) in 8 s: 1 s per 4 sequences. Steps 4-9 hold 16+16+24+32+32+32 = 152 sequences:
    38 s (counting steps would say 12 s). Resumed at step 4, 2 steps (32 sequences) in 8 s: 120 left, 30 s."""
    b = BatchSchedule(32, 256, start=8, increment=8, ramp_tokens=20_000)
    assert b.seconds_left(0, 4, 10, 8.0) == pytest.approx(38.0)
    assert b.seconds_left(4, 6, 10, 8.0) == pytest.approx(30.0)
    assert BatchSchedule(32, 256).seconds_left(0, 120, 1000, 60.0) == pytest.approx(440.0)


def test_deepseek_v2_ramp_up_reaches_9216_after_225b_tokens():
    """2,304 -> 9,216 in six steps of 1,152 (conf/experiment/deepseek_v2.yaml): each size starts with the first
    step after another 37.5B tokens, and the batch is 9,216 from the first step after 225B tokens on."""
    b = BatchSchedule(9216, 4096, start=2304, increment=1152, ramp_tokens=225e9)
    tokens = lambda s: b.sequences_before(s) * 4096  # noqa: E731
    first_of = {}
    for s in range(20_000):
        first_of.setdefault(b.size(s), s)
    assert sorted(first_of) == [2304, 3456, 4608, 5760, 6912, 8064, 9216]
    for k, size in enumerate(sorted(first_of)):
        s = first_of[size]
        assert k == 0 or tokens(s - 1) < k * 37.5e9 <= tokens(s), size
    assert tokens(first_of[9216]) - 225e9 < 8064 * 4096  # the ramp ends within one step of 225B tokens


@pytest.mark.parametrize("schedule", ["deepseek_step", "cosine"])
def test_lr_schedule_is_placed_by_tokens_under_a_ramp_up(schedule):
    """With the batch above, 30 steps consume 120 + 22 * 32 = 824 sequences: 60% of them (494.4) are consumed
    before step 20 (120 + 11 * 32 = 472 < 494.4 <= 504), not before step 18 (60% of the steps)."""
    cfg = compose_config([f"optim.schedule={schedule}", "optim.warmup_steps=2"]).optim
    run = RunPosition(BatchSchedule(32, 256, start=8, increment=8, ramp_tokens=20_000), total=30)
    assert run(30) == 824 / 32 and run(20) == 504 / 32
    factors = [lr_factor(s, 30, cfg, run) for s in range(30)]
    if schedule == "deepseek_step":
        assert factors[19] == 1.0 and factors[20] == pytest.approx(0.316)  # steps alone: decay at step 18
        assert lr_factor(18, 30, cfg) == pytest.approx(0.316)
        tokens_90 = next(s for s in range(30) if run(s) >= 0.9 * run(30))
        assert factors[tokens_90 - 1] == pytest.approx(0.316) and factors[tokens_90] == pytest.approx(0.316 ** 2)
    else:  # the cosine's progress is the fraction of tokens between the end of warmup and the end of the run
        progress = (run(10) - run(2)) / (run(30) - run(2))
        assert factors[10] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert progress == 5.25 / 25.25  # (184 - 16) / (824 - 16) sequences
    # without a ramp-up the position is the step itself: the same numbers as the step-based schedule
    flat = RunPosition(BatchSchedule(32, 256), total=30)
    assert all(lr_factor(s, 30, cfg, flat) == lr_factor(s, 30, cfg) for s in range(30))


def test_deepseek_v3_learning_rate_by_hand():
    """optim=deepseek_v3 over a run of 14,800 constant-batch steps, one per billion tokens: 2.2e-4 until 10T,
    a cosine to 2.2e-5 by 14.3T, 2.2e-5 until 14.633T, then 7.3e-6 (DeepSeek-V3 section 4.2)."""
    cfg = compose_config(["optim=deepseek_v3"]).optim
    lr = lambda s: cfg.lr * lr_factor(s, 14_800, cfg)  # noqa: E731
    assert lr(999) == pytest.approx(2.2e-4 * 1000 / 2000)  # warmup over the first 2K steps
    assert lr(2000) == lr(9999) == pytest.approx(2.2e-4)
    assert lr(12_150) == pytest.approx(2.2e-5 + (2.2e-4 - 2.2e-5) * 0.5, rel=1e-3)  # half-way down the cosine
    assert lr(14_300) == pytest.approx(2.2e-5) and lr(14_632) == pytest.approx(2.2e-5)
    assert lr(14_634) == pytest.approx(7.3e-6, rel=1e-4) and lr(14_799) == pytest.approx(7.3e-6, rel=1e-4)


def test_mtp_weight_and_bias_switch_at_token_fractions():
    t = compose_config(["train.mtp_loss_weight_after=[0.5,0.1]", "train.bias_update_until=0.75"]).train
    run = RunPosition(BatchSchedule(32, 256, start=8, increment=8, ramp_tokens=20_000), total=30)
    half = next(s for s in range(30) if run(s) >= 0.5 * run(30))  # 412 of the 824 sequences consumed before it
    assert half == 18 and run(17) * 32 == 408 and run(18) * 32 == 440
    weights = [run.mtp_loss_weight(s, t, 0.3) for s in range(30)]
    assert weights[:half] == [0.3] * half and weights[half:] == [0.1] * (30 - half)
    last = max(s for s in range(30) if run.bias_updates(s, t))
    assert run(last) < 0.75 * run(30) <= run(last + 1)
    plain = compose_config([]).train
    assert all(run.mtp_loss_weight(s, plain, 0.3) == 0.3 and run.bias_updates(s, plain) for s in range(30))


def test_experiments_are_deepseeks_recipes():
    v2 = compose_config(["experiment=deepseek_v2"])
    got = (v2.model.hidden_size, v2.optim.lr, v2.optim.schedule, v2.precision.name)
    assert got == (5120, 2.4e-4, "deepseek_step", "bf16")
    b = BatchSchedule.of(v2.train, v2.data.seq_len)
    assert (b.start, b.final, b.ramp_tokens, v2.data.seq_len) == (2304, 9216, 225e9, 4096)
    assert b.sequences_before(v2.train.steps) * 4096 == pytest.approx(8.1e12, rel=1e-5)
    lite = compose_config(["experiment=deepseek_v2_lite"])
    assert (lite.model.hidden_size, lite.optim.lr, lite.optim.step_decay_at, lite.train.global_batch_size) == \
        (2048, 4.2e-4, (0.8, 0.9), 4608)
    assert lite.train.steps * 4608 * 4096 == pytest.approx(5.7e12, rel=1e-5)
    v3 = compose_config(["experiment=deepseek_v3"])
    assert (v3.model.hidden_size, v3.precision.name, v3.precision.moment_dtype) == (7168, "fp8_blockwise", "bfloat16")
    b3 = BatchSchedule.of(v3.train, 4096)
    total = b3.sequences_before(v3.train.steps) * 4096
    assert (b3.start, b3.final, b3.ramp_tokens) == (3072, 15360, 469e9) and total == pytest.approx(14.8e12, rel=1e-5)
    assert v3.train.mtp_loss_weight_after[0] * 14.8 == pytest.approx(10, rel=1e-5)
    assert v3.train.bias_update_until * 14.8 == pytest.approx(14.3, rel=1e-5)
    assert v3.optim.cosine_span[0] * 14.8 == pytest.approx(10, rel=1e-5)
    assert v3.optim.lr * v3.optim.min_lr_ratio * v3.optim.step_decay_factor == pytest.approx(7.3e-6, rel=1e-5)
    for cfg in (v2, lite, v3):  # pretraining runs plain RoPE; the presets' YaRN belongs to the extension
        assert cfg.model.rope_scaling is None and cfg.model.max_position_embeddings == 4096


@pytest.mark.parametrize("name,seq_len,batch,lr,mscale", [
    ("deepseek_v2_long_context", 32768, 576, 2.4e-5, 0.707),   # V2 3.1.4; lr: the last pretraining rate (assumed)
    ("deepseek_v3_long_context_32k", 32768, 1920, 7.3e-6, 1.0),  # V3 4.3
    ("deepseek_v3_long_context_128k", 131072, 480, 7.3e-6, 1.0),
])
def test_long_context_experiments_continue_a_run_with_yarn(name, seq_len, batch, lr, mscale):
    with pytest.raises(ConfigError, match="checkpoint.init_from is a placeholder"):
        compose_config([f"experiment={name}"])
    cfg = compose_config([f"experiment={name}", "checkpoint.init_from=/runs/pretrained"])
    yarn = cfg.model.rope_scaling
    assert (yarn["type"], yarn["factor"], yarn["beta_fast"], yarn["beta_slow"], yarn["mscale_all_dim"]) == \
        ("yarn", 40, 32, 1, mscale)  # sqrt(t) = 0.1 * mscale * ln(s) + 1: 0.0707 ln s + 1 (V2), 0.1 ln s + 1 (V3)
    assert (cfg.data.seq_len, cfg.train.global_batch_size, cfg.train.steps) == (seq_len, batch, 1000)
    assert cfg.optim.lr * lr_factor(0, 1000, cfg.optim) == cfg.optim.lr * lr_factor(999, 1000, cfg.optim) == lr


@pytest.mark.parametrize("overrides,fragment", [
    (["train.rampup_batch_size=16"], "must lie in (0, train.global_batch_size=16)"),
    (["train.rampup_batch_size=8", "train.rampup_increment=3", "train.rampup_tokens=1e4"], "must be > 0 and divide"),
    (["train.rampup_batch_size=8", "train.rampup_increment=8"], "train.rampup_tokens must be > 0"),
    (["train.rampup_batch_size=4", "train.rampup_increment=4", "train.rampup_tokens=1e4"],
     "multiples of train.micro_batch_size=8"),
    (["train.mtp_loss_weight_after=[1.5,0.1]"], "train.mtp_loss_weight_after must be"),
    (["train.bias_update_until=2"], "train.bias_update_until must lie in [0, 1]"),
    (["optim.cosine_span=[0.9,0.5]"], "optim.cosine_span must be two fractions"),
    (["parallel.pp=2", "parallel.pp_microbatches=2", "train.rampup_batch_size=8", "train.rampup_increment=8",
      "train.rampup_tokens=1e4", "train.global_batch_size=32"], "set parallel.pp_microbatches=0, got 2"),
])
def test_bad_schedule_config_names_the_numbers(overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)) as e:
        compose_config(overrides)
    assert "\n" not in str(e.value)


def test_a_ramp_up_that_does_not_split_over_the_ranks_is_exit_2(tmp_path):
    """Checked when the data-parallel size is known (start-up), before anything is written."""
    args = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.rampup_batch_size=2",
            "train.rampup_increment=2", "train.rampup_tokens=1e4", f"output_dir={tmp_path / 'run'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and not (tmp_path / "run").exists()
    lines = [line for line in proc.stderr.splitlines() if line.startswith("config error")]
    want = "train.rampup_batch_size=2 is not divisible by data-parallel ranks x micro_batch_size = 2 x 2"
    assert lines and want in lines[0]
