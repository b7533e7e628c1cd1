"""`python -m train.data.prepare`: text / jsonl files -> webdataset tar shards of packed token sequences.

Documents are tokenized, each followed by the end-of-document token, concatenated and cut into samples of
exactly `chunk_len` tokens (the tail is dropped). One tar member `<key>.tokens` per sample holds its tokens
as raw little-endian uint16 (uint32 when the vocabulary exceeds 65535). A deterministic `val_fraction` of
the samples, evenly spread over the corpus, goes to the val split. `index.json` (written last) records,
per split, every shard's size and every sample's payload offset, length and CRC32 inside its tar, so a
loader seeks straight to any sample and detects corruption. Everything is written to `<output>.tmp-<pid>`
and renamed into place when complete, so an interrupted run never leaves a dataset that looks finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .corpus import PrepareError, check_target, expand_inputs, read_documents
from .tokenizer import build_tokenizer

FORMAT_VERSION = 1
ENCODE_BATCH = 256  # documents per tokenizer call
GOLDEN = (math.sqrt(5) - 1) / 2  # seed -> val phase; consecutive seeds give well-separated phases

__all__ = ["PrepareError", "prepare", "main", "unigram_entropy"]


# --------------------------------------------------------------------------------------------- tokens
def packed_samples(docs: Iterable[str], tok, chunk_len: int, dtype) -> Iterator[np.ndarray]:
    """Concatenate documents (each + eos) and cut into samples of exactly chunk_len tokens."""
    buf = np.empty(0, dtype=dtype)
    for batch in _batches(docs, ENCODE_BATCH):
        ids = [np.asarray(ids + [tok.eos_id], dtype=dtype) for ids in tok.encode_batch(batch)]
        buf = np.concatenate([buf, *ids])
        n = len(buf) // chunk_len
        yield from buf[:n * chunk_len].reshape(n, chunk_len)
        buf = buf[n * chunk_len:]


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def is_val(i: int, val_fraction: float, seed: int) -> bool:
    """Sample i is held out where floor(i * f + phase) steps up: exactly ~f of the samples, evenly spread,
    decided without knowing how many samples follow. The phase comes from the seed (seed 0: phase 0)."""
    phase = (seed * GOLDEN) % 1.0
    return math.floor((i + 1) * val_fraction + phase) > math.floor(i * val_fraction + phase)


def split_samples(samples: Iterable[np.ndarray], val_fraction: float, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """(split, sample) pairs. The last sample is held back so that, if no sample reached val by the end,
    it goes there: any corpus of >= 2 samples gets a val split when val_fraction > 0."""
    pending, n_val, n = None, 0, 0
    for n, sample in enumerate(samples, 1):
        if pending is not None:
            yield "train", pending
            pending = None
        if val_fraction > 0 and is_val(n - 1, val_fraction, seed):
            n_val += 1
            yield "val", sample
        else:
            pending = sample
    if pending is not None:
        yield ("val" if val_fraction > 0 and n_val == 0 and n >= 2 else "train"), pending


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats/token of the token frequencies `counts`."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------------------------- shards
class SplitWriter:
    """Writes one split's samples into shard-NNNNNN.tar files of at most `per_shard` samples."""

    def __init__(self, directory: Path, per_shard: int):
        self.dir = directory
        self.dir.mkdir(parents=True)
        self.per_shard = per_shard
        self.shards: list[Path] = []
        self.count = 0
        self._writer = None

    def write(self, sample: np.ndarray) -> None:
        if self.count % self.per_shard == 0:
            self._open_next()
        self._writer.write({"__key__": f"{self.count:09d}", "tokens": sample.tobytes()})
        self.count += 1

    def _open_next(self) -> None:
        from webdataset import TarWriter  # imported here: it pulls in torch, which bad-input errors need not wait for

        self.close()
        path = self.dir / f"shard-{len(self.shards):06d}.tar"
        self.shards.append(path)
        self._writer = TarWriter(str(path), mtime=0)  # fixed mtime: the same corpus gives byte-identical shards

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def index(self) -> list[dict]:
        return [shard_index(path) for path in self.shards]


def shard_index(path: Path) -> dict:
    """File name, size, and each sample's payload [offset, length, crc32], read back from the finished tar."""
    samples = []
    with tarfile.open(path) as tar, open(path, "rb") as raw:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".tokens"):
                raw.seek(member.offset_data)
                samples.append([member.offset_data, member.size, zlib.crc32(raw.read(member.size))])
    return {"file": path.name, "num_samples": len(samples), "bytes": path.stat().st_size, "samples": samples}


