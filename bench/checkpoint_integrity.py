"""What checkpoint checksums cost: the CRC-32 of every file, against the whole save and the whole load.

    PYTHONPATH=. python bench/checkpoint_integrity.py [preset=small] [repeats=3]

Saves the preset's model and its AdamW state (after one step, so the moments exist) with the trainer's
Checkpointer, which checksums the files as part of the save, `repeats` times; each time it also times the
checksumming alone (`checksums` over the same files, as the save runs it) and, for the load, `verify` alone
against `load_latest`, which runs it before reading. Prints each ratio beside the machine line.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from model import Transformer
from model.config import load_preset
from train.checkpoint import Checkpointer, checksums, files_written_by, verify

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402  (bench/, beside this file)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(preset: str = "small", repeats: int = 3) -> None:
    print(describe(), flush=True)
    torch.manual_seed(0)
    model = Transformer(load_preset(preset))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    rows = []
    with tempfile.TemporaryDirectory(dir=".") as root:
        ckpt = Checkpointer(Path(root), keep=1)
        for step in range(1, repeats + 1):
            save = _timed(lambda: ckpt.save(step, [model], [opt], {"step": step}))
            path = Path(root) / f"step_{step:08d}"
            nbytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            crc = _timed(lambda: checksums(path, files_written_by(path, 0)))
            check = _timed(lambda: verify(path))
            load = _timed(lambda: ckpt.load_latest([model], [opt]))
            rows.append((save, crc, load, check, nbytes))
    save, crc, load, check, nbytes = (statistics.median(col) for col in zip(*rows))
    print(f"{preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, checkpoint "
          f"{nbytes / 1e6:.0f} MB; medians of {repeats}")
    print(f"save {save:.3f} s, of which checksums {crc:.3f} s ({crc / save:.1%} of the save, "
          f"{nbytes / crc / 1e9:.2f} GB/s)")
    print(f"load {load:.3f} s, of which verify {check:.3f} s ({check / load:.1%} of the load)")


if __name__ == "__main__":
    main(*(type(d)(a.split("=", 1)[1]) for a, d in zip(sys.argv[1:], ("small", 3))))
