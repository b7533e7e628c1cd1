"""The built-in dataset: the Python standard library's own sources (present wherever Python is), byte
tokenized, prepared on first use and cached. Safe when several ranks ask at once (a file lock)."""

from __future__ import annotations

import fcntl
import os
import sysconfig
from pathlib import Path

from .prepare import prepare

NAME = "builtin-stdlib-v1"
MAX_BYTES = 8_000_000  # ~8M byte tokens: prepares in seconds, far more than a CPU run consumes
CHUNK_LEN = 1025  # seq_len 1024 and every divisor-friendly shorter length waste little


def cache_root() -> Path:
    return Path(os.environ.get("DSV2_DATA_CACHE", Path.home() / ".cache" / "dsv2"))


def stdlib_sources() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        size = path.stat().st_size
        if total + size > MAX_BYTES:
            break
        files.append(str(path))
        total += size
    return files


def builtin_dataset(cache_dir: str | Path | None = None) -> Path:
    """Path of the prepared built-in dataset (preparing it the first time)."""
    root = Path(cache_dir) if cache_dir else cache_root()
    out = root / NAME
    if (out / "index.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process prepares; the others wait, then find it ready
        if not (out / "index.json").is_file():
            prepare(stdlib_sources(), out, tokenizer="byte", chunk_len=CHUNK_LEN, samples_per_shard=2048,
                    val_fraction=0.01, overwrite=True, progress=False)
    return out
