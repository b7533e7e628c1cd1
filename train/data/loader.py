"""Reading prepared shards: random access to samples, and the deterministic data-parallel batch stream.

The stream is defined globally, independent of the parallel layout: every sample of `chunk_len` tokens
gives `chunk_len // (seq_len + 1)` windows; an epoch visits the samples in a permutation seeded by
(seed, epoch); optimizer step s consumes global windows [s*G, (s+1)*G); data-parallel rank r takes the
contiguous slice [r*G/W, (r+1)*G/W) of them. So the union over ranks of a step's batch is the same for
any W, and the loader's state is one integer (steps consumed), valid under any layout.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Missing, malformed or corrupt data, with the offending file named."""


class TokenDataset:
    """One split of a prepared dataset; `sample(i)` reads sample i by seeking into its shard."""

    def __init__(self, path: str | Path, split: str):
        self.root = Path(path)
        index_file = self.root / "index.json"
        try:
            index = json.loads(index_file.read_text())
            shards = index["splits"][split]
            self.chunk_len, self.vocab_size = int(index["chunk_len"]), int(index["vocab_size"])
            self.dtype = np.dtype(index["dtype"])
        except FileNotFoundError:
            raise DataError(f"{index_file} not found: prepare data with `python -m train.data.prepare`") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{index_file} is not a valid dataset index ({type(e).__name__}: {e})") from None
        self.unigram_entropy = index.get("unigram_entropy_nats")
        self._locations: list[tuple[Path, int, int, int]] = []
        for shard in shards:
            file = self.root / split / shard["file"]
            size = file.stat().st_size if file.exists() else None
            if size != shard["bytes"]:
                raise DataError(f"shard {file} is missing or truncated: {size} bytes on disk, {shard['bytes']} "
                                f"expected")
            self._locations += [(file, off, length, crc) for off, length, crc in shard["samples"]]
        self._handles: dict[Path, object] = {}

    def __len__(self) -> int:
        return len(self._locations)

    def sample(self, i: int) -> np.ndarray:
        file, offset, length, crc = self._locations[i]
        f = self._handles.get(file) or self._handles.setdefault(file, open(file, "rb"))
        f.seek(offset)
        payload = f.read(length)
        if len(payload) != length or zlib.crc32(payload) != crc or length != self.chunk_len * self.dtype.itemsize:
            raise DataError(f"shard {file} is corrupt: sample at byte {offset} fails its length/CRC check")
        return np.frombuffer(payload, dtype=self.dtype)

    def __getstate__(self):  # file handles do not travel to other processes
        return {**self.__dict__, "_handles": {}}


class TokenLoader:
    def __init__(self, dataset: TokenDataset, seq_len: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0):
        self.ds = dataset
        self.seq_len, self.G, self.mb = seq_len, global_batch_size, micro_batch_size
        self.rank, self.world, self.seed = dp_rank, dp_world, seed
        self.per_sample = dataset.chunk_len // (seq_len + 1)
        if self.per_sample == 0:
            raise DataError(f"data.seq_len={seq_len} needs windows of {seq_len + 1} tokens but {dataset.root} holds "
                            f"samples of chunk_len={dataset.chunk_len}; prepare with a larger --chunk-len")
        if global_batch_size % (dp_world * micro_batch_size):
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by dp_world*micro_batch_size"
                             f" = {dp_world}*{micro_batch_size}")
        self.steps = 0  # optimizer steps consumed: the whole resumable state
        self._perm: tuple[int, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------ windows
    @property
    def windows_per_epoch(self) -> int:
        return len(self.ds) * self.per_sample

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.ds), generator=gen))
        return self._perm[1]

    def window(self, g: int, shuffle: bool = True) -> np.ndarray:
        """Global window g of the stream: seq_len + 1 tokens."""
        epoch, k = divmod(g, self.windows_per_epoch)
        sample_pos, w = divmod(k, self.per_sample)
        sample = int(self._permutation(epoch)[sample_pos]) if shuffle else sample_pos
        start = w * (self.seq_len + 1)
        return self.ds.sample(sample)[start:start + self.seq_len + 1]

    def _micro_batches(self, first: int, count: int, shuffle: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = np.stack([self.window(g, shuffle) for g in range(first, first + count)]).astype(np.int64)
        t = torch.from_numpy(rows)
        return [(t[i:i + self.mb, :-1], t[i:i + self.mb, 1:]) for i in range(0, count, self.mb)]

    # ------------------------------------------------------------------------------------------ API
    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches (inputs [mb, T], labels [mb, T]) of the next optimizer step."""
        local = self.G // self.world
        first = self.steps * self.G + self.rank * local
        self.steps += 1
        return self._micro_batches(first, local, shuffle=True)

    def val_batches(self, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same held-out batches on every call: windows in file order, each global batch split over ranks."""
        global_batch = batch_size * self.world
        n = min(n_batches, self.windows_per_epoch // global_batch)
        out = []
        for b in range(n):
            first = b * global_batch + self.rank * batch_size
            rows = np.stack([self.window(g, shuffle=False) for g in range(first, first + batch_size)])
            t = torch.from_numpy(rows.astype(np.int64))
            out.append((t[:, :-1], t[:, 1:]))
        return out

    def state_dict(self) -> dict:
        return {"steps": self.steps, "seed": self.seed, "seq_len": self.seq_len, "global_batch_size": self.G}

    def load_state_dict(self, state: dict) -> None:
        changed = {k: (state.get(k), v) for k, v in (("seed", self.seed), ("seq_len", self.seq_len),
                                                      ("global_batch_size", self.G)) if state.get(k) != v}
        if changed:
            log.warning("data loader resumed with changed settings %s (saved, now): the stream differs from the "
                        "original run", changed)
        self.steps = int(state["steps"])
