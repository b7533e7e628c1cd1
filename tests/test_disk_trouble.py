"""Disk trouble while a checkpoint is written (train/checkpoint.py): the checkpoints directory full or read-only.
One line says so; the previous checkpoint stays intact and loadable; the run stops with exit 1
(checkpoint.on_error=stop) or trains on without that checkpoint (continue). The directory is a small tmpfs the
test mounts (root ignores file modes, so only a mount makes a disk full or read-only for it)."""

import os
import re
import subprocess

import pytest

from conftest import base_args, metrics, train
from train.checkpoint import published, verify


@pytest.fixture
def small_disk(tmp_path):
    """`tmp_path/run/checkpoints` on a 16 MiB tmpfs of its own (a checkpoint of the tiny model is ~5.4 MB),
    unmounted at the end; skips, saying why, where mounting is not permitted."""
    where = tmp_path / "run" / "checkpoints"
    where.mkdir(parents=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip() or made.returncode}")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def make_trouble(where, kind: str) -> None:
    if kind == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        return
    stat = os.statvfs(where)  # full: all but 256 KiB taken, room for the directory, not for the model's shards
    with open(where / "filler", "wb") as f:
        f.truncate(0)
        f.write(b"\0" * (stat.f_bavail * stat.f_frsize - (256 << 10)))


def clear_trouble(where, kind: str) -> None:
    if kind == "read-only":
        subprocess.run(["mount", "-o", "remount,rw", str(where)], check=True)
    else:
        (where / "filler").unlink()


@pytest.mark.parametrize("kind,async_save,on_error,nproc", [
    ("full", False, "stop", 1), ("read-only", True, "stop", 1), ("full", True, "continue", 1),
    ("read-only", False, "continue", 1), ("full", True, "stop", 2)])
def test_a_checkpoint_the_disk_refuses(dataset, small_disk, kind, async_save, on_error, nproc):
    """Step 2's checkpoint written; then the disk fills up or turns read-only, and the run resumed to step 5
    saves at step 4: one line (from rank 0 alone with 2 ranks) naming step 4 and the checkpoint kept (step 2),
    which still verifies and resumes (the losses of steps 3-4 of a resume from it equal those of the troubled
    run)."""
    out = small_disk.parent
    train(base_args(dataset, out, 2, **{"checkpoint.every": 2}), nproc)
    make_trouble(small_disk, kind)
    args = base_args(dataset, out, 5, **{"checkpoint.every": 2, "checkpoint.async_save": async_save,
                                         "checkpoint.on_error": on_error})
    troubled = train(args, nproc, check=False)
    lines = [line for line in troubled.stderr.splitlines() if "not written" in line]
    if nproc == 1:  # (the test's plain torchrun prints its own traceback of a failed worker)
        assert "Traceback" not in troubled.stderr, troubled.stderr[-3000:]
    kept = published(small_disk)
    assert [p.name for p in kept] == ["step_00000002"] and verify(kept[0]) is None
    if on_error == "stop":
        assert troubled.returncode == 1 and len(lines) == 1, troubled.stderr[-3000:]
        assert lines[0].startswith("checkpoint error: checkpoint step_00000004 not written (")
        # an async write that fails in the background is found at the next save: the end of the run, step 5
        assert max(metrics(out)) == (5 if async_save and kind == "full" else 4)
    else:  # step 4's save and the end-of-run save at step 5 fail, each with its line; the run ends normally
        assert troubled.returncode == 0 and len(lines) == 2, troubled.stderr[-3000:]
        assert max(metrics(out)) == 5
    assert "the newest checkpoint stays step_00000002" in lines[0], lines[0]
    # a full disk: the OS's words, or those of torch's zip writer when the file it streams into is cut short
    assert re.search("No space left on device|unexpected pos" if kind == "full" else "Read-only file system",
                     lines[0]), lines[0]
    free = float(re.search(r"; (\d+\.\d) MiB free in ", lines[0]).group(1))
    assert free < 1 if kind == "full" else free > 4, lines[0]  # 256 KiB left by the filler; ~10 MiB read-only
    troubled_losses = metrics(out)
    clear_trouble(small_disk, kind)
    again = train(base_args(dataset, out, 4, **{"checkpoint.every": 0}), nproc)
    assert "resuming at step 2" in again.stderr
    assert {s: metrics(out)[s] for s in (3, 4)} == {s: troubled_losses[s] for s in (3, 4)}
