"""Bad inputs, one principle a test (train/errors.py): every user value takes one typed path and is checked for type
and range before any work; a configuration error is one line per job, also under torchrun; the libraries' errors
for damaged files become one line naming the file; out-of-range values are refused, and a missing input is exit 1
in every tool. Then the smaller things: no empty output_dir left behind, exported files' modes, the MoE heatmap's
cadence and axes, a byte-tokenized run's export tokenizer; and two guards the suite once missed: the spike
guard's running mean and the fields a resume may not change."""

import importlib
import math
import os
import re
import subprocess

import pytest
import torch

from conftest import PY, ROOT, base_args, tiny, tiny_model, train


def tool(module: str, *args: str, capsys) -> tuple[int, list[str]]:
    """`python -m <module> <args>` in this process: (exit code, the lines it printed on stderr)."""
    name = module + ".__main__" if module in ("train", "launch") else module
    rc = importlib.import_module(name).main(list(args))
    return rc, capsys.readouterr().err.strip().splitlines()


def one_line(rc: int, lines: list[str], code: int, *fragments: str) -> None:
    assert rc == code and len(lines) == 1, (rc, lines)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------------------------------ one typed path
@pytest.mark.parametrize("module,args,fragment", [
    ("train.sample", ["sample.prompt=x", "sample.top_k=1.5"], "sample.top_k must be int, got float 1.5"),
    ("train.sample", ["sample.prompt=x", "sample.seed=[1]"], "sample.seed must be int"),
    ("train.evaluate", ["eval.data=d", "eval.step=latest"], "eval.step must be int, got str 'latest'"),
    ("train.export", ["export.dir=d", "export.overwrite=maybe"], "export.overwrite must be bool"),
    ("train.sample", ["sample.prompt=x", "sample.temprature=1"], "unknown config key(s) ['sample.temprature']"),
])
def test_tool_values_are_typed_as_trains(module, args, fragment, tmp_path, capsys):
    rc, lines = tool(module, f"output_dir={tmp_path / 'run'}", *args, capsys=capsys)
    one_line(rc, lines, 2, "config error: " + fragment)


@pytest.mark.parametrize("module,args,fragment", [
    ("train.sample", ["sample.prompt=x", "sample.top_k=0"], "sample.top_k must be >= 1"),
    ("train.sample", ["sample.prompt=x", "sample.top_p=0"], "sample.top_p must lie in (0, 1]"),
    ("train.sample", ["sample.prompt=x", "sample.temperature=nan"], "sample.temperature must be >= 0"),
    ("train.sample", ["sample.prompt=x", "sample.max_new_tokens=0"], "sample.max_new_tokens must be >= 1"),
    ("train.evaluate", ["eval.data=d", "eval.batches=-3"], "eval.batches must be >= 1"),
    ("train.evaluate", ["eval.data=d", "eval.split=test"], "eval.split must be one of train, val"),
    ("train.export", ["export.dir=d", "export.max_shard_bytes=0"], "export.max_shard_bytes must be >= 1"),
    ("train.export", ["export.dir=d", "export.dtype=int8"], "export.dtype must be one of"),
])
def test_out_of_range_tool_values_are_refused(module, args, fragment, tmp_path, capsys):
    rc, lines = tool(module, f"output_dir={tmp_path / 'run'}", *args, capsys=capsys)
    one_line(rc, lines, 2, "config error: " + fragment)