# --------------------------------------------------------------------------------------------- prepare
def prepare(inputs: list[str], output: str | Path, tokenizer: str = "byte", chunk_len: int = 4097,
            samples_per_shard: int = 1024, val_fraction: float = 0.01, text_key: str = "text",
            eos_token: str | None = None, overwrite: bool = False, progress: bool = True, seed: int = 0) -> dict:
    """Write the dataset to `output` (atomically); returns its index."""
    output = Path(output)
    if chunk_len < 2 or samples_per_shard < 1 or not 0 <= val_fraction < 1:
        raise PrepareError(f"need chunk_len >= 2, samples_per_shard >= 1 and 0 <= val_fraction < 1; got "
                           f"chunk_len={chunk_len}, samples_per_shard={samples_per_shard}, val_fraction={val_fraction}")
    _check_output(output, overwrite)
    files = expand_inputs(inputs)
    check_target(output, inputs, files, tokenizer)
    with staged_dir(output) as tmp:
        tmp.mkdir(parents=True)
        settings = dict(tokenizer=tokenizer, chunk_len=chunk_len, samples_per_shard=samples_per_shard,
                        val_fraction=val_fraction, text_key=text_key, eos_token=eos_token, seed=seed)
        return write_dataset(files, tmp, progress=progress, **settings)


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise PrepareError(f"{output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise PrepareError(f"{output} exists and is not empty (pass --overwrite to replace it)")


@contextmanager
def staged_dir(output: Path) -> Iterator[Path]:
    """`<output>.tmp-<pid>` (not yet created) to write a directory into. When the block ends normally it is moved
    into place as `output` (a replaced one is moved aside first, then deleted); whatever happens it is gone
    afterwards, and `output` is untouched unless the block succeeded."""
    tmp = output.parent / f"{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        old = output.parent / f"{output.name}.old-{os.getpid()}"
        if output.exists():
            os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_dataset(files: list[Path], out: Path, tokenizer: str, chunk_len: int, samples_per_shard: int,
                  val_fraction: float, text_key: str, eos_token: str | None, seed: int, progress: bool) -> dict:
    """Tokenize, pack, split and shard the documents of `files` into the (empty) directory `out`."""
    tok = build_tokenizer(tokenizer, files, out, eos_token, text_key)
    if tokenizer != "byte" and not tokenizer.startswith("bpe:"):
        shutil.copyfile(tok.path, out / "tokenizer.json")  # the dataset carries the tokenizer that made it
    dtype = np.dtype("<u2" if tok.vocab_size <= 65535 else "<u4")  # little-endian on every host
    samples = packed_samples(read_documents(_progress(files, progress), text_key), tok, chunk_len, dtype)
    writers = {split: SplitWriter(out / split, samples_per_shard) for split in ("train", "val")}
    counts = np.zeros(tok.vocab_size, dtype=np.int64)  # train token frequencies
    try:
        for split, sample in split_samples(samples, val_fraction, seed):
            writers[split].write(sample)
            if split == "train":
                counts += np.bincount(sample, minlength=tok.vocab_size)
    finally:
        for w in writers.values():
            w.close()
    if writers["train"].count == 0:
        raise PrepareError(f"the corpus ({len(files)} file(s)) has fewer than chunk_len={chunk_len} tokens")
    entropy = unigram_entropy(counts)
    index = {"format": FORMAT_VERSION, "tokenizer": tokenizer if tokenizer.startswith("bpe:") else tok.spec,
             "tokenizer_file": None if tokenizer == "byte" else "tokenizer.json",
             "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "dtype": dtype.name, "chunk_len": chunk_len,
             "val_fraction": val_fraction, "seed": seed, "train_tokens": int(counts.sum()),
             "unigram_entropy_nats": entropy, "unigram_entropy_bits": entropy / math.log(2),
             "splits": {split: w.index() for split, w in writers.items()}}
    _write_json_atomic(out / "index.json", index)
    return index


def _progress(files: list[Path], enabled: bool) -> Iterator[Path]:
    """The files, with a progress bar on stderr when it is a terminal (logs and error output stay clean)."""
    with tqdm(files, unit=" files", desc="prepare", file=sys.stderr, disable=None if enabled else True) as bar:
        yield from bar


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m train.data.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True,
                    help="files, directories (searched for .txt/.md/.rst/.py/.jsonl) or globs")
    ap.add_argument("--output", required=True, type=Path,
                    help="dataset directory to create (webdataset); corpus prefix of <output>.bin/.idx (megatron)")
    ap.add_argument("--format", choices=("webdataset", "megatron"), default="webdataset",
                    help="webdataset: packed token shards (data.path); megatron: a .bin/.idx corpus (data=megatron)")
    ap.add_argument("--workers", type=int, default=1, help="megatron: tokenizing processes (same output for any)")
    ap.add_argument("--part-bytes", type=int, default=16 << 20,
                    help="megatron: input bytes per unit of work (consecutive files)")
    ap.add_argument("--tokenizer", default="byte", help="byte | path/to/tokenizer.json | bpe:<vocab size>")
    ap.add_argument("--eos-token", default=None, help="end-of-document token name of a tokenizer.json")
    ap.add_argument("--chunk-len", type=int, default=4097, help="tokens per packed sample (seq_len + 1)")
    ap.add_argument("--samples-per-shard", type=int, default=1024)
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--text-key", default="text", help="field of a .jsonl line holding the document")
    ap.add_argument("--seed", type=int, default=0, help="chooses which evenly spaced samples form the val split")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.format == "megatron":
        return _main_megatron(args)
    try:
        index = prepare(args.input, args.output, args.tokenizer, args.chunk_len, args.samples_per_shard,
                        args.val_fraction, args.text_key, args.eos_token, args.overwrite, seed=args.seed)
    except (ValueError, OSError) as e:  # PrepareError, tokenizer errors, unreadable files
        print(f"prepare: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    n = {k: sum(s["num_samples"] for s in v) for k, v in index["splits"].items()}
    print(f"wrote {args.output}: {n['train']} train + {n['val']} val samples of {args.chunk_len} tokens, "
          f"vocab {index['vocab_size']}, unigram entropy {index['unigram_entropy_nats']:.3f} nats/token")
    return 0


def _main_megatron(args: argparse.Namespace) -> int:
    from .prepare_megatron import prepare_megatron

    try:
        info = prepare_megatron(args.input, args.output, args.tokenizer, args.text_key, args.eos_token, args.workers,
                                args.overwrite, part_bytes=args.part_bytes)
    except (ValueError, OSError) as e:
        print(f"prepare: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}.bin/.idx: {info['documents']} documents, {info['tokens']} tokens, vocab "
          f"{info['vocab_size']}, end-of-document id {info['eos_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
