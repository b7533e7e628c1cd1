"""Reading a text corpus: inputs (files, directories, globs) -> an ordered file list -> documents.

A `.jsonl` file holds one document per line (the string field `text_key`); any other file is one
document. Directories are searched recursively for TEXT_SUFFIXES and `.jsonl` files, in sorted order,
so the same inputs always give the same document stream.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..targets import unsafe_target

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py"}  # files picked up when a directory is given


class PrepareError(ValueError):
    """Bad input to data preparation: reported as one line, exit code 2."""


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named by `inputs`, in order, each once; an input that matches nothing is an error."""
    files: dict[Path, None] = {}  # ordered set
    for item in map(str, inputs):
        matches = sorted(glob.glob(item, recursive=True)) if any(c in item for c in "*?[") else [item]
        found = [f for m in map(Path, matches) for f in _files_under(m)]
        if not found:
            raise PrepareError(f"no input files matched {item!r}")
        files.update(dict.fromkeys(found))
    return list(files)


def _files_under(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | {".jsonl"})
    return [path] if path.is_file() else []


def read_documents(files: Iterable[Path], text_key: str = "text") -> Iterator[str]:
    """Every document of the files, in order."""
    for path in files:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_key)
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def _jsonl_documents(path: Path, text_key: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield _jsonl_text(line, text_key, f"{path}:{lineno}")


def _jsonl_text(line: bytes, text_key: str, where: str) -> str:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrepareError(f"{where}: not valid UTF-8 JSON ({e})") from None
    text = record.get(text_key) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise PrepareError(f"{where}: expected a JSON object with a string field {text_key!r}")
    return text


def check_target(output: Path, inputs: list[str], files: list[Path], tokenizer: str) -> None:
    """PrepareError when writing `output` could delete what prepare reads (its inputs, their files, the
    tokenizer file) or a run's checkpoints, with or without --overwrite (train/targets.py)."""
    reads = [Path(p) for p in inputs if Path(p).exists()] + list(files)
    if Path(tokenizer).is_file():
        reads.append(Path(tokenizer))
    unsafe = unsafe_target(output, reads)
    if unsafe:
        raise PrepareError(f"--output {output} {unsafe}; write the data to a directory of its own")