@pytest.mark.parametrize("env,fragment", [
    ({"WORLD_SIZE": "4", "RANK": "4"}, "RANK=4 and WORLD_SIZE=4"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "one"}, "LOCAL_RANK='one'"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "-1", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1"},
     "SLURM_PROCID='-1'"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "[n1]"},
     "SLURM_JOB_NODELIST='[n1]'"),
])
def test_rank_environment_is_checked_before_any_work(env, fragment, tmp_path, capsys, monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rc, lines = tool("train", "model=tiny", f"output_dir={tmp_path / 'run'}", capsys=capsys)
    one_line(rc, lines, 2, "config error: " + fragment)
    assert not (tmp_path / "run").exists()


def test_launch_checks_the_layout_against_nodes_x_procs_per_node(capsys):
    rc, lines = tool("launch", "launch=torchrun", "launch.nodes=2", "launch.procs_per_node=3", "parallel.tp=4",
                     "launch.dry_run=true", "model=tiny", capsys=capsys)
    one_line(rc, lines, 2, "config error: ", "launch.nodes=2 x launch.procs_per_node=3")
    assert tool("launch", "launch=torchrun", "launch.nodes=2", "launch.procs_per_node=2", "parallel.tp=2",
                "launch.dry_run=true", "model=tiny", capsys=capsys)[0] == 0


@pytest.mark.parametrize("layout,fragment", [
    (["launch.nodes=2", "launch.procs_per_node=2", "parallel.ep=4"], None),
    (["launch.nodes=1", "launch.procs_per_node=4", "parallel.ep=4"], "the ep=4 ranks of a group lie on one host"),
    (["launch.nodes=2", "launch.procs_per_node=3", "parallel.ep=2"], "3 ranks per host must be a multiple of tp=1 "
                                                                      "and divide ep x tp=2"),
    (["launch.nodes=4", "launch.procs_per_node=1", "parallel.ep=4", "model.n_group=2", "model.topk_group=1"],
     "n_group=2 must be a multiple of the 4 hosts of an ep group"),
    (["launch.nodes=1", "launch.procs_per_node=1"], "but parallel.ep=1"),
], ids=["fits", "one-host", "uneven-hosts", "groups-span-hosts", "no-ep"])
def test_hierarchical_dispatch_that_cannot_apply_is_one_line(layout, fragment, capsys):
    """parallel.ep_dispatch=hierarchical against the hosts launch starts: each reason it cannot apply, one line."""
    rc, lines = tool("launch", "launch=torchrun", *layout, "parallel.ep_dispatch=hierarchical", "launch.dry_run=true",
                     "model=tiny", "train.micro_batch_size=1", capsys=capsys)
    if fragment is None:
        assert rc == 0, lines
    else:
        one_line(rc, lines, 2, "config error: ", fragment)


# ------------------------------------------------------------------------------------------ one line per job
def test_a_config_error_under_torchrun_is_one_line_for_the_job(tmp_path):
    """Both ranks find it; rank 0 prints it; launch.torchrun ends the job with exit 2 and no failure report."""
    out = tmp_path / "run"
    proc = subprocess.run([PY, "-m", "launch.torchrun", "--standalone", "--nproc-per-node=2", "-m", "train",
                           "model=tiny", "parallel.pp=3", f"output_dir={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "config error: " in proc.stderr, proc.stderr
    assert "dp_replicate*cp*tp*pp = 1*1*1*3" in proc.stderr and not out.exists()


# ------------------------------------------------------------------------------------------ library errors
def hf_dir(path):
    from train.hf.format import to_hf

    to_hf(tiny_model(tiny()), path, max_shard_bytes=200_000)
    return path


def test_a_damaged_safetensors_shard_is_one_line_naming_it(dataset, tmp_path, capsys):
    src = hf_dir(tmp_path / "hf")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")  # a header length past the end of the file
    shard.write_bytes(bytes(data))
    out = tmp_path / "new" / "run"
    rc, lines = tool("train", *base_args(dataset, out, 1, **{"checkpoint.init_from": src}), capsys=capsys)
    one_line(rc, lines, 1, "checkpoint error: ", str(shard))
    assert not (tmp_path / "new").exists(), "the run made these directories and wrote nothing into them"


def test_a_damaged_tokenizer_or_index_is_one_line_naming_it(dataset, tmp_path, capsys):
    import shutil

    from train.config import RunConfig
    from train.errors import report
    from train.runfiles import run_tokenizer

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    index = (data / "index.json").read_text()
    (data / "index.json").write_text(index.replace('"tokenizer_file": null', '"tokenizer_file": "tokenizer.json"'))
    (data / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {')
    cfg = RunConfig()
    for damage, named in ((None, data / "tokenizer.json"), (index[: len(index) // 2], data / "index.json")):
        if damage is not None:
            (data / "index.json").write_text(damage)
        with pytest.raises(ValueError) as e:
            run_tokenizer(cfg, data)
        assert report(e.value) == 1
        one_line(1, capsys.readouterr().err.strip().splitlines(), 1, "data error: ", str(named))


# ------------------------------------------------------------------------------------------ missing inputs
def test_a_missing_input_is_exit_1_in_every_tool(dataset, tmp_path, capsys):
    gone = tmp_path / "gone"
    (tmp_path / "mine").mkdir()  # the user's own empty directory: a failed run leaves it where it was
    runs = [("train", base_args(dataset, tmp_path / "a", 1, **{"data.path": gone})),
            ("train", base_args(dataset, tmp_path / "mine", 1, **{"data.path": gone})),
            ("train", base_args(dataset, tmp_path / "b", 1, **{"checkpoint.init_from": gone})),
            ("train.evaluate", [f"output_dir={tmp_path}", f"eval.data={gone}"]),
            ("train.sample", [f"output_dir={tmp_path}", f"sample.prompt_file={gone}"]),
            ("train.export", [f"output_dir={gone}", f"export.dir={tmp_path / 'hf'}"])]
    for module, args in runs:
        rc, lines = tool(module, *args, capsys=capsys)
        one_line(rc, lines, 1, str(gone))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and (tmp_path / "mine").is_dir()


def test_an_output_dir_that_cannot_be_made_is_one_config_line(dataset, tmp_path, capsys):
    (tmp_path / "file").write_text("keep")
    rc, lines = tool("train", *base_args(dataset, tmp_path / "file" / "run", 1), capsys=capsys)
    one_line(rc, lines, 2, "config error: output_dir=", f"{tmp_path / 'file'} exists and is not a directory")
    assert (tmp_path / "file").read_text() == "keep"


# ------------------------------------------------------------------------------------------ smaller things
def test_exported_shards_take_the_umask_like_every_other_file(tmp_path):
    from train.hf.format import ShardWriter

    old = os.umask(0o027)
    try:
        writer = ShardWriter(tmp_path, 1 << 20)
        writer.add("a", torch.ones(3))
        writer.close(tiny())
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"model-00001.safetensors": 0o640, "model.safetensors.index.json": 0o640, "config.json": 0o640}


def test_heatmap_has_integer_expert_ticks_and_its_labels_inside(tmp_path):
    from train.metrics import figure_pixels, heatmap_figure

    for shape in ((3, 6), (7, 26)):
        fig = heatmap_figure(torch.rand(shape), list(range(shape[0])), 1)
        figure_pixels(fig)  # draws: the layout is fitted here
        ax, renderer = fig.axes[0], fig.canvas.get_renderer()
        lo, hi = sorted(ax.get_xlim())
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() and 0 <= t < shape[1] for t in ticks), ticks
        for text in (ax.xaxis.label, ax.yaxis.label, ax.title):
            box = text.get_window_extent(renderer)
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, text


def test_moe_heatmap_follows_log_moe_every_alone(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(base_args(dataset, out, 4, **{"log.every": 2, "log.moe_every": 3}))
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("moe/load_heatmap")] == [3]


def test_byte_run_export_tokenizer_is_the_byte_tokenizer(dataset, tmp_path):
    from transformers import AutoTokenizer

    from train.config import RunConfig
    from train.data.tokenizer import ByteTokenizer
    from train.hf.export import _save_tokenizer

    cfg = RunConfig()
    cfg.data.path = str(dataset)  # byte-tokenized
    _save_tokenizer(cfg, tmp_path / "hf")
    theirs, ours = AutoTokenizer.from_pretrained(tmp_path / "hf"), ByteTokenizer()
    text = "Grüße, Zoë: 東京 → ∑x² 🚀\n\tend"
    ids = theirs(text)["input_ids"]
    assert ids == ours.encode(text) and theirs.decode(ids) == ours.decode(ids) == text
    assert theirs.eos_token_id == ours.eos_id and theirs.decode(ids + [ours.eos_id]).endswith(theirs.eos_token)


# ------------------------------------------------------------------------------------------ guards once missed
def test_spike_guard_compares_with_the_mean_of_earlier_losses_only():
    from train.spike import SpikeGuard

    guard = SpikeGuard(factor=3.0, window=4, max_rollbacks=1, recent=[1.0, 1.0, 1.0, 1.0])
    assert "above 3 x its running mean 1.0000" in guard.problem({"loss": 3.5})  # with 3.5 in the mean: no spike
    assert guard.problem({"loss": 2.9}) is None
    assert guard.problem({"loss": 1.0, "aux/expert": math.inf}) == "aux/expert is inf"


# a resume may change these freely (train/resume.py FREE); any other field changes what is computed
FREE_ON_RESUME = ("output_dir", "train.steps", "train.micro_batch_size", "train.val_every", "train.peak_tflops",
                  "train.spike.", "data.val_batches", "data.cache_dir", "log.", "checkpoint.", "parallel.", "launch.",
                  "cluster.", "model.")


def _other(value):
    """A value of the same kind that differs from `value`."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, (list, tuple)):
        return [*value, 1]
    return {"k": 1} if isinstance(value, dict) else "x"


def test_a_resume_refuses_a_change_of_every_field_that_changes_the_run():
    from train.config import ConfigError, RunConfig, to_dict
    from train.resume import check_resume, flatten

    saved = to_dict(RunConfig())
    guarded = [k for k in flatten(saved) if not any(k == p or (p.endswith(".") and k.startswith(p))
                                                     for p in FREE_ON_RESUME)]
    assert {"optim.betas", "optim.lr", "train.seed", "precision.name", "data.path"} <= set(guarded)
    for key, value in flatten(saved).items():
        now = to_dict(RunConfig())
        *parents, last = key.split(".")
        node = now
        for p in parents:
            node = node[p]
        node[last] = _other(value)
        if key in guarded:
            with pytest.raises(ConfigError, match=re.escape(f"({key}: ")):
                check_resume(saved, now, (), "runs/x", 3)
        else:
            assert check_resume(saved, now, (), "runs/x", 3) == [], key
