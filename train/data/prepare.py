"""`python -m train.data.prepare`: text / jsonl files -> webdataset tar shards of packed token sequences.

Documents are tokenized, each followed by the end-of-document token, concatenated and cut into samples of
exactly `chunk_len` tokens (the tail is dropped). One tar member per sample holds its tokens as raw
little-endian integers. `index.json` (written last) records, per split, every shard's size and every
sample's byte offset, length and CRC32 inside its tar, so loaders seek straight to any sample and detect
corruption. Everything is written to `<output>.tmp-<pid>` and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from .tokenizer import build_tokenizer

FORMAT_VERSION = 1
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py"}


class PrepareError(ValueError):
    """Bad input to prepare: one line, exit code 2."""


# --------------------------------------------------------------------------------------------- inputs
def expand_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item)) or [item]
        for m in map(Path, matches):
            if m.is_dir():
                files += sorted(p for p in m.rglob("*") if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".jsonl"))
            elif m.is_file():
                files.append(m)
    if not files:
        raise PrepareError(f"no input files matched {inputs}")
    return files


def documents(files: list[Path], text_key: str) -> Iterator[str]:
    for path in files:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_key)
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def _jsonl_documents(path: Path, text_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_key]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise PrepareError(f"{path}:{lineno}: not a JSON object with a string '{text_key}' field ({e})") from None
            if not isinstance(text, str):
                raise PrepareError(f"{path}:{lineno}: '{text_key}' is {type(text).__name__}, expected a string")
            yield text


def packed_samples(docs: Iterator[str], tok, chunk_len: int, dtype) -> Iterator[np.ndarray]:
    """Concatenate documents (each + eos) and cut into samples of exactly chunk_len tokens."""
    buf = np.empty(0, dtype=dtype)
    for text in docs:
        ids = np.asarray(tok.encode(text) + [tok.eos_id], dtype=dtype)
        buf = np.concatenate([buf, ids])
        n = len(buf) // chunk_len
        for i in range(n):
            yield buf[i * chunk_len:(i + 1) * chunk_len]
        buf = buf[n * chunk_len:]


# --------------------------------------------------------------------------------------------- shards
class SplitWriter:
    """Writes one split's samples into shard-NNNNNN.tar files of at most `per_shard` samples."""

    def __init__(self, directory: Path, per_shard: int):
        self.dir = directory
        self.dir.mkdir(parents=True)
        self.per_shard = per_shard
        self.shards: list[Path] = []
        self._writer = None
        self._in_shard = 0
        self.count = 0

    def write(self, sample: np.ndarray) -> None:
        if self._writer is None or self._in_shard == self.per_shard:
            self._open_next()
        self._writer.write({"__key__": f"{self.count:09d}", "tokens": sample.tobytes()})
        self._in_shard += 1
        self.count += 1

    def _open_next(self) -> None:
        self.close()
        path = self.dir / f"shard-{len(self.shards):06d}.tar"
        self.shards.append(path)
        self._writer = wds.TarWriter(str(path))
        self._in_shard = 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def index(self) -> list[dict]:
        """Per shard: file name, size, and each sample's payload offset/length/crc32 (read back from the tar)."""
        out = []
        for path in self.shards:
            with tarfile.open(path) as tar, open(path, "rb") as raw:
                samples = []
                for m in tar.getmembers():
                    if m.isfile() and m.name.endswith(".tokens"):
                        raw.seek(m.offset_data)
                        samples.append([m.offset_data, m.size, zlib.crc32(raw.read(m.size))])
            out.append({"file": path.name, "bytes": path.stat().st_size, "samples": samples})
        return out


def unigram_entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------------------------- prepare
def prepare(inputs: list[str], output: Path, tokenizer: str = "byte", chunk_len: int = 4097,
            samples_per_shard: int = 1024, val_fraction: float = 0.01, text_key: str = "text",
            eos_token: str | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the dataset to `output` (atomically); returns its index."""
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise PrepareError(f"{output} exists and is not empty (pass --overwrite to replace it)")
    if chunk_len < 2 or samples_per_shard < 1 or not 0 <= val_fraction < 1:
        raise PrepareError(f"need chunk_len >= 2, samples_per_shard >= 1, 0 <= val_fraction < 1; got "
                           f"{chunk_len}, {samples_per_shard}, {val_fraction}")
    files = expand_inputs(inputs)
    tmp = output.parent / f"{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        index = _write_dataset(files, tmp, tokenizer, chunk_len, samples_per_shard, val_fraction, text_key,
                               eos_token, progress)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
        return index
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_dataset(files, tmp: Path, tokenizer, chunk_len, per_shard, val_fraction, text_key, eos_token,
                   progress) -> dict:
    tok = build_tokenizer(tokenizer, documents(files, text_key) if tokenizer.startswith("bpe:") else None,
                          tmp, eos_token)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    writers = {"train": SplitWriter(tmp / "train", per_shard), "val": SplitWriter(tmp / "val", per_shard)}
    every = max(2, round(1 / val_fraction)) if val_fraction > 0 else 0
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    pending = None  # held back so a tiny corpus still gets one validation sample
    bar = tqdm(documents(files, text_key), total=None, unit=" docs", disable=not progress, file=sys.stderr)
    for i, sample in enumerate(packed_samples(iter(bar), tok, chunk_len, dtype)):
        if pending is not None:
            counts += np.bincount(pending, minlength=tok.vocab_size)
            writers["train"].write(pending)
        if every and i % every == every - 1:
            writers["val"].write(sample)
            pending = None
        else:
            pending = sample
    if pending is not None:
        if every and writers["val"].count == 0 and writers["train"].count > 0:
            writers["val"].write(pending)
        else:
            counts += np.bincount(pending, minlength=tok.vocab_size)
            writers["train"].write(pending)
    for w in writers.values():
        w.close()
    if writers["train"].count == 0:
        raise PrepareError(f"corpus of {len(files)} file(s) has fewer than chunk_len={chunk_len} tokens")
    spec = "tokenizer.json" if tokenizer.startswith("bpe:") else tok.spec
    index = {"format": FORMAT_VERSION, "tokenizer": spec, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
             "dtype": np.dtype(dtype).name, "chunk_len": chunk_len, "train_tokens": int(counts.sum()),
             "unigram_entropy_nats": unigram_entropy(counts),
             "splits": {name: w.index() for name, w in writers.items()}}
    (tmp / "index.json").write_text(json.dumps(index))
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.data.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="files, directories or globs (.txt/.md/.py/.jsonl)")
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--tokenizer", default="byte", help="byte | path/to/tokenizer.json | bpe:<vocab size>")
    ap.add_argument("--eos-token", default=None, help="end-of-document token of a tokenizer.json")
    ap.add_argument("--chunk-len", type=int, default=4097, help="tokens per packed sample (seq_len + 1)")
    ap.add_argument("--samples-per-shard", type=int, default=1024)
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--text-key", default="text", help="field of a .jsonl line holding the document")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        index = prepare(args.input, args.output, args.tokenizer, args.chunk_len, args.samples_per_shard,
                        args.val_fraction, args.text_key, args.eos_token, args.overwrite)
    except (PrepareError, ValueError, OSError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    n = {k: sum(len(s["samples"]) for s in v) for k, v in index["splits"].items()}
    print(f"wrote {args.output}: {n['train']} train + {n['val']} val samples of {args.chunk_len} tokens, "
          f"vocab {index['vocab_size']}, unigram entropy {index['unigram_entropy_nats']:.3f} nats/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
