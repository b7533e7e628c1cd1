"""Reading prepared shards: random access to samples, and the deterministic data-parallel batch stream.

The stream is defined globally, independent of the parallel layout: every sample of `chunk_len` tokens
gives `chunk_len // (seq_len + 1)` windows (kept in order); an epoch visits the samples in a permutation
seeded by (seed, epoch); optimizer step s consumes global windows [W(s), W(s+1)), continuing into the next
epoch's permutation without a seam, where W(s) = s*G with a constant global batch G and follows the batch-size
ramp-up otherwise (`BatchSchedule`: a function of the configuration, so the state stays one integer).
A step is a sequence of micro-steps of W*mb windows (W data-parallel
ranks, mb per micro-batch); in micro-step j, rank r takes windows [j*W*mb + r*mb, j*W*mb + (r+1)*mb) of the
step. So the concatenation over ranks of each micro-step is one contiguous chunk of the global batch: the
same tokens a single process with micro-batch W*mb sees in its micro-step j (what makes loads summed over
ranks, and so the balance losses, equal across layouts). The loader's state is one integer (steps
consumed), valid under any layout.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import numpy as np
import torch

from ..schedule import BatchSchedule
from .prepare import FORMAT_VERSION

log = logging.getLogger(__name__)

Batch = list[tuple[torch.Tensor, torch.Tensor]]  # micro-batches of (inputs [mb, T], labels [mb, T]) int64


class DataError(ValueError):
    """Missing, malformed or corrupt data, with the offending file named."""


def read_index(root: Path) -> dict:
    """The dataset's index.json, or a DataError naming it."""
    index_file = root / "index.json"
    try:
        index = json.loads(index_file.read_text())
    except FileNotFoundError:
        raise DataError(f"{index_file} not found: prepare data with `python -m train.data.prepare`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{index_file} is not a valid dataset index ({type(e).__name__}: {e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT_VERSION:
        raise DataError(f"{index_file}: not a dataset index of format {FORMAT_VERSION}")
    return index


class TokenDataset:
    """One split of a prepared dataset; `sample(i)` reads sample i (chunk_len tokens) by seeking into its shard."""

    def __init__(self, path: str | Path, split: str):
        self.root, self.split = Path(path), split
        index = read_index(self.root)
        if split not in index.get("splits", {}):
            raise DataError(f"{self.root / 'index.json'} has no split {split!r}")
        try:
            self.chunk_len, self.vocab_size = int(index["chunk_len"]), int(index["vocab_size"])
            self.eos_id = int(index["eos_id"])
            self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
            self._locations = self._check_shards(index["splits"][split])
        except DataError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{self.root / 'index.json'} is not a valid dataset index "
                            f"({type(e).__name__}: {e})") from None
        self.unigram_entropy: float | None = index.get("unigram_entropy_nats")  # nats/token of the train split
        self._handles: dict[Path, object] = {}

    def _check_shards(self, shards: list[dict]) -> list[tuple[Path, int, int, int]]:
        """(file, offset, length, crc32) of every sample, after checking each shard is there at its full size."""
        locations = []
        for shard in shards:
            file = self.root / self.split / shard["file"]
            size = file.stat().st_size if file.is_file() else None
            if size != shard["bytes"]:
                found = "no such file" if size is None else f"{size} bytes on disk"
                raise DataError(f"shard {file} is missing or truncated: {found}, {shard['bytes']} bytes expected")
            locations += [(file, int(off), int(length), int(crc)) for off, length, crc in shard["samples"]]
        return locations

    def __len__(self) -> int:
        return len(self._locations)

    def sample(self, i: int) -> np.ndarray:
        file, offset, length, crc = self._locations[i]
        f = self._handles.get(file) or self._handles.setdefault(file, open(file, "rb"))
        f.seek(offset)
        payload = f.read(length)
        if length != self.chunk_len * self.dtype.itemsize or len(payload) != length or zlib.crc32(payload) != crc:
            raise DataError(f"shard {file} is corrupt: sample {i} at byte {offset} fails its length/CRC32 check")
        return np.frombuffer(payload, dtype=self.dtype)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}

    def __getstate__(self):  # open files do not travel to other processes
        return {**self.__dict__, "_handles": {}}


