"""Megatron indexed corpora (`.bin/.idx` pairs written by Megatron-LM's tools or `prepare --format megatron`) as
the trainer's batch stream, read, split, sampled and blended by megatron.core.datasets.

megatron-core builds the index: `GPTDataset` (one prefix: documents shuffled per epoch, packed into sequences of
seq_len + 1 tokens, the sequences shuffled) or `BlendedDataset` over one GPTDataset per prefix (sequence g of the
blend comes from the source whose share so far lags its weight most). Sequence g of that index is global window
g of our stream, so `TokenLoader`'s step / micro-step / rank arithmetic, resume position and validation apply
unchanged. The indices are built once for the whole run (sizes from train.steps) by global rank 0 first, under a
file lock in the cache directory, then read from that cache by the other ranks (megatron-core's own barrier) and
on every restart.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import logging
import os
import struct
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch.distributed as dist

from ..schedule import BatchSchedule
from .loader import DataError, TokenLoader

log = logging.getLogger(__name__)


def _datasets():
    """megatron.core.datasets' GPT classes; importing megatron.core warns that Transformer Engine and Apex are
    absent, which concerns its models, not its datasets."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return BlendedMegatronDatasetBuilder, GPTDataset, GPTDatasetConfig, IndexedDataset


@dataclass(frozen=True)
class CorpusTokenizer:
    """What GPTDataset asks of a tokenizer when the corpus is already tokenized: no vocabulary size (the index
    records its dtype), no pad id (so no token is masked as padding) and an eod id it only reads to reset
    positions or masks at document ends, which the trainer does not do."""
    eod: int | None = None
    vocab_size: int | None = None
    unique_identifiers: dict = field(default_factory=lambda: {"class": "CorpusTokenizer"})  # part of the cache key


def gpt_config(prefixes: list[str], weights: list[float] | None, split: str, seq_len: int, seed: int,
               cache_dir: str | Path):
    """The GPTDatasetConfig of a blend: sequences of seq_len + 1 tokens, no masks or position resets."""
    _, _, GPTDatasetConfig, _ = _datasets()
    return GPTDatasetConfig(random_seed=seed, sequence_length=seq_len, blend=(list(prefixes), weights),
                            split=split, path_to_cache=str(cache_dir), tokenizer=CorpusTokenizer(),
                            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                            create_attention_mask=False)


class MegatronSamples:
    """One split of a megatron-core dataset as the loader's dataset: sample i is the index's sequence i
    (seq_len + 1 token ids). `ds` is None for a split the blend's split string leaves empty."""

    def __init__(self, ds, seq_len: int, root: str, split: str):
        self.ds, self.chunk_len, self.root, self.split = ds, seq_len + 1, root, split

    def __len__(self) -> int:
        return 0 if self.ds is None else len(self.ds)

    def sample(self, i: int) -> np.ndarray:
        item = self.ds[i]  # tokens = sequence[:-1], labels = sequence[1:]
        return np.concatenate([item["tokens"].numpy(), item["labels"][-1:].numpy()])

    def close(self) -> None:
        pass


class MegatronLoader(TokenLoader):
    """TokenLoader over MegatronSamples: megatron-core's index is already shuffled, so global window g is its
    sequence g (wrapping around should a resumed run outlast the index it was built for)."""

    def window(self, g: int, shuffle: bool = True) -> np.ndarray:
        return self.ds.sample(g % len(self.ds))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "index_sequences": len(self.ds)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("index_sequences", len(self.ds)) != len(self.ds):
            log.warning("data=megatron resumed on an index of %d sequences, built for another run length (%s "
                        "before): megatron-core's shuffle differs, so the stream differs from the original run",
                        len(self.ds), state["index_sequences"])
        super().load_state_dict(state)


