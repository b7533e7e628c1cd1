"""The built-in dataset, which needs no network: the Python standard library's own `.py` sources (present
wherever Python is), byte tokenized, prepared on first use and cached under `$DSV2_DATA_CACHE` (default
`~/.cache/dsv2`) as `builtin-stdlib-v1/`. Safe when several processes (torchrun ranks) ask at once: one
prepares under a file lock while the others wait; a dataset is ready once its index.json exists (prepare
publishes the directory with index.json already inside, by one rename).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sysconfig
import time
from pathlib import Path

from .prepare import prepare

log = logging.getLogger(__name__)

NAME = "builtin-stdlib-v1"
MAX_BYTES = 8_000_000  # ~8M byte tokens: prepares in seconds, far more than a CPU run consumes
CHUNK_LEN = 1025  # seq_len 1024, 512, 256, 128 ... waste at most a few tokens per sample
SKIP_DIRS = {"site-packages", "test", "tests"}  # installed packages; test data full of odd bytes


def cache_root() -> Path:
    return Path(os.environ.get("DSV2_DATA_CACHE") or Path.home() / ".cache" / "dsv2")


def stdlib_sources(max_bytes: int = MAX_BYTES) -> list[Path]:
    """The standard library's .py files in sorted order, up to max_bytes in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    return files


def chunk_len_for(seq_len: int | None) -> int:
    """Tokens per sample: CHUNK_LEN, or seq_len + 1 for sequences longer than it holds."""
    return CHUNK_LEN if seq_len is None or seq_len + 1 <= CHUNK_LEN else seq_len + 1


def builtin_dataset(cache_dir: str | Path | None = None, seq_len: int | None = None) -> Path:
    """Path of the prepared built-in dataset under cache_dir (default: cache_root()) whose samples hold windows
    of seq_len + 1 tokens, preparing it once (a separate copy, `<NAME>-c<chunk>`, for sequences > 1024)."""
    root = Path(cache_dir) if cache_dir else cache_root()
    chunk = chunk_len_for(seq_len)
    name = NAME if chunk == CHUNK_LEN else f"{NAME}-c{chunk}"
    out = root / name
    if (out / "index.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not (out / "index.json").is_file():
            _prepare(out, chunk)
    return out


def _prepare(out: Path, chunk_len: int) -> None:
    t0 = time.perf_counter()
    log.info("preparing the built-in dataset (Python standard library sources) in %s", out)
    index = prepare([str(p) for p in stdlib_sources()], out, tokenizer="byte", chunk_len=chunk_len,
                    samples_per_shard=2048, val_fraction=0.01, overwrite=True, progress=False)
    log.info("built-in dataset ready: %d train tokens, unigram entropy %.3f nats/token, %.1f s",
             index["train_tokens"], index["unigram_entropy_nats"], time.perf_counter() - t0)
