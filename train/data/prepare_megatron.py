"""`python -m train.data.prepare --format megatron`: text / jsonl files -> one Megatron indexed corpus
(`<output>.bin` + `<output>.idx`), written by megatron-core's IndexedDatasetBuilder, as Megatron-LM's
tools/preprocess_data.py writes them: one sequence per document, ending with the end-of-document token; uint16
ids when the vocabulary fits (< 65,500, Megatron's rule), int32 otherwise.

The files are cut into parts of about PART_BYTES (in file order, whatever the number of workers); `--workers N`
processes tokenize the parts into temporary corpora, which are then concatenated in order (IndexedDatasetBuilder
.add_index), so the output is byte-identical for any N. Everything is written under `<output>.tmp-<pid>/` and the
finished pair moved into place (.bin, then .idx), so an interrupted run leaves no corpus that looks complete.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .corpus import PrepareError, check_target, expand_inputs, read_documents
from .tokenizer import build_tokenizer

PART_BYTES = 16 << 20  # input bytes per part: the unit of work of one worker
ENCODE_BATCH = 256  # documents per tokenizer call


def _builder(bin_path: Path, dtype):
    with warnings.catch_warnings():  # importing megatron.core warns about model kernels, not datasets
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder(str(bin_path), dtype=dtype)


def corpus_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65500 else np.int32


def parts(files: list[Path], part_bytes: int = PART_BYTES) -> list[list[Path]]:
    """Consecutive groups of files of at least part_bytes each (the last may be smaller)."""
    groups, size = [[]], 0
    for f in files:
        if size >= part_bytes:
            groups, size = groups + [[]], 0
        groups[-1].append(f)
        size += f.stat().st_size
    return [g for g in groups if g]


def write_part(files: list[Path], tok, text_key: str, prefix: Path) -> int:
    """Tokenize the documents of `files` into the corpus `prefix`.bin/.idx; returns its number of documents."""
    builder = _builder(prefix.with_suffix(".bin"), corpus_dtype(tok.vocab_size))
    n, batch = 0, []
    for doc in [*read_documents(files, text_key), None]:
        if doc is not None:
            batch.append(doc)
        if batch and (doc is None or len(batch) == ENCODE_BATCH):
            for ids in tok.encode_batch(batch):
                builder.add_document(np.asarray(ids + [tok.eos_id]), [len(ids) + 1])
            n, batch = n + len(batch), []
    builder.finalize(str(prefix.with_suffix(".idx")))
    return n


def _write_part_job(job) -> int:
    return write_part(*job)


def prepare_megatron(inputs: list[str], output: str | Path, tokenizer: str = "byte", text_key: str = "text",
                     eos_token: str | None = None, workers: int = 1, overwrite: bool = False,
                     progress: bool = True, part_bytes: int = PART_BYTES) -> dict:
    """Write the corpus `output`.bin/.idx; returns its documents, tokens and vocabulary size."""
    output = Path(output)
    if workers < 1 or part_bytes < 1:
        raise PrepareError(f"--workers and --part-bytes must be >= 1, got {workers} and {part_bytes}")
    existing = [str(p) for p in (output.with_name(output.name + ".bin"), output.with_name(output.name + ".idx"))
                if p.exists()]
    if existing and not overwrite:
        raise PrepareError(f"{' and '.join(existing)} exist (pass --overwrite to replace them)")
    files = expand_inputs(inputs)
    for target in (output.with_name(output.name + ".bin"), output.with_name(output.name + ".idx")):
        check_target(target, inputs, files, tokenizer)
    tmp = output.parent / f"{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok = build_tokenizer(tokenizer, files, tmp, eos_token, text_key)
        jobs = [(group, tok, text_key, tmp / f"part-{i:06d}") for i, group in enumerate(parts(files, part_bytes))]
        docs = sum(_run(jobs, workers, progress))
        if docs == 0:
            raise PrepareError(f"the corpus ({len(files)} file(s)) holds no documents")
        merged = tmp / "merged"
        builder = _builder(merged.with_suffix(".bin"), corpus_dtype(tok.vocab_size))
        for _, _, _, prefix in jobs:
            builder.add_index(str(prefix))
        builder.finalize(str(merged.with_suffix(".idx")))
        tokens = (merged.with_suffix(".bin").stat().st_size // np.dtype(corpus_dtype(tok.vocab_size)).itemsize)
        for ext in (".bin", ".idx"):  # the index last: a .bin without its new .idx is never read as complete
            os.replace(merged.with_suffix(ext), output.with_name(output.name + ext))
        return {"documents": docs, "tokens": tokens, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(jobs: list, workers: int, progress: bool) -> list[int]:
    """Each job's document count, in job order; a progress bar over the parts on stderr (a terminal's)."""
    bar = tqdm(total=len(jobs), unit=" parts", desc="prepare", file=sys.stderr, disable=None if progress else True)
    with bar:
        if workers == 1:
            return [_tick(bar, write_part(*job)) for job in jobs]
        # spawn: fresh workers, untouched by the threads of this process's tokenizer and torch
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            return [_tick(bar, n) for n in pool.map(_write_part_job, jobs)]


def _tick(bar, n: int) -> int:
    bar.update(1)
    return n
