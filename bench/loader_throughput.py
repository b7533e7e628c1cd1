"""Loader throughput on a blended Megatron corpus (data=megatron) next to what a training step consumes.

Writes two corpora with megatron-core's IndexedDatasetBuilder (random token ids, documents of 50-2,000 tokens),
builds the trainer's loader over their 0.7/0.3 blend (megatron-core's GPTDataset + BlendedDataset indices), and
times `next_batch()` (every micro-batch of a step, one data-parallel rank of one). Then times one training step
(forward, backward, AdamW) of each preset on the same global batch and reports the samples/s it consumes. The
loader must never be the bottleneck: ratio = loader samples/s / step samples/s, far above 1.

    python bench/loader_throughput.py [--presets tiny small] [--seq-len 256] [--batch 16] [--steps 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model import Transformer, load_preset  # noqa: E402
from train.config import DataConfig  # noqa: E402
from train.data.megatron import megatron_loaders  # noqa: E402
from train.schedule import BatchSchedule  # noqa: E402
from machine import describe  # noqa: E402  (bench/, beside this file)


def write_corpus(prefix: Path, tokens: int, lo: int, hi: int, seed: int) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    written = 0
    while written < tokens:
        doc = rng.integers(lo, hi, size=int(rng.integers(50, 2000)))
        builder.add_document(doc, [len(doc)])
        written += len(doc)
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def loader_rate(prefixes: list[str], seq_len: int, batch: int, steps: int, cache: Path) -> tuple[float, float]:
    """(seconds to build the indices, samples/s of next_batch)."""
    data = DataConfig(format="megatron", prefixes=tuple(prefixes), weights=(0.7, 0.3), seq_len=seq_len)
    t0 = time.perf_counter()
    train, _ = megatron_loaders(data, 32000, 0, BatchSchedule(batch, seq_len), steps, cache,
                                global_batch_size=batch, micro_batch_size=min(batch, 4))
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        train.next_batch()
    return built, steps * batch / (time.perf_counter() - t0)


def step_rate(preset: str, seq_len: int, batch: int, steps: int = 3) -> float:
    """Samples/s one training step (forward + backward + AdamW, fp32) of the preset consumes."""
    cfg = load_preset(preset)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    times = []
    for _ in range(steps + 1):  # the first is warm-up
        t0 = time.perf_counter()
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return batch / min(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=4_000_000, help="tokens of the larger corpus")
    args = ap.parse_args()
    print(describe(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prefixes = [write_corpus(tmp / "web", args.tokens, 0, 30000, 1),
                    write_corpus(tmp / "code", args.tokens // 2, 30000, 32000, 2)]
        built, rate = loader_rate(prefixes, args.seq_len, args.batch, args.steps, tmp / "cache")
        _, cached = loader_rate(prefixes, args.seq_len, args.batch, args.steps, tmp / "cache")
    print(f"loader (data=megatron, 0.7/0.3 blend of {args.tokens * 3 // 2:,} tokens, seq_len {args.seq_len}, "
          f"batch {args.batch}): indices built in {built:.2f} s; {rate:,.0f} samples/s "
          f"(second run, indices from the cache: {cached:,.0f} samples/s)")
    for preset in args.presets:
        consumed = step_rate(preset, args.seq_len, args.batch)
        print(f"{preset}: a training step consumes {consumed:,.1f} samples/s; loader/step ratio "
              f"{min(rate, cached) / consumed:,.0f}x")


if __name__ == "__main__":
    main()
