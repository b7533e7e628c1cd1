"""A run's checkpoints out: `train.export` to a Hugging Face directory, `train.sample`, `train.evaluate`.

One run trained under pp=2 x ep=2 (4 gloo processes) with DeepSeek-V3 routing (sigmoid, noaux_tc, a moving
expert bias) and one MTP layer is the subject of every test here.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from conftest import ROOT, base_args, metrics, train  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402
from train.runfiles import checkpoint_of, load_model, run_config  # noqa: E402
from train.sample import SampleConfig, sample  # noqa: E402
from train.data.tokenizer import ByteTokenizer  # noqa: E402

STEPS = 2
RUN = {"model.scoring_func": "sigmoid", "model.topk_method": "noaux_tc", "model.aux_loss_free_bias": "true",
       "model.norm_topk_prob": "true", "model.num_nextn_predict_layers": 1, "data.seq_len": 32,
       "train.val_every": STEPS, "data.val_batches": 1, "optim.lr": 1e-2}


def tool(module: str, *args: str, capsys=None) -> tuple[int, str, str]:
    """`python -m <module> <args>` in this process: (exit code, stdout, stderr)."""
    import importlib

    rc = importlib.import_module(module).main(list(args))
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return rc, out, err


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    train(base_args(dataset, out, STEPS, **RUN, **{"train.micro_batch_size": 1, "parallel.pp": 2,
                                                   "parallel.ep": 2}), nproc=4)
    return out


@pytest.fixture(scope="module")
def exported(run_dir):
    dest = run_dir.parent / "hf"
    rc = tool("train.export", f"output_dir={run_dir}", f"export.dir={dest}", "export.max_shard_bytes=200000")
    assert rc == (0, "", "")
    return dest


def test_export_loads_into_transformers_with_equal_logits(run_dir, exported):
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # sharded
    ckpt = checkpoint_of(run_dir, None)
    stack = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata["model.layers.1.mlp.experts.gate_up_proj"]
    pieces = sorted((int(c.offsets[0]), int(c.sizes[0])) for c in stack.chunks)
    assert pieces == [(0, 4), (4, 4)]  # each ep rank's experts stored as a piece: the export reads across both
    ours = load_model(ckpt, run_config(ckpt), torch.device("cpu"))
    assert any(float(m.gate.expert_bias.abs().sum()) > 0 for m in ours.moe_layers().values())  # the bias moved
    ref = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
    assert type(ref).__name__ == "DeepseekV3ForCausalLM"
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(tokens).logits, ours(tokens)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_init_from_export_equals_init_from_the_run(dataset, run_dir, exported, tmp_path):
    """The export keeps every weight the run needs (MTP and expert bias included): a run started from it and a
    run started from the run's own checkpoint take the same first step."""
    a, b = tmp_path / "from_hf", tmp_path / "from_run"
    over = {k: v for k, v in RUN.items() if k != "train.val_every"} | {"train.val_every": 0}
    train(base_args(dataset, a, 1, **over, **{"checkpoint.init_from": exported}))
    train(base_args(dataset, b, 1, **over, **{"checkpoint.init_from": run_dir}))
    assert metrics(a)[1] == pytest.approx(metrics(b)[1], rel=1e-6)


def test_export_refuses_a_non_empty_directory_and_a_non_run(run_dir, tmp_path, capsys):
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    rc, _, err = tool("train.export", f"output_dir={run_dir}", f"export.dir={dest}", capsys=capsys)
    assert rc == 2 and "export.overwrite=true" in err.strip().splitlines()[-1]
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt"]
    rc, _, err = tool("train.export", f"output_dir={dest}", f"export.dir={tmp_path / 'new'}", capsys=capsys)
    assert rc == 1 and "no published checkpoint" in err.strip().splitlines()[-1] and str(dest) in err
    assert not (tmp_path / "new").exists()