class TokenLoader:
    """The deterministic batch stream over a TokenDataset for data-parallel rank `dp_rank` of `dp_world`."""

    def __init__(self, dataset: TokenDataset, seq_len: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0, batches: BatchSchedule | None = None):
        self.ds = dataset
        self.seq_len, self.G, self.mb = seq_len, global_batch_size, micro_batch_size
        self.rank, self.world, self.seed = dp_rank, dp_world, seed
        self.batches = batches or BatchSchedule(global_batch_size, seq_len)  # step -> sequences (ramp-up)
        self._validate()
        self.per_sample = dataset.chunk_len // (seq_len + 1)  # windows per sample
        if self.per_sample == 0:
            raise DataError(f"data.seq_len={seq_len} needs windows of {seq_len + 1} tokens but {dataset.root} holds "
                            f"samples of chunk_len={dataset.chunk_len}; prepare with --chunk-len >= {seq_len + 1}")
        self.steps = 0  # optimizer steps consumed: the whole resumable state
        self._perm: tuple[int, torch.Tensor] | None = None
        self._last: tuple[int, np.ndarray] | None = None  # windows of one sample are read together

    def _validate(self) -> None:
        if min(self.seq_len, self.G, self.mb, self.world) < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"need seq_len, global_batch_size, micro_batch_size, dp_world >= 1 and 0 <= dp_rank < "
                             f"dp_world; got {self.seq_len}, {self.G}, {self.mb}, {self.world}, {self.rank}")
        if self.G % (self.world * self.mb):
            raise ValueError(f"global_batch_size={self.G} is not divisible by dp_world*micro_batch_size = "
                             f"{self.world}*{self.mb}")
        b = self.batches
        if b.final != self.G or b.start % (self.world * self.mb) or b.increment % (self.world * self.mb):
            raise ValueError(f"batch ramp-up from {b.start} by {b.increment} to {b.final} does not split into "
                             f"global_batch_size={self.G} and micro-steps of dp_world*micro_batch_size = "
                             f"{self.world}*{self.mb}")

    # ------------------------------------------------------------------------------------------ windows
    @property
    def windows_per_epoch(self) -> int:
        return len(self.ds) * self.per_sample

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.ds), generator=gen))
        return self._perm[1]

    def _sample(self, i: int) -> np.ndarray:
        if self._last is None or self._last[0] != i:
            self._last = (i, self.ds.sample(i))
        return self._last[1]

    def window(self, g: int, shuffle: bool = True) -> np.ndarray:
        """Global window g of the stream (seq_len + 1 tokens); shuffle=False reads samples in file order."""
        epoch, k = divmod(g, self.windows_per_epoch)
        sample_pos, w = divmod(k, self.per_sample)
        sample = int(self._permutation(epoch)[sample_pos]) if shuffle else sample_pos
        start = w * (self.seq_len + 1)
        return self._sample(sample)[start:start + self.seq_len + 1]

    def _rows(self, first: int, count: int, shuffle: bool) -> torch.Tensor:
        rows = [self.window(g, shuffle) for g in range(first, first + count)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))  # (count, seq_len + 1)

    @staticmethod
    def _split(rows: torch.Tensor, size: int) -> Batch:
        return [(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows.split(size)]

    # ------------------------------------------------------------------------------------------ API
    def next_batch(self) -> Batch:
        """This rank's micro-batches (inputs [mb, T], labels [mb, T]) of the next optimizer step."""
        if len(self.ds) == 0:
            raise DataError(f"{self.ds.root}: split {self.ds.split!r} has no samples")
        chunk = self.world * self.mb  # one micro-step over all ranks
        base = self.batches.sequences_before(self.steps) + self.rank * self.mb
        size = self.batches.size(self.steps)
        self.steps += 1
        return self._split(torch.cat([self._rows(base + j * chunk, self.mb, shuffle=True)
                                      for j in range(size // chunk)]), self.mb)

    def val_batches(self, n_batches: int, batch_size: int) -> Batch:
        """The same held-out batches on every call: windows in file order; global batch b (batch_size per rank)
        is split over ranks like a training step. Fewer than n_batches if the split is too small."""
        global_batch = batch_size * self.world
        n = min(n_batches, self.windows_per_epoch // global_batch)
        return [self._split(self._rows(b * global_batch + self.rank * batch_size, batch_size, False), batch_size)[0]
                for b in range(n)]

    def _rampup(self) -> list | None:
        b = self.batches
        return [b.start, b.increment, b.ramp_tokens] if b.ramps else None

    def state_dict(self) -> dict:
        state = {"steps": self.steps, "seed": self.seed, "seq_len": self.seq_len, "global_batch_size": self.G}
        return {**state, "rampup": self._rampup()} if self.batches.ramps else state

    def load_state_dict(self, state: dict) -> None:
        now = {"seed": self.seed, "seq_len": self.seq_len, "global_batch_size": self.G, "rampup": self._rampup()}
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if changed:
            log.warning("data loader resumed with changed settings %s (saved, now): the stream differs from the "
                        "original run", changed)
        self.steps = int(state["steps"])
