"""Data pipeline: tokenizers, `python -m train.data.prepare` (shards + index), random-access reading, the
deterministic data-parallel loader (layout independence, exact resume, epochs), corruption reports and the
built-in dataset. Expected values are computed here from the definitions, not by the code under test."""

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data.builtin import CHUNK_LEN, stdlib_sources
from train.data.loader import DataError, TokenDataset, TokenLoader
from train.data.prepare import prepare
from train.schedule import BatchSchedule
from train.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
EOS = 256
TXT_DOCS = {"a.txt": "plain ascii text. " * 9, "b.md": "naïve café — 𝛑 ≈ 3.14159\n" * 5,
            "sub/c.txt": "def f(x):\n    return x * 2\n" * 7}
JSONL_DOCS = [f"record {i}: " + "the quick brown fox " * (i % 4 + 1) for i in range(12)]


def run_prepare(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.data.prepare", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env)


def write_corpus(d: Path) -> list[str]:
    """A directory of text files (plus a file prepare must skip) and a .jsonl; returns the documents in the
    order prepare reads them for inputs [d/docs, d/extra.jsonl]."""
    for name, text in TXT_DOCS.items():
        (d / "docs" / name).parent.mkdir(parents=True, exist_ok=True)
        (d / "docs" / name).write_text(text)
    (d / "docs" / "skip.bin").write_bytes(b"\x00\x01 not a document")
    with open(d / "extra.jsonl", "w") as f:
        for i, doc in enumerate(JSONL_DOCS):
            f.write(json.dumps({"text": doc, "id": i}) + ("\n\n" if i == 3 else "\n"))  # a blank line is skipped
    return list(TXT_DOCS.values()) + JSONL_DOCS


def byte_stream(docs: list[str]) -> np.ndarray:
    """The concatenated byte tokens of the documents, each followed by the end-of-document id."""
    return np.array([t for d in docs for t in [*d.encode(), EOS]], dtype=np.int64)


# ----------------------------------------------------------------------------------------- tokenizers
def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café — 𝛑\n\ttab"
    ids = tok.encode(text)
    assert ids[:3] == [110, 97, 195] and len(ids) == len(text.encode()) and max(ids) < 256
    assert tok.decode(ids) == text and tok.decode(ids + [tok.eos_id]) == text
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte character decodes to the replacement char
    assert (tok.vocab_size, tok.eos_id) == (257, 256)


def test_bpe_is_trained_saved_and_reloaded(tmp_path):
    docs = write_corpus(tmp_path)
    index = prepare([str(tmp_path / "docs"), str(tmp_path / "extra.jsonl")], tmp_path / "out", tokenizer="bpe:300",
                    chunk_len=16, val_fraction=0.0, progress=False)
    tok = build_tokenizer(str(tmp_path / "out" / "tokenizer.json"))
    assert index["tokenizer"] == "bpe:300" and index["tokenizer_file"] == "tokenizer.json"
    assert index["vocab_size"] == tok.vocab_size == 300 and index["eos_id"] == tok.eos_id
    assert tok.eos_id == tok.tok.token_to_id("<|endoftext|>")
    assert all(tok.decode(tok.encode(d)) == d for d in docs)
    n_tokens = sum(len(tok.encode(d)) + 1 for d in docs)
    assert n_tokens < 0.7 * sum(len(d.encode()) + 1 for d in docs)  # merges actually compress
    assert len(TokenDataset(tmp_path / "out", "train")) == n_tokens // 16
    with pytest.raises(ValueError, match="no end-of-document token among"):
        HFTokenizer(tmp_path / "out" / "tokenizer.json", eos_token="<nope>")


# ----------------------------------------------------------------------------------------- prepare
def test_prepare_cli_writes_the_packed_stream(tmp_path):
    docs = write_corpus(tmp_path)
    out = tmp_path / "ds"
    proc = run_prepare("--input", str(tmp_path / "docs"), str(tmp_path / "extra.jsonl"), "--output", str(out),
                       "--chunk-len", "64", "--samples-per-shard", "3", "--val-fraction", "0.2")
    assert proc.returncode == 0, proc.stderr
    want = byte_stream(docs)
    n = len(want) // 64
    samples = want[: n * 64].reshape(n, 64)
    val_rows = [i for i in range(n) if i % 5 == 4]  # val fraction 0.2, seed 0: every fifth sample
    index = json.loads((out / "index.json").read_text())
    assert (index["chunk_len"], index["dtype"], index["vocab_size"], index["eos_id"]) == (64, "uint16", 257, 256)
    train, val = TokenDataset(out, "train"), TokenDataset(out, "val")
    assert (len(train), len(val)) == (n - len(val_rows), len(val_rows)) and len(val) >= 2
    assert index["train_tokens"] == len(train) * 64
    assert np.array_equal(np.stack([val.sample(i) for i in range(len(val))]), samples[val_rows])
    train_rows = [i for i in range(n) if i not in val_rows]
    assert np.array_equal(np.stack([train.sample(i) for i in range(len(train))]), samples[train_rows])
    per_shard = [s["num_samples"] for s in index["splits"]["train"]]
    assert per_shard == [min(3, len(train) - k) for k in range(0, len(train), 3)]
    assert not list(tmp_path.glob("ds.tmp-*"))  # the temporary directory was renamed, not left behind


def test_shards_are_webdataset_tars_with_exact_payload_offsets_and_the_index_has_the_entropy(tmp_path):
    docs = write_corpus(tmp_path)
    index = prepare([str(tmp_path / "docs"), str(tmp_path / "extra.jsonl")], tmp_path / "ds", chunk_len=50,
                    samples_per_shard=4, val_fraction=0.0, progress=False)
    samples = byte_stream(docs)[: len(byte_stream(docs)) // 50 * 50].reshape(-1, 50)
    k = 0
    for shard in index["splits"]["train"]:
        path = tmp_path / "ds" / "train" / shard["file"]
        assert path.stat().st_size == shard["bytes"]
        with tarfile.open(path) as tar:
            assert [m.name for m in tar.getmembers()] == [f"{j:09d}.tokens" for j in range(k, k + shard["num_samples"])]
        raw = path.read_bytes()
        for offset, length, _ in shard["samples"]:
            assert raw[offset:offset + length] == samples[k].astype("<u2").tobytes()  # little-endian uint16
            k += 1
    assert k == len(samples)
    counts = np.bincount(samples.ravel(), minlength=257)  # every sample is in train (no validation split)
    p = counts[counts > 0] / counts.sum()
    assert index["unigram_entropy_nats"] == pytest.approx(float(-(p * np.log(p)).sum()))


def test_validation_split_depends_on_seed_and_exists_for_two_samples(tmp_path):
    (tmp_path / "doc.txt").write_text("x" * 99)  # 100 tokens with eos
    index = prepare([str(tmp_path / "doc.txt")], tmp_path / "two", chunk_len=50, val_fraction=0.01, progress=False)
    assert [len(index["splits"][s][0]["samples"]) for s in ("train", "val")] == [1, 1]
    write_corpus(tmp_path)
    inputs = [str(tmp_path / "docs"), str(tmp_path / "extra.jsonl")]
    for seed in (0, 1):
        prepare(inputs, tmp_path / f"seed{seed}", chunk_len=20, val_fraction=0.25, progress=False, seed=seed)
    val0, val1 = (TokenDataset(tmp_path / f"seed{seed}", "val") for seed in (0, 1))
    assert abs(len(val0) - len(val1)) <= 1 and not np.array_equal(val0.sample(0), val1.sample(0))


def test_prepare_cli_refuses_a_non_empty_output(tmp_path):
    write_corpus(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    proc = run_prepare("--input", str(tmp_path / "docs"), "--output", str(tmp_path / "full"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "not empty" in proc.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"
    prepare([str(tmp_path / "docs")], tmp_path / "full", chunk_len=8, overwrite=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["index.json", "train", "val"]


@pytest.mark.parametrize("case,fragment", [
    ("nomatch", "no input files matched"),
    ("chunklen", "chunk_len >= 2"),
    ("empty", "fewer than chunk_len=4097 tokens"),
    ("badjson", "bad.jsonl:3"),
    ("missingkey", "bad.jsonl:2: expected a JSON object with a string field 'text'"),
])
def test_prepare_cli_bad_input_is_one_line_and_exit_2(tmp_path, case, fragment):
    (tmp_path / "short.txt").write_text("too short for one sample")
    lines = {"badjson": ['{"text": "a"}', '{"text": "b"}', '{"text": '], "missingkey": ['{"text": "a"}', '{"txt": 1}']}
    (tmp_path / "bad.jsonl").write_text("\n".join(lines.get(case, [])) + "\n")
    inputs = {"nomatch": str(tmp_path / "nothing*.txt"), "chunklen": str(tmp_path),
              "empty": str(tmp_path / "short.txt")}
    chunk_len = ["--chunk-len", "1"] if case == "chunklen" else []
    proc = run_prepare("--input", inputs.get(case, str(tmp_path / "bad.jsonl")), *chunk_len, "--output",
                       str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and fragment in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


# ----------------------------------------------------------------------------------------- loader
CHUNK, SEQ = 40, 9  # 4 windows of 10 tokens per sample


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> TokenDataset:
    d = tmp_path_factory.mktemp("loader")
    write_corpus(d)
    prepare([str(d / "docs"), str(d / "extra.jsonl")], d / "ds", chunk_len=CHUNK, samples_per_shard=7,
            val_fraction=0.1, progress=False)
    return TokenDataset(d / "ds", "train")


def reference_windows(ds: TokenDataset, seed: int, count: int) -> torch.Tensor:
    """The first `count` windows of the stream, straight from the definition."""
    rows, epoch = [], 0
    while len(rows) < count:
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed * 1000003 + epoch))
        rows += [ds.sample(int(s))[w * (SEQ + 1):(w + 1) * (SEQ + 1)] for s in perm for w in range(CHUNK // (SEQ + 1))]
        epoch += 1
    return torch.from_numpy(np.stack(rows[:count]).astype(np.int64))


def global_batches(loaders: list[TokenLoader], steps: int) -> list[torch.Tensor]:
    """Each step's windows (inputs + last label) over all ranks, micro-step by micro-step, ranks within one."""
    out = []
    for _ in range(steps):
        per_rank = [loader.next_batch() for loader in loaders]
        mbs = [rank[j] for j in range(len(per_rank[0])) for rank in per_rank]
        out.append(torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in mbs]))
    return out


def test_batches_follow_the_definition_and_ranks_split_them(dataset):
    G, steps = 12, 2 * len(dataset) * 4 // 12 + 2  # runs into a third epoch
    want = reference_windows(dataset, seed=3, count=G * steps).split(G)
    single = global_batches([TokenLoader(dataset, SEQ, G, 3, seed=3)], steps)
    ranks = global_batches([TokenLoader(dataset, SEQ, G, 2, dp_rank=r, dp_world=2, seed=3) for r in range(2)], steps)
    for s in range(steps):
        assert torch.equal(single[s], want[s]) and torch.equal(ranks[s], want[s]), f"step {s}"
    x, y = TokenLoader(dataset, SEQ, G, 3).next_batch()[0]
    assert x.shape == y.shape == (3, SEQ) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])


def test_epoch_crossing_continues_with_the_next_permutation(dataset):
    per_epoch = len(dataset) * 4
    G = 8 if per_epoch % 8 else 6
    assert per_epoch % G, "the test needs a step that straddles two epochs"
    loader = TokenLoader(dataset, SEQ, G, G, seed=5)
    loader.load_state_dict({"steps": per_epoch // G, "seed": 5, "seq_len": SEQ, "global_batch_size": G})
    (x, y), = loader.next_batch()
    tail = per_epoch % G  # windows still left in epoch 0
    perm0 = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(5 * 1000003))
    perm1 = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(5 * 1000003 + 1))
    last = dataset.sample(int(perm0[-1]))
    assert torch.equal(x[tail - 1], torch.from_numpy(last[30:39].astype(np.int64)))  # window 3 of the last sample
    first = dataset.sample(int(perm1[0]))
    assert torch.equal(x[tail], torch.from_numpy(first[:9].astype(np.int64)))
    assert torch.equal(y[tail], torch.from_numpy(first[1:10].astype(np.int64)))


def test_resume_is_exact_and_independent_of_the_layout(dataset, caplog):
    G = 8
    straight = global_batches([TokenLoader(dataset, SEQ, G, 2, seed=1)], 7)
    first = [TokenLoader(dataset, SEQ, G, 2, dp_rank=r, dp_world=2, seed=1) for r in range(2)]
    global_batches(first, 3)
    state = first[0].state_dict()
    assert state == first[1].state_dict() and state["steps"] == 3
    for world, mb in [(2, 2), (4, 1), (1, 8)]:
        resumed = [TokenLoader(dataset, SEQ, G, mb, dp_rank=r, dp_world=world, seed=1) for r in range(world)]
        for loader in resumed:
            loader.load_state_dict(dict(state))
        assert all(torch.equal(a, b) for a, b in zip(global_batches(resumed, 4), straight[3:])), world
    assert not caplog.records
    TokenLoader(dataset, SEQ + 1, G, 2, seed=1).load_state_dict(state)
    assert "seq_len" in caplog.text and "changed settings" in caplog.text


def test_ramp_up_stream_follows_the_definition_under_any_layout(dataset, caplog):
    """Batch-size ramp-up 4 -> 12 by 4 over 200 tokens of 9-token sequences (one increase per 100 tokens): three
    steps of 4 (108 tokens), two of 8 (252), then 12; step s takes the next `size(s)` windows of the same stream,
    split over ranks
    as a constant batch is, and a resumed loader (another layout) continues it."""
    batches = BatchSchedule(12, SEQ, start=4, increment=4, ramp_tokens=200)
    assert [batches.size(s) for s in range(7)] == [4, 4, 4, 8, 8, 12, 12]
    want = reference_windows(dataset, seed=2, count=batches.sequences_before(8))
    want = [want[batches.sequences_before(s):batches.sequences_before(s + 1)] for s in range(8)]
    single = global_batches([TokenLoader(dataset, SEQ, 12, 4, seed=2, batches=batches)], 8)
    ranks = [TokenLoader(dataset, SEQ, 12, 2, dp_rank=r, dp_world=2, seed=2, batches=batches) for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(single, want))
    assert all(torch.equal(a, b) for a, b in zip(global_batches(ranks, 4), want[:4]))
    resumed = [TokenLoader(dataset, SEQ, 12, 1, dp_rank=r, dp_world=4, seed=2, batches=batches) for r in range(4)]
    for loader in resumed:
        loader.load_state_dict(ranks[0].state_dict())
    assert all(torch.equal(a, b) for a, b in zip(global_batches(resumed, 4), want[4:]))
    assert not caplog.records
    TokenLoader(dataset, SEQ, 12, 2, seed=2).load_state_dict(ranks[0].state_dict())  # resumed without the ramp-up
    assert "rampup" in caplog.text and "changed settings" in caplog.text
    with pytest.raises(ValueError, match="does not split"):  # a first batch of 4 over 4 ranks x 2 sequences
        TokenLoader(dataset, SEQ, 16, 2, dp_world=4,
                    batches=BatchSchedule(16, SEQ, start=4, increment=4, ramp_tokens=99))


def test_validation_batches_are_fixed_and_sharded(dataset):
    val = TokenDataset(dataset.root, "val")
    single = TokenLoader(val, SEQ, 8, 2).val_batches(3, 4)
    again = TokenLoader(val, SEQ, 8, 2).val_batches(3, 4)
    ranks = [TokenLoader(val, SEQ, 8, 2, dp_rank=r, dp_world=2).val_batches(3, 2) for r in range(2)]
    n = min(3, len(val) * 4 // 4)
    assert len(single) == n >= 2
    file_order = [val.sample(i)[w * 10:w * 10 + 10] for i in range(len(val)) for w in range(4)]
    for b in range(n):
        assert torch.equal(single[b][0], again[b][0])
        assert torch.equal(torch.cat([ranks[0][b][0], ranks[1][b][0]]), single[b][0])
        want = torch.from_numpy(np.stack(file_order[b * 4:b * 4 + 4]).astype(np.int64))
        assert torch.equal(single[b][0], want[:, :-1]) and torch.equal(single[b][1], want[:, 1:])


def test_bad_loader_arguments_name_the_numbers(dataset):
    with pytest.raises(DataError, match=r"seq_len=40 needs windows of 41 tokens .*chunk_len=40"):
        TokenLoader(dataset, 40, 8, 2)
    with pytest.raises(ValueError, match=r"global_batch_size=10 is not divisible by dp_world\*micro_batch_size = 2\*2"):
        TokenLoader(dataset, SEQ, 10, 2, dp_rank=0, dp_world=2)


def test_corrupt_truncated_or_missing_data_is_reported_by_name(tmp_path):
    write_corpus(tmp_path)
    root = tmp_path / "ds"
    index = prepare([str(tmp_path / "docs")], root, chunk_len=20, samples_per_shard=4, val_fraction=0.0, progress=False)
    shard = root / "train" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[index["splits"]["train"][1]["samples"][2][0] + 5] ^= 0x01  # one bit of sample 6's payload
    shard.write_bytes(bytes(data))
    ds = TokenDataset(root, "train")
    assert len(ds.sample(5)) == 20  # its neighbours still read fine
    with pytest.raises(DataError, match="shard-000001.tar is corrupt"):
        ds.sample(6)
    shard.write_bytes(bytes(data[:1000]))
    with pytest.raises(DataError, match="shard-000001.tar is missing or truncated: 1000 bytes"):
        TokenDataset(root, "train")
    shard.unlink()
    with pytest.raises(DataError, match="shard-000001.tar is missing or truncated: no such file"):
        TokenDataset(root, "train")
    (root / "index.json").write_text('{"format": 1, "splits": ')
    with pytest.raises(DataError, match="index.json is not a valid dataset index"):
        TokenDataset(root, "train")
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere' / 'index.json'} not found"):
        TokenDataset(tmp_path / "nowhere", "train")


# ----------------------------------------------------------------------------------------- built-in
def test_builtin_dataset_is_prepared_once_and_reports_its_entropy(tmp_path):
    env = {**os.environ, "DSV2_DATA_CACHE": str(tmp_path / "cache")}
    code = ("import logging; logging.basicConfig(level=logging.INFO); "
            "from train.data.builtin import builtin_dataset; print(builtin_dataset())")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # two ranks at once
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert {o.strip() for o, _ in outs} == {str(tmp_path / "cache" / "builtin-stdlib-v1")}
    assert sum("preparing the built-in dataset" in e for _, e in outs) == 1
    path = Path(outs[0][0].strip())
    index = json.loads((path / "index.json").read_text())
    train = TokenDataset(path, "train")
    tokens = np.concatenate([train.sample(i) for i in range(len(train))])
    counts = np.bincount(tokens, minlength=257)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    assert index["unigram_entropy_nats"] == pytest.approx(entropy, rel=1e-9) and 3.0 < entropy < 4.5
    assert index["unigram_entropy_bits"] == pytest.approx(entropy / math.log(2))
    assert index["chunk_len"] == CHUNK_LEN and 6e6 < len(tokens) < 8.1e6 and counts[EOS] > 100
    n_val = len(TokenDataset(path, "val"))
    assert n_val == (len(train) + n_val) // 100
    first = stdlib_sources()[0].read_text(encoding="utf-8", errors="replace")
    assert ByteTokenizer().decode(train.sample(0))[:200] == first[:200]


def test_builtin_dataset_serves_longer_sequences(tmp_path):
    """data.seq_len=2048 on the built-in corpus: its own copy in samples of 2,049 tokens, prepared on first use
    (the 1,025-token copy serves every seq_len up to 1,024)."""
    from train.data.builtin import builtin_dataset, chunk_len_for

    assert [chunk_len_for(n) for n in (None, 64, 1024, 1025, 2048)] == [1025, 1025, 1025, 1026, 2049]
    path = builtin_dataset(tmp_path, seq_len=2048)
    assert path.name == "builtin-stdlib-v1-c2049"
    loader = TokenLoader(TokenDataset(path, "train"), 2048, 2, 2)
    (x, y), = loader.next_batch()
    assert x.shape == (2, 2048) and torch.equal(x[:, 1:], y[:, :-1])
