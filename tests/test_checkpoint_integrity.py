"""Checkpoint integrity: every file of a published checkpoint has a size and CRC-32 in its checksums.json, checked
before anything of it is loaded (train/checkpoint.py); and no tool replaces a directory it reads from or one that
holds checkpoints (train/targets.py)."""

import json
import logging
import time
import zlib

import pytest
import torch

from conftest import run_ranks, tiny_model
from train.checkpoint import Checkpointer, CheckpointError, crc32_of, select, verified
from train.data.prepare import main as prepare_main
from train.targets import unsafe_target


def _saved(root, async_save: bool = False):
    """A tiny model and its AdamW saved at steps 1 and 2 (different weights); the step-1 weights."""
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = Checkpointer(root, keep=3, async_save=async_save)
    weights = {}
    for step in (1, 2):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.1 * step)
        opt.step()
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
        ckpt.save(step, [model], [opt], {"step": step})
    ckpt.wait()
    return model, opt, ckpt, weights[1]


def test_an_async_save_is_published_once_written_without_a_later_save(tmp_path):
    """What the trainer's end-of-step check relies on: `written()` turns true once the background write and its
    checksums are done, with no later save; the save is still `step_N.tmp` until `wait()` publishes it."""
    model = tiny_model()
    ckpt = Checkpointer(tmp_path, keep=3, async_save=True)
    ckpt.save(1, [model], [torch.optim.AdamW(model.parameters())], {"step": 1})
    assert ckpt.in_flight()
    deadline = time.monotonic() + 120
    while not ckpt.written():
        assert time.monotonic() < deadline, "the async write did not finish"
        time.sleep(0.01)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001.tmp"]
    ckpt.wait()
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"] and not ckpt.in_flight()
    assert verified(tmp_path / "step_00000001") is None


def _flip_last_bit(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


# damage other than the torn writes and flipped middles of the trainer's test: one bit, one byte more, a lost file
DAMAGE = {
    "one_bit_at_the_end": (lambda d: sorted(d.glob("*.distcp"))[0], _flip_last_bit, "fails its checksum"),
    "one_byte_appended": (lambda d: d / "rng" / "rank_0.pt", lambda p: p.write_bytes(p.read_bytes() + b"\0"),
                          "bytes, "),
    "a_file_deleted": (lambda d: d / "train_state.json", lambda p: p.unlink(), "is missing"),
    "no_checksums": (lambda d: d / "checksums.json", lambda p: p.unlink(), "is missing"),
}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_file_is_named_and_the_previous_checkpoint_loads(tmp_path, caplog, damage, async_save):
    model, opt, ckpt, step1 = _saved(tmp_path, async_save)
    newest = tmp_path / "step_00000002"
    pick, harm, words = DAMAGE[damage]
    victim = pick(newest)
    harm(victim)
    torch.nn.init.zeros_(model.embed_tokens.weight)
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        state = ckpt.load_latest([model], [opt])
    assert state == {"step": 1}
    assert all(torch.equal(v, step1[k]) for k, v in model.state_dict().items())  # step 1's weights, exactly
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "step_00000002" in warnings[0] and victim.name in warnings[0], warnings
    assert words in warnings[0]
    assert ckpt.last_good() == tmp_path / "step_00000001"
    assert select(tmp_path, None) == tmp_path / "step_00000001"  # what export, sample and evaluate read
    with pytest.raises(CheckpointError, match=f"step_00000002 does not verify: .*{victim.name}"):
        select(tmp_path, 2)


def test_checksums_are_the_files_crc32(tmp_path):
    _saved(tmp_path)
    newest = tmp_path / "step_00000002"
    entries = json.loads((newest / "checksums.json").read_text())["files"]
    on_disk = sorted(str(p.relative_to(newest)) for p in newest.rglob("*")
                     if p.is_file() and p.name != "checksums.json")
    assert sorted(entries) == on_disk  # every file, the manifest excepted
    for rel, (size, crc) in entries.items():
        data = (newest / rel).read_bytes()
        assert size == len(data) and crc == f"{zlib.crc32(data):08x}" == crc32_of(newest / rel)


def _verify_on_ranks(rank, world, directory):
    return verified(directory)


def test_ranks_share_the_checking_and_all_hear_of_a_damaged_file(tmp_path):
    _saved(tmp_path / "ckpts")
    newest = tmp_path / "ckpts" / "step_00000002"
    names = sorted(json.loads((newest / "checksums.json").read_text())["files"])
    assert run_ranks(_verify_on_ranks, 2, tmp_path / "ok", newest) == [None, None]
    victim = newest / names[1]  # checked by rank 1 alone (every second file from the second)
    _flip_last_bit(victim)
    problems = run_ranks(_verify_on_ranks, 2, tmp_path / "bad", newest)
    assert problems[0] == problems[1] and str(victim) in problems[0]


# ------------------------------------------------------------------------------ no tool deletes what it reads
def _run_tree(root):
    """A run directory with a published checkpoint, and a dataset directory."""
    (root / "run" / "checkpoints" / "step_00000003").mkdir(parents=True)
    (root / "run" / "checkpoints" / "step_00000003" / "checksums.json").write_text("{}")
    (root / "run" / "config.yaml").write_text("x: 1\n")
    (root / "data").mkdir()
    (root / "data" / "index.json").write_text("{}")
    return root / "run", root / "data"


@pytest.mark.parametrize("target,why", [
    ("{root}", "contains"),                                             # the parent of what it reads
    ("{root}/data/hf", "lies inside"),                                   # inside the data it reads
    ("{root}/run/checkpoints/step_00000003/hf", "lies inside"),          # inside the run it reads
    ("{root}/other", "the checkpoint directory"),                       # holds another run's checkpoints
    ("{root}/other/checkpoints/step_00000001", "is the checkpoint directory"),
])
def test_targets_that_hold_what_a_tool_reads_or_checkpoints_are_refused(tmp_path, target, why):
    run, data = _run_tree(tmp_path)
    other = tmp_path / "other" / "checkpoints" / "step_00000001"
    other.mkdir(parents=True)
    (other / ".metadata").write_bytes(b"")
    problem = unsafe_target(type(tmp_path)(target.format(root=tmp_path)), [run, data])
    assert problem is not None and why in problem
    assert unsafe_target(tmp_path / "exports" / "hf", [run, data]) is None  # a directory of its own


def test_prepare_refuses_to_overwrite_its_own_inputs(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text " * 50)
    rc = prepare_main(["--input", str(corpus / "a.txt"), "--output", str(tmp_path), "--overwrite",
                       "--chunk-len", "17"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"contains {corpus / 'a.txt'}, which this tool reads" in err[0]
    assert (corpus / "a.txt").read_text() == "some text " * 50