def _tree(root):
    """{path: (size, mtime)} of every file beneath `root`."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("where", ["parent", "checkpoint"])
def test_export_with_overwrite_never_replaces_the_run_it_reads(run_dir, capsys, where):
    before = _tree(run_dir)
    ckpt = checkpoint_of(run_dir, None)
    dest = {"parent": run_dir.parent, "checkpoint": ckpt}[where]
    rc, _, err = tool("train.export", f"output_dir={run_dir}", f"export.dir={dest}", "export.overwrite=true",
                      capsys=capsys)
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert rc == 2 and len(lines) == 1 and f"export.dir={dest} " in lines[0], err
    assert {"parent": "contains", "checkpoint": "lies inside"}[where] in lines[0]
    assert _tree(run_dir) == before  # every file of the run as it was


def test_greedy_sample_is_the_argmax_of_full_sequence_logits(run_dir):
    ckpt = checkpoint_of(run_dir, None)
    model = load_model(ckpt, run_config(ckpt), torch.device("cpu"))
    tok, n = ByteTokenizer(), 8
    prompts = ["def f(x):", "import os\nclass A"]
    got = sample(model, tok, prompts, SampleConfig(max_new_tokens=n), torch.device("cpu"))
    for prompt, new in zip(prompts, got):  # each row of the left-padded batch, by full forwards
        seq = tok.encode(prompt)
        for _ in range(len(new)):
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert new == seq[len(tok.encode(prompt)):], prompt
    assert max(len(r) for r in got) == n


def test_sample_command_prints_the_continuation(run_dir, capsys):
    rc, out, _ = tool("train.sample", f"output_dir={run_dir}", "sample.prompt=def f(x):", "sample.max_new_tokens=8",
                      capsys=capsys)
    assert rc == 0
    assert out.startswith("def f(x):") and len(out.rstrip("\n")) > len("def f(x):")


def test_evaluate_on_the_validation_split_equals_the_runs_val_loss(dataset, run_dir, capsys):
    rc, out, _ = tool("train.evaluate", f"output_dir={run_dir}", f"eval.data={dataset}", capsys=capsys)
    assert rc == 0 and "perplexity" in out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if "eval/loss" in r][-1]
    assert ev["step"] == STEPS
    assert ev["eval/loss"] == pytest.approx(metrics(run_dir, "val_loss")[STEPS], rel=1e-5)
    assert ev["eval/perplexity"] == pytest.approx(torch.tensor(ev["eval/loss"]).exp().item(), rel=1e-6)
    assert 0 < ev["eval/bits_per_byte"] < ev["eval/loss"] / 0.69  # byte tokens: bpb = loss / ln 2 less eos


def test_evaluate_under_torchrun_equals_one_process(dataset, run_dir):
    """Two pipeline stages (the run's pp=2, its ep=2 dropped to fit 2 processes) give the one-process numbers."""
    args = [f"output_dir={run_dir}", f"eval.data={dataset}"]
    assert tool("train.evaluate", *args)[0] == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "train.evaluate", *args, "parallel.ep=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    one, two = [r for r in rows if "eval/loss" in r][-2:]
    assert two["eval/loss"] == pytest.approx(one["eval/loss"], rel=1e-5)
    assert two["eval/bits_per_byte"] == pytest.approx(one["eval/bits_per_byte"], rel=1e-5)


def test_top_p_keeps_the_smallest_set_reaching_p():
    from model.generate import _pick

    logits = torch.log(torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]]))  # sorted: 0.5, 0.3, 0.1, ...
    gen = torch.Generator().manual_seed(0)
    picks = {int(_pick(logits, 1.0, None, gen, top_p=0.75)) for _ in range(200)}
    assert picks == {1, 3}  # 0.5 < 0.75 <= 0.5 + 0.3
    picks = {int(_pick(logits, 1.0, None, gen, top_p=0.85)) for _ in range(300)}
    assert picks == {1, 3, 2}


def test_export_saves_the_datas_tokenizer_for_transformers(tmp_path):
    from transformers import AutoTokenizer

    from train.config import RunConfig
    from train.data.prepare import prepare
    from train.data.tokenizer import HFTokenizer
    from train.hf.export import _save_tokenizer

    corpus = tmp_path / "doc.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    prepare([str(corpus)], tmp_path / "data", tokenizer="bpe:300", chunk_len=65, samples_per_shard=16,
            val_fraction=0.1, progress=False)
    cfg = RunConfig()
    cfg.data.path = str(tmp_path / "data")
    _save_tokenizer(cfg, tmp_path / "hf")
    text = "the lazy fox jumps"
    ours = HFTokenizer(tmp_path / "data" / "tokenizer.json")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert theirs.eos_token_id == ours.eos_id and len(ours.encode(text)) < len(text)


def _rchar() -> int:
    """Bytes this process has read through read syscalls so far (/proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_rows_reader_reads_only_the_rows_asked_for(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    import train.hf.export as export

    gen = torch.Generator().manual_seed(0)
    stack = torch.randn(64, 160, 96, generator=gen)  # 3.75 MiB, one stored piece
    tensors = {"layers.1.mlp.experts.w": stack, "norm": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
               "lm_head": torch.randn(5, 9, generator=gen).t(), "scale": torch.tensor(2.5)}  # lm_head: a view
    dcp.save({"model": tensors}, checkpoint_id=str(tmp_path))
    monkeypatch.setattr(export, "EXPERT_READ_BYTES", 3 * 160 * 96 * 4 - 1)  # 2 experts a read
    got = list(export.checkpoint_tensors(tmp_path, ["layers.1.mlp.experts.w", "norm", "lm_head"]))
    assert [(n, first, tuple(t.shape)) for n, first, t in got[:2]] == [("layers.1.mlp.experts.w", 0, (2, 160, 96)),
                                                                       ("layers.1.mlp.experts.w", 2, (2, 160, 96))]
    assert len(got) == 32 + 2
    assert torch.equal(torch.cat([t for _, _, t in got[:32]]), stack)
    assert torch.equal(got[32][2], tensors["norm"]) and got[32][2].dtype == torch.bfloat16
    assert torch.equal(got[33][2], tensors["lm_head"])
    one = {"scale": torch.zeros(())}
    dcp.load({"model": one}, storage_reader=export.RowsReader(str(tmp_path)))
    assert float(one["scale"]) == 2.5
    reader = export.RowsReader(str(tmp_path))
    reader.read_metadata()
    rows = torch.empty(2, 160, 96)
    before = _rchar()
    dcp.load({"model": {"layers.1.mlp.experts.w": rows}}, storage_reader=reader, planner=export._RowsPlanner(37))
    read = _rchar() - before
    assert torch.equal(rows, stack[37:39])
    assert 2 * 160 * 96 * 4 <= read < 2 * 160 * 96 * 4 + 64 * 1024  # the two rows and the piece's zip records
