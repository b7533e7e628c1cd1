"""What a resumed run records and may change (train/resume.py), and loss spikes (train/spike.py): a non-finite
loss is one line; a poisoned batch of data is rolled back over and skipped, the run then equal to one whose
data never had that batch, and equal again after a kill and resume."""

import json
import random
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import PY, ROOT, base_args, metrics, newest_checkpoint, train, train_killed
from train.checkpoint import seal
from train.data.loader import TokenDataset, TokenLoader
from train.optim import lr_factor
from train.config import compose_config


# ------------------------------------------------------------------------------------------ config on resume
def test_resume_refuses_a_changed_lr_and_applies_it_when_forced(dataset, tmp_path):
    out = tmp_path / "run"
    first = {"optim.lr": 7e-4, "checkpoint.every": 3}
    train(base_args(dataset, out, 3, **first))
    before = (out / "metrics.jsonl").read_text()
    proc = train(base_args(dataset, out, 5, **{**first, "optim.lr": 1e6, "train.seed": 1}), check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "optim.lr: 0.0007 -> 1000000.0" in line and "train.seed: 0 -> 1" in line, line
    assert "checkpoint.allow_changes=[optim.lr,train.seed]" in line, line
    assert (out / "metrics.jsonl").read_text() == before and not list(out.glob("config.step_*"))
    # forced: the new peak lr is what runs from step 3 on (the schedule's factor at that step, by hand)
    train(base_args(dataset, out, 5, **{**first, "optim.lr": 2e-3, "checkpoint.allow_changes": "[optim.lr]"}))
    cfg = compose_config(base_args(dataset, out, 5, **{**first, "optim.lr": 2e-3}))
    lr = metrics(out, "lr")
    assert lr[4] == pytest.approx(2e-3 * lr_factor(4, 5, cfg.optim), rel=1e-12)
    assert lr[3] == pytest.approx(7e-4 * lr_factor(3, 3, cfg.optim), rel=1e-12)  # ran before, as it ran
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 7e-4
    assert yaml.safe_load((out / "config.step_00000003.yaml").read_text())["optim"]["lr"] == 2e-3


def test_resume_applies_free_changes(dataset, tmp_path):
    out = tmp_path / "run"
    train(base_args(dataset, out, 2, **{"checkpoint.every": 2}))
    train(base_args(dataset, out, 3, **{"checkpoint.every": 1, "log.every": 1, "train.val_every": 3}))
    assert list(metrics(out)) == [1, 2, 3] and 3 in metrics(out, "val_loss")
    assert yaml.safe_load((out / "config.step_00000002.yaml").read_text())["train"]["steps"] == 3


# ------------------------------------------------------------------------------------------ spikes
def test_non_finite_loss_is_one_line_and_saves_nothing(dataset, tmp_path):
    out = tmp_path / "run"
    proc = train(base_args(dataset, out, 4, **{"optim.lr": 1e38, "optim.warmup_steps": 0, "checkpoint.every": 2}),
                 check=False)  # the first update sends the weights past fp32's range: nan at step 2
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("training error: loss is nan at step 2; last good checkpoint: none"), line
    assert "Traceback" not in proc.stderr and not (out / "checkpoints").exists()


POISON_BATCH = 25  # the data batch (0-based) that holds the random text, for train.seed=1: consumed by step 26
# checkpoints every 5 steps: the newest before the poisoned batch is step 25 (= POISON_BATCH), where the rollback
# and the reference's resume start (measured on 2 busy cores: 28 steps in 35 s saving every step, 19 s every 5)
SPIKE = {"model.vocab_size": 257, "train.global_batch_size": 2, "train.micro_batch_size": 2, "optim.lr": 5e-3,
         "train.seed": 1, "checkpoint.every": 5, "train.spike.factor": 3.0, "train.spike.window": 4,
         "train.spike.skip_batches": 1, "train.spike.max_rollbacks": 2}


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> Path:
    """30 documents of one repeated pattern the model learns in 20 steps, and one of random characters: one
    sample of 65 tokens, which the loader's seed-1 order puts in data batch 25 alone with a pattern sample."""
    base = tmp_path_factory.mktemp("poisoned")
    corpus = base / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"doc{i:03d}.txt").write_text("abcdefgh" * 40)
    rng = random.Random(0)
    (corpus / "doc999.txt").write_text("".join(chr(rng.randrange(0x21, 0x7F)) for _ in range(60)))
    subprocess.run([PY, "-m", "train.data.prepare", "--input", str(corpus), "--output", str(base / "shards"),
                    "--chunk-len", "65", "--samples-per-shard", "64", "--val-fraction", "0.05"], cwd=ROOT, check=True,
                   capture_output=True)
    ds = TokenDataset(base / "shards", "train")
    bad = [i for i in range(len(ds)) if set(ds.sample(i).tolist()) - set(b"abcdefgh") - {256}]
    order = TokenLoader(ds, 64, 2, 2, seed=1)._permutation(0).tolist()
    assert [order.index(i) // 2 for i in bad] == [POISON_BATCH]
    return base / "shards"


def test_poisoned_batch_is_rolled_back_and_skipped(poisoned, tmp_path):
    steps = POISON_BATCH + 3
    rolled = tmp_path / "rolled"
    train(base_args(poisoned, rolled, steps, **SPIKE))
    rows = [json.loads(x) for x in (rolled / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if "rollbacks" in r]
    assert len(events) == 1 and events[0]["step"] == POISON_BATCH + 1 and events[0]["rolled_back_to"] == POISON_BATCH
    assert "above 3 x its running mean" in events[0]["reason"]
    # the reference: the same run stopped at the checkpoint before the poisoned batch, resumed one batch further on
    ref = tmp_path / "ref"
    no_spike = {**SPIKE, "train.spike.max_rollbacks": 0}
    train_killed(base_args(poisoned, ref, steps, **no_spike), 1, ref, after_step=POISON_BATCH, checkpoint=POISON_BATCH)
    assert newest_checkpoint(ref) == POISON_BATCH
    state_file = ref / "checkpoints" / f"step_{POISON_BATCH:08d}" / "train_state.json"
    state = json.loads(state_file.read_text())
    state["loader"]["steps"] += 1
    state_file.write_text(json.dumps(state))
    (state_file.parent / "checksums.json").unlink()
    seal(state_file.parent)  # the edited checkpoint's checksums, or it no longer verifies
    train(base_args(poisoned, ref, steps, **no_spike))
    want, got = metrics(ref), metrics(rolled)
    assert list(got) == list(range(1, steps + 1))
    assert got == want  # bit for bit, before and after the skipped batch
    assert max(want.values()) < 6 and got[POISON_BATCH] < 0.6  # learned; the poisoned loss (~3.5) is gone
    # killed after the checkpoint before the spike, resumed: the same spike, rollback and losses
    killed = tmp_path / "killed"
    train_killed(base_args(poisoned, killed, steps, **SPIKE), 1, killed, after_step=POISON_BATCH,
                 checkpoint=POISON_BATCH)
    assert newest_checkpoint(killed) == POISON_BATCH
    train(base_args(poisoned, killed, steps, **SPIKE))
    assert metrics(killed) == got
    rows = map(json.loads, (killed / "metrics.jsonl").read_text().splitlines())
    assert [r for r in rows if "rollbacks" in r] == events