# --------------------------------------------------------------------------------------------- building
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextmanager
def _process_group():
    """megatron-core's BlendedDataset asks torch.distributed for the rank when it writes its cache; a lone
    process gets a one-rank gloo group (an in-memory store) for the build, removed afterwards."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextmanager
def _cache_lock(cache_dir: Path):
    """Global rank 0 holds an exclusive lock on the cache while it builds (runs sharing a cache wait)."""
    if _rank() != 0:
        yield
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def blend_weights(prefixes: list[str], weights: list[float]) -> tuple[list[str], list[float] | None]:
    """(prefixes, weights) as megatron-core takes them: zero-weight sources dropped; no weights given means by
    size (tokens in each corpus); None for a lone corpus, which megatron-core then reads without a blend."""
    if not weights:
        weights = [float(corpus_tokens(p)) for p in prefixes]
    kept = [(p, float(w)) for p, w in zip(prefixes, weights) if w > 0]
    if len(kept) == 1:
        return [kept[0][0]], None
    return [p for p, _ in kept], [w for _, w in kept]


def corpus_tokens(prefix: str) -> int:
    _, _, _, IndexedDataset = _datasets()
    corpus = IndexedDataset(prefix)  # held while its index is read: the index's memory map closes with it
    return int(corpus.index.sequence_lengths.sum(dtype=np.int64))


def build_datasets(prefixes: list[str], weights: list[float], split: str, seq_len: int, seed: int,
                   sizes: tuple[int, int], cache_dir: str | Path) -> tuple:
    """megatron-core's (train, validation) datasets of the blend, `sizes` sequences each at least; every rank
    calls this (global rank 0 builds and caches the indices first, the others then read them)."""
    Builder, GPTDataset, _, _ = _datasets()
    prefixes, weights = blend_weights(prefixes, weights)
    config = gpt_config(prefixes, weights, split, seq_len, seed, cache_dir)
    with _process_group(), _cache_lock(Path(cache_dir)):
        try:
            train, val, _ = Builder(GPTDataset, [sizes[0], sizes[1], sizes[1]], lambda: True, config).build()
        except (AssertionError, IndexError, ValueError) as e:  # megatron-core's own checks of a blend
            raise DataError(f"megatron-core cannot index data.prefixes={prefixes} with weights {weights}, "
                            f"split {split!r}: {type(e).__name__}: {e}") from None
    return train, val


def megatron_loaders(data, vocab_size: int, seed: int, batches: BatchSchedule, steps: int, cache_dir: str | Path,
                     **common) -> tuple[MegatronLoader, MegatronLoader]:
    """(train, validation) loaders of `data` (a DataConfig with format=megatron) after the corpus checks."""
    check_corpora(data.prefixes, vocab_size, Path(cache_dir), data.split)
    sizes = (batches.sequences_before(steps), data.val_batches * batches.final)
    train, val = build_datasets(list(data.prefixes), list(data.weights), data.split, data.seq_len, seed, sizes,
                                cache_dir)
    root = ",".join(data.prefixes)
    loaders = tuple(MegatronLoader(MegatronSamples(ds, data.seq_len, root, split), seq_len=data.seq_len,
                                   seed=seed, batches=batches, **common)
                 for ds, split in ((train, "train"), (val, "val")))
    if len(loaders[0].ds) == 0:
        raise DataError(f"data.prefixes={list(data.prefixes)} with data.split={data.split!r} give no training "
                        f"sequence of data.seq_len + 1 = {data.seq_len + 1} tokens")
    return loaders


# --------------------------------------------------------------------------------------------- checks
def check_corpora(prefixes, vocab_size: int, cache_dir: Path, split: str) -> None:
    """Each prefix names a readable, consistent .bin/.idx pair with documents in every share of `split` and
    token ids below vocab_size; a DataError naming the first that does not. The token range scan runs once per
    corpus file (rank 0 first, the others after a barrier) and is cached in cache_dir."""
    corpora = {p: _open(p) for p in prefixes}  # held while their indexes are read (memory maps close with them)
    for p, corpus in corpora.items():
        _check_split(p, len(corpus.index.sequence_lengths), split)
    # a dtype whose largest value is below vocab_size cannot hold a bad id: no scan
    to_scan = {p: c.index for p, c in corpora.items() if np.iinfo(c.index.dtype).max >= vocab_size}
    with _cache_lock(cache_dir):
        if _rank() == 0:
            for p, index in to_scan.items():
                _max_token(p, index, cache_dir)
    if dist.is_initialized():
        dist.barrier()
    for p, index in to_scan.items():
        top = _max_token(p, index, cache_dir)
        if top >= vocab_size:
            raise DataError(f"corpus {p} holds token id {top} >= model.vocab_size={vocab_size} (index dtype "
                            f"{index.dtype.__name__}): it was tokenized for a larger vocabulary")


def _open(prefix: str):
    """megatron-core's IndexedDataset of the corpus, after checking .bin/.idx exist, agree and hold tokens."""
    _, _, _, IndexedDataset = _datasets()
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    missing = [str(f) for f in (idx, bin_) if not f.is_file()]
    if missing:
        raise DataError(f"corpus {prefix}: {' and '.join(missing)} not found (data.prefixes name .bin/.idx pairs "
                        f"without the extension)")
    hook = sys.unraisablehook  # a half-built IndexedDataset's __del__ fails too: its report would add lines
    sys.unraisablehook = lambda _: None
    try:
        corpus = IndexedDataset(prefix, mmap=False)  # file reads: an empty .bin cannot be memory-mapped
    except (AssertionError, ValueError, OSError, IndexError, KeyError, struct.error) as e:
        raise DataError(f"corpus {prefix}: {idx} is not a Megatron index ({type(e).__name__}: {e})") from None
    finally:
        gc.collect()
        sys.unraisablehook = hook
    index = corpus.index
    if len(index.sequence_lengths) == 0 or int(index.sequence_lengths.sum(dtype=np.int64)) == 0:
        raise DataError(f"corpus {prefix} is empty: its index lists no tokens")
    expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
    if bin_.stat().st_size != expected:
        raise DataError(f"corpus {prefix}: {bin_} has {bin_.stat().st_size} bytes but {idx} describes {expected}: "
                        f"the pair does not match (written separately, or truncated)")
    return corpus


