"""Megatron indexed corpora (data=megatron): the loader yields megatron-core's own GPTDataset sequences, blends
follow their weights, runs resume bit-exactly and train alike under every layout, and bad corpora or blend
settings are one line each before any model is built. Corpora are written here by megatron-core's own
IndexedDatasetBuilder, an independent writer."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from train.config import DataConfig
from train.data.loader import DataError
from train.data.megatron import megatron_loaders
from train.schedule import BatchSchedule

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    from megatron.core.datasets.utils import Split


def write_corpus(prefix: Path, n_docs: int, lo: int, hi: int, seed: int, dtype=np.uint16) -> str:
    """n_docs documents of 5-150 random token ids in [lo, hi), each ending with token lo (its end-of-document)."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for _ in range(n_docs):
        doc = np.append(rng.integers(lo + 1, hi, size=int(rng.integers(5, 150))), lo)
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


class RefTokenizer:
    """The least GPTDataset needs of a tokenizer (for the reference built straight from megatron-core)."""
    vocab_size, eod, unique_identifiers = None, 0, {"class": "RefTokenizer"}


def loaders(prefixes, weights=(), split="90,10,0", seq_len=37, steps=8, gbs=8, mbs=4, seed=5, cache=None,
            vocab_size=1000, rank=0, world=1):
    data = DataConfig(format="megatron", prefixes=tuple(prefixes), weights=tuple(weights), split=split,
                      seq_len=seq_len, val_batches=2)
    return megatron_loaders(data, vocab_size, seed, BatchSchedule(gbs, seq_len), steps, cache,
                            global_batch_size=gbs, micro_batch_size=mbs, dp_rank=rank, dp_world=world)


