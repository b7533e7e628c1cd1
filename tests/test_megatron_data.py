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