def _check_split(prefix: str, documents: int, split: str) -> None:
    """Every share of the split gets a document of the corpus (megatron-core cuts the document list at
    round(bookend * documents); an empty share of a blend would never fill its samples)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.blended_megatron_dataset_config import (
            convert_split_vector_to_split_matrix, parse_and_normalize_split)
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, bookends in zip(("train", "validation", "test"), matrix):
        if bookends is not None and round(bookends[0] * documents) == round(bookends[1] * documents):
            raise DataError(f"corpus {prefix} has {documents} documents: its {name} share of data.split={split!r} "
                            f"gets none (give that share more weight, or the corpus more documents)")


def _max_token(prefix: str, index, cache_dir: Path) -> int:
    """The largest token id in the corpus, from the cache when the .bin/.idx are unchanged, else by a scan."""
    bin_, idx = Path(prefix + ".bin"), Path(prefix + ".idx")
    stamp = [[f.stat().st_size, f.stat().st_mtime_ns] for f in (bin_, idx)]
    key = hashlib.md5(str(bin_.resolve()).encode(), usedforsecurity=False).hexdigest()
    path = cache_dir / "token_range" / f"{key}.json"
    try:
        cached = json.loads(path.read_text())
        if cached["stamp"] == stamp:
            return int(cached["max_id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    tokens = np.memmap(bin_, dtype=index.dtype, mode="r")
    top = max(int(tokens[i:i + (1 << 24)].max()) for i in range(0, len(tokens), 1 << 24))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"prefix": str(bin_.resolve())[:-4], "stamp": stamp, "max_id": top}))
    os.replace(tmp, path)
    return top
