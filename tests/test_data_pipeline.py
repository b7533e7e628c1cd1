"""Data preparation (tokenizers, shards, index) and the deterministic data-parallel loader."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data.loader import DataError, TokenDataset, TokenLoader
from train.data.prepare import prepare, unigram_entropy
from train.data.tokenizer import ByteTokenizer, build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DOCS = [f"document {i}: " + "héllo wörld, the quick brown fox. " * (3 + i % 7) for i in range(60)]


def write_corpus(d: Path) -> list[str]:
    """Half the documents as .txt files, half as one .jsonl; returns them in the order prepare reads them."""
    d.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(DOCS[:30]):
        (d / f"a{i:02d}.txt").write_text(doc)
    with open(d / "b.jsonl", "w") as f:
        for doc in DOCS[30:]:
            f.write(json.dumps({"text": doc, "id": 1}) + "\n")
    return DOCS[:30] + DOCS[30:]  # a*.txt sort before b.jsonl


def stream(docs) -> np.ndarray:
    tok = ByteTokenizer()
    return np.concatenate([np.array(tok.encode(d) + [tok.eos_id]) for d in docs])


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café — 𝛑"
    assert tok.decode(tok.encode(text)) == text and max(tok.encode(text)) < 256 and tok.vocab_size == 257


def test_prepared_samples_are_the_packed_token_stream(tmp_path):
    docs = write_corpus(tmp_path / "c")
    index = prepare([str(tmp_path / "c")], tmp_path / "out", chunk_len=97, samples_per_shard=5, val_fraction=0.0,
                    progress=False)
    want = stream(docs)
    n = len(want) // 97
    ds = TokenDataset(tmp_path / "out", "train")
    assert len(ds) == n and len(index["splits"]["train"]) == -(-n // 5)  # ceil: 5 samples per shard
    got = np.concatenate([ds.sample(i) for i in range(n)])
    assert np.array_equal(got, want[: n * 97])
    counts = np.bincount(got, minlength=257)
    assert index["unigram_entropy_nats"] == pytest.approx(unigram_entropy(counts))
    p = counts[counts > 0] / counts.sum()
    assert index["unigram_entropy_nats"] == pytest.approx(float(-(p * np.log(p)).sum()))


def test_validation_split_is_every_kth_sample(tmp_path):
    write_corpus(tmp_path / "c")
    prepare([str(tmp_path / "c")], tmp_path / "out", chunk_len=50, val_fraction=0.25, progress=False)
    train, val = TokenDataset(tmp_path / "out", "train"), TokenDataset(tmp_path / "out", "val")
    total = len(train) + len(val)
    assert len(val) == total // 4
    all_samples = stream(write_corpus(tmp_path / "c2"))[: total * 50].reshape(total, 50)
    assert np.array_equal(val.sample(0), all_samples[3]) and np.array_equal(train.sample(3), all_samples[4])


def test_bpe_tokenizer_is_trained_and_saved(tmp_path):
    write_corpus(tmp_path / "c")
    index = prepare([str(tmp_path / "c")], tmp_path / "out", tokenizer="bpe:300", chunk_len=33, progress=False)
    assert index["vocab_size"] == 300 and (tmp_path / "out" / "tokenizer.json").is_file()
    tok = build_tokenizer(str(tmp_path / "out" / "tokenizer.json"))
    assert tok.decode(tok.encode(DOCS[5])) == DOCS[5]
    assert len(tok.encode(DOCS[5])) < len(DOCS[5].encode())  # merges actually compress


@pytest.mark.parametrize("args,fragment", [
    (["--input", "/nonexistent/*.txt"], "no input files matched"),
    (["--input", "BAD", "--chunk-len", "1"], "chunk_len >= 2"),
])
def test_prepare_cli_bad_input_exits_2(tmp_path, args, fragment):
    args = [a.replace("BAD", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "train.data.prepare", *args, "--output", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_prepare_cli_names_the_bad_jsonl_line_and_refuses_to_overwrite(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    cmd = [sys.executable, "-m", "train.data.prepare", "--input", str(tmp_path / "bad.jsonl"), "--output"]
    proc = subprocess.run(cmd + [str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "bad.jsonl:2" in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing half-written
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    proc = subprocess.run(cmd + [str(tmp_path / "full")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"


@pytest.fixture
def dataset(tmp_path) -> TokenDataset:
    write_corpus(tmp_path / "c")
    prepare([str(tmp_path / "c")], tmp_path / "out", chunk_len=40, samples_per_shard=7, val_fraction=0.0,
            progress=False)
    return TokenDataset(tmp_path / "out", "train")


def global_batches(loader: TokenLoader, steps: int) -> list[torch.Tensor]:
    return [torch.cat([x for x, _ in loader.next_batch()]) for _ in range(steps)]


def test_ranks_split_the_same_global_batch(dataset):
    epoch_steps = len(dataset) * (40 // 10) // 8
    steps = epoch_steps + 3  # crosses into the second epoch
    single = global_batches(TokenLoader(dataset, 9, 8, 2), steps)
    ranks = [global_batches(TokenLoader(dataset, 9, 8, 2, dp_rank=r, dp_world=2), steps) for r in range(2)]
    for s in range(steps):  # micro-step j of the global batch = rank 0's micro-batch j, then rank 1's
        interleaved = [mb for pair in zip(ranks[0][s].split(2), ranks[1][s].split(2)) for mb in pair]
        assert torch.equal(torch.cat(interleaved), single[s])
    assert not torch.equal(single[0], single[epoch_steps])  # a new epoch is reshuffled
    x, y = TokenLoader(dataset, 9, 8, 2).next_batch()[0]
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (2, 9)


def test_loader_resume_is_exact_across_layouts(dataset):
    straight = global_batches(TokenLoader(dataset, 9, 8, 2, dp_rank=0, dp_world=2), 10)
    first = TokenLoader(dataset, 9, 8, 2, dp_rank=0, dp_world=2)
    global_batches(first, 4)
    resumed = TokenLoader(dataset, 9, 8, 2, dp_rank=0, dp_world=2)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(global_batches(resumed, 6), straight[4:]))
    single = TokenLoader(dataset, 9, 8, 4)  # same position, now one rank with bigger micro-batches
    single.load_state_dict(first.state_dict())
    # rank 0 of 2 (micro-batch 2) holds micro-steps' first halves: rows 0-1 and 4-5 of the one-rank batch
    assert torch.equal(global_batches(single, 1)[0][[0, 1, 4, 5]], straight[4])


def test_validation_batches_are_fixed(dataset):
    loader = TokenLoader(dataset, 9, 8, 2)
    a, b = loader.val_batches(3, 2), loader.val_batches(3, 2)
    assert len(a) == 3 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    assert torch.equal(a[0][0][0], torch.from_numpy(dataset.sample(0)[:9].astype(np.int64)))


def test_corruption_is_reported_with_the_shard_name(dataset):
    root = dataset.root
    shard = root / "train" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    offset = json.loads((root / "index.json").read_text())["splits"]["train"][1]["samples"][0][0]
    data[offset + 3] ^= 0xFF  # flip a byte inside a token payload
    shard.write_bytes(bytes(data))
    ds = TokenDataset(root, "train")
    with pytest.raises(DataError, match="shard-000001.tar is corrupt"):
        ds.sample(7)
    shard.write_bytes(bytes(data[:500]))  # truncated
    with pytest.raises(DataError, match="shard-000001.tar is missing or truncated"):
        TokenDataset(root, "train")


def test_window_longer_than_samples_is_an_error(dataset):
    with pytest.raises(DataError, match="data.seq_len=64 needs windows of 65 tokens"):
        TokenLoader(dataset, 64, 8, 2)