def stream(loader, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of this rank over `steps` steps, rows in the order the loader yields them."""
    batches = [mb for _ in range(steps) for mb in loader.next_batch()]
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("megatron")
    return {"a": write_corpus(base / "a", 60, 0, 100, 1), "b": write_corpus(base / "b", 40, 100, 200, 2),
            "small": write_corpus(base / "small", 20, 0, 100, 3)}


def test_first_64_samples_are_megatron_cores_gpt_dataset(corpora, tmp_path):
    seq_len, seed, steps = 37, 5, 8  # 8 steps x 8 sequences = 64; several epochs of the small corpus
    train, _ = loaders([corpora["small"]], seq_len=seq_len, seed=seed, steps=steps, cache=tmp_path / "ours")
    inputs, labels = stream(train, steps)
    config = GPTDatasetConfig(random_seed=seed, sequence_length=seq_len, blend=([corpora["small"]], None),
                              split="90,10,0", path_to_cache=str(tmp_path / "ref"), tokenizer=RefTokenizer(),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)
    indexed = IndexedDataset(corpora["small"])
    docs = np.arange(0, round(0.9 * len(indexed)), dtype=np.int32)  # the train share of the documents
    ref = GPTDataset(indexed, corpora["small"], docs, 64, Split.train, config)
    assert len(ref) >= 64 and inputs.shape == (64, seq_len)
    assert torch.equal(inputs, torch.stack([ref[i]["tokens"] for i in range(64)]))
    assert torch.equal(labels, torch.stack([ref[i]["labels"] for i in range(64)]))
    assert indexed.sequence_lengths[docs].sum() < 40 * seq_len  # 64 sequences span two epochs of the corpus


def found_in(docs: list[np.ndarray], run: torch.Tensor) -> bool:
    return any(np.lib.stride_tricks.sliding_window_view(d, len(run)).__eq__(run.numpy()).all(1).any()
               for d in docs if len(d) >= len(run))


def test_validation_comes_from_the_held_out_documents(corpora, tmp_path):
    _, val = loaders([corpora["a"]], cache=tmp_path)
    indexed = IndexedDataset(corpora["a"])
    held_out = [indexed[i].astype(np.int64) for i in range(54, 60)]  # the validation 10% of 60 documents
    trained = [indexed[i].astype(np.int64) for i in range(54)]
    (x, _), = val.val_batches(1, 8)
    assert x.shape == (8, 37)
    for row in x:  # each row starts inside a held-out document (6 random ids never recur by chance)
        assert found_in(held_out, row[:6]) and not found_in(trained, row[:6])
    assert torch.equal(val.val_batches(1, 8)[0][0], x)  # the same batch on every call


def test_blend_follows_its_weights(corpora, tmp_path):
    steps, gbs = 250, 8  # 2,000 sequences
    train, _ = loaders([corpora["a"], corpora["b"]], weights=[0.8, 0.2], steps=steps, gbs=gbs, mbs=8,
                       cache=tmp_path)
    inputs, _ = stream(train, steps)
    from_a = (inputs < 100).all(1)
    from_b = (inputs >= 100).all(1)
    assert int(from_a.sum() + from_b.sum()) == 2000  # every sequence comes from one corpus
    assert abs(float(from_a.float().mean()) - 0.8) < 0.02
    assert abs(float(from_b.float().mean()) - 0.2) < 0.02


def test_ranks_read_disjoint_parts_of_the_same_global_batch(corpora, tmp_path):
    one, _ = loaders([corpora["a"], corpora["b"]], weights=[3, 1], mbs=4, cache=tmp_path)
    ranks = [loaders([corpora["a"], corpora["b"]], weights=[3, 1], mbs=2, rank=r, world=2, cache=tmp_path)[0]
             for r in range(2)]
    for _ in range(3):
        (x,  _), (x2, _) = one.next_batch()
        parts = [r.next_batch() for r in ranks]  # per rank: two micro-batches of 2
        # micro-step j of all ranks = rows [j*4, (j+1)*4) of the step
        assert torch.equal(torch.cat([parts[0][0][0], parts[1][0][0], parts[0][1][0], parts[1][1][0]]),
                           torch.cat([x, x2]))


# ------------------------------------------------------------------------------------------ end to end
def megatron_args(corpora, out: Path, steps: int, **extra) -> dict:
    from conftest import base_args
    return base_args("unused", out, steps, **{"data": "megatron", "data.prefixes": f"[{corpora['a']},{corpora['b']}]",
                                                "data.weights": "[0.7,0.3]", "data.split": "90/10/0", **extra})


def test_sigkill_and_resume_on_a_blend_is_bit_exact(corpora, tmp_path):
    from conftest import metrics, train, train_killed
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(megatron_args(corpora, straight, 6))
    args = megatron_args(corpora, killed, 6, **{"checkpoint.every": 3})
    train_killed(args, 1, killed, after_step=4, checkpoint=3)
    cache = {p.name: p.stat().st_mtime_ns for p in (killed / "data_cache").glob("*.npy")}
    train(args)
    assert len(cache) == 16  # 3 indices per corpus and split (2 x 2), 2 per split of the blend
    assert {p.name: p.stat().st_mtime_ns for p in (killed / "data_cache").glob("*.npy")} == cache  # reused
    assert list(metrics(killed)) == list(range(1, 7))
    assert metrics(killed) == metrics(straight)  # identical floats, bit for bit
    assert metrics(killed, "grad_norm") == metrics(straight, "grad_norm")


@pytest.fixture(scope="module")
def blend_reference(corpora, tmp_path_factory) -> Path:
    """One process, micro-batch 2: what both layouts below must reproduce (each micro-step is 2 sequences)."""
    from test_parallel_layouts import BALANCE
    from conftest import train
    ref = tmp_path_factory.mktemp("blend_ref") / "ref"
    train(megatron_args(corpora, ref, 3, **{**BALANCE, "train.micro_batch_size": 2}))
    return ref


@pytest.mark.parametrize("layout", [{"parallel.ep": 2}, {"parallel.pp": 2}], ids=["ep2", "pp2"])
def test_layout_on_a_blend_equals_single_process(corpora, blend_reference, tmp_path, layout):
    from test_parallel_layouts import BALANCE, assert_same_run
    from conftest import train
    mb = 1 if "parallel.ep" in layout else 2  # ep=2 is two data-parallel ranks; pp=2 one
    out = tmp_path / "run"
    train(megatron_args(corpora, out, 3, **{**BALANCE, "train.micro_batch_size": mb, **layout}), 2)
    assert_same_run(blend_reference, out, tmp_path)


# ------------------------------------------------------------------------------------------ preparation
def test_prepare_megatron_is_the_same_for_any_number_of_workers(tmp_path):
    import subprocess
    import sys
    import sysconfig
    from conftest import ROOT
    from train.data.prepare_megatron import parts, prepare_megatron
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(stdlib / f"{name}.py") for name in ("bisect", "csv", "shlex", "string")]
    assert len(parts([Path(f) for f in files], 10000)) == 3  # so two workers share the work
    outs = {1: tmp_path / "w1", 2: tmp_path / "w2"}
    prepare_megatron(files, outs[1], workers=1, part_bytes=10000, progress=False)
    subprocess.run([sys.executable, "-m", "train.data.prepare", "--format", "megatron", "--input", *files,
                    "--output", str(outs[2]), "--workers", "2", "--part-bytes", "10000"],
                   cwd=ROOT, check=True, capture_output=True)
    for ext in (".bin", ".idx"):
        assert Path(f"{outs[1]}{ext}").read_bytes() == Path(f"{outs[2]}{ext}").read_bytes()
    corpus = IndexedDataset(str(outs[2]))
    assert len(corpus) == 4  # one sequence per document (file), each ending with the byte tokenizer's 256
    for i, f in enumerate(files):
        doc = corpus[i]
        assert doc[-1] == 256 and bytes(doc[:-1].astype(np.uint8)) == Path(f).read_bytes()


# ------------------------------------------------------------------------------------------ bad input
def run_megatron(corpora, tmp_path, **over):
    from conftest import train
    return train(megatron_args(corpora, tmp_path / "run", 1, **over), check=False)


def one_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and " INFO " not in ln and "warn" not in ln.lower()]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("over,code,fragment", [
    ({"data.weights": "[1,2,3]"}, 2, "data.weights has 3 entries for 2 data.prefixes"),
    ({"model.vocab_size": 150}, 1, "holds token id 199 >= model.vocab_size=150"),
])
def test_bad_blend_or_corpus_is_one_line_before_the_model(corpora, tmp_path, over, code, fragment):
    proc = run_megatron(corpora, tmp_path, **over)
    assert proc.returncode == code and fragment in one_line(proc)
    assert "holds parameters" not in proc.stderr  # no model was built


@pytest.mark.parametrize("over,fragment", [
    ({"weights": (0.5, -0.5)}, "data.weights must be numbers >= 0"),
    ({"weights": (0, 0)}, "data.weights are all zero"),
    ({"split": "0/50/50"}, "data.split must be up to three shares"),
    ({"prefixes": ()}, "data=megatron needs data.prefixes"),
])
def test_bad_blend_settings_are_config_errors(over, fragment):
    from train.config import ConfigError, RunConfig, validate
    cfg = RunConfig(data=DataConfig(**{"format": "megatron", "prefixes": ("x", "y"), **over}))
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        validate(cfg)


def test_broken_corpora_are_named(corpora, tmp_path):
    import shutil
    from train.data.megatron import check_corpora
    bad = {}
    for name in ("truncated", "mismatched", "not_an_index"):
        for ext in (".bin", ".idx"):
            shutil.copy(corpora["a"] + ext, tmp_path / f"{name}{ext}")
        bad[name] = str(tmp_path / name)
    Path(bad["truncated"] + ".bin").write_bytes(Path(bad["truncated"] + ".bin").read_bytes()[:-10])
    shutil.copy(corpora["b"] + ".idx", bad["mismatched"] + ".idx")
    Path(bad["not_an_index"] + ".idx").write_bytes(b"MMIDIDX" + bytes(40))
    bad["empty"] = write_corpus(tmp_path / "empty", 0, 0, 100, 4)
    bad["missing"] = str(tmp_path / "missing")
    bad["two_documents"] = write_corpus(tmp_path / "two_documents", 2, 0, 100, 5)
    expect = {"truncated": "does not match", "mismatched": "does not match", "not_an_index": "is not a Megatron index",
              "empty": "is empty", "missing": "not found", "two_documents": "validation share of data.split"}
    for name, fragment in expect.items():
        with pytest.raises(DataError) as e:
            check_corpora([corpora["a"], bad[name]], 1000, tmp_path / "cache", "90,10,0")
        assert fragment in str(e.value) and bad[name] in str(e.value) and "\n" not in str(e.value), name
