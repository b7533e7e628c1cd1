"""`python -m train.export output_dir=<run> export.dir=<dir> [export.step=N] [export.dtype=bfloat16]
[export.overwrite=true]`: a run's checkpoint as a Hugging Face directory.

Whatever layout wrote the checkpoint, DCP reads it back here on one process one tensor at a time (a
partial load of a single key; expert stacks one stored piece at a time), and each tensor goes to the output
shard being filled, so host memory stays about one shard plus the largest tensor (or stored expert piece). The directory loads with transformers'
`AutoModelForCausalLM.from_pretrained`: DeepseekV3ForCausalLM for sigmoid + noaux_tc routing (with the MTP
layers as layers num_hidden_layers + k), else DeepseekV2ForCausalLM. It is written to `<dir>.tmp-<pid>`
and renamed; the run's tokenizer.json (when its data had one) is saved beside the weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from model import Transformer
from model.config import TORCH_DTYPES
from model.hf import ShardWriter, check_exportable, exported_names, hf_items

from .config import ConfigError
from .runfiles import checkpoint_of, main_guard, parse_args, run_config, run_tokenizer

log = logging.getLogger("train.export")
DTYPES = TORCH_DTYPES


@dataclass
class ExportConfig:
    dir: Optional[str] = None  # the Hugging Face directory to write
    step: Optional[int] = None  # None: the newest checkpoint
    dtype: str = "float32"  # float32 | bfloat16 | float16
    overwrite: bool = False  # replace a non-empty export.dir
    max_shard_bytes: int = 5 * 2**30


class _RowsPlanner(DefaultLoadPlanner):
    """Loads rows [start, start + len) of dim 0 of the state dict's one tensor (experts of a stack)."""

    def __init__(self, start: int):
        super().__init__(allow_partial_load=True)
        self.start = start

    def create_local_plan(self) -> LoadPlan:
        (key, t), = self.state_dict.items()
        chunk = ChunkStorageMetadata(torch.Size([self.start] + [0] * (t.dim() - 1)), t.shape)
        return LoadPlan(create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk]))

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.state_dict[index.fqn]  # the read items name the chunk by its offset in the whole stack


def _row_ranges(md) -> list[tuple[int, int]]:
    """(start, length) of dim 0 of the pieces the checkpoint stored the tensor in (an expert stack saved under
    ep / FSDP: each rank's experts), when they tile dim 0 whole; else the whole tensor."""
    rows = sorted({(int(c.offsets[0]), int(c.sizes[0])) for c in md.chunks})
    whole_rows = all(tuple(c.sizes[1:]) == tuple(md.size[1:]) for c in md.chunks)
    tiled = all(a[0] + a[1] == b[0] for a, b in zip(rows, rows[1:])) and rows[0][0] == 0
    return rows if whole_rows and tiled else [(0, int(md.size[0]))]


def checkpoint_tensors(ckpt: Path, names: list[str], before_load=lambda nbytes: None):
    """(name, first expert index, tensor) of the checkpoint's model: one tensor in memory at a time, and of an
    expert stack, one stored piece (the experts one rank saved) at a time. (DCP's file reader reads a stored
    piece whole, so reading less than a piece would not save memory.)"""
    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    for name in names:
        key = "model." + name
        if key not in meta:
            raise ValueError(f"{ckpt}: no tensor {key!r} in the checkpoint (a different model?)")
        md = meta[key]
        ranges = _row_ranges(md) if ".mlp.experts." in name else [(0, int(md.size[0]))]
        for start, length in ranges:
            t = torch.empty((length, *md.size[1:]), dtype=md.properties.dtype)
            before_load(t.numel() * t.element_size())
            dcp.load({"model": {name: t}}, checkpoint_id=str(ckpt), planner=_RowsPlanner(start))
            yield name, start, t
            del t


def export(ckpt: Path, cfg, out: Path, dtype: str, max_shard_bytes: int) -> None:
    """Write the Hugging Face directory `out` (it must not exist yet) from the checkpoint `ckpt`."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    names = [n for n, _ in exported_names(model)]
    out.mkdir(parents=True)
    writer = ShardWriter(out, max_shard_bytes)
    # DCP reads a stored piece into a tensor of its own, then copies it into ours: 2 x the piece for a moment, so
    # the shard being filled is written out first when it and the piece would not fit in one shard
    for name, first, t in checkpoint_tensors(ckpt, names, writer.make_room):
        for hf, piece in hf_items(cfg.model, name, t, first):
            writer.add(hf, piece if hf.endswith("e_score_correction_bias") else piece.to(DTYPES[dtype]))
        del t
    writer.close(cfg.model, dtype)
    _save_tokenizer(cfg, out)


def _save_tokenizer(cfg, out: Path) -> None:
    tok = run_tokenizer(cfg)
    if tok.file is None:
        log.info("the run's data is byte tokenized: no tokenizer is saved beside the weights")
        return
    from transformers import PreTrainedTokenizerFast

    eos = tok.tok.tok.id_to_token(tok.tok.eos_id)
    PreTrainedTokenizerFast(tokenizer_file=str(tok.file), eos_token=eos).save_pretrained(out)


def run(argv: list[str]) -> int:
    run_dir, ecfg, rest = parse_args(argv, ExportConfig, "export")
    if rest:
        raise ConfigError(f"unknown arguments {rest}; expected output_dir=... export.<key>=...")
    if not ecfg.dir:
        raise ConfigError("export.dir=<directory to write> is required")
    if ecfg.dtype not in DTYPES:
        raise ConfigError(f"export.dtype must be one of {sorted(DTYPES)}, got {ecfg.dtype!r}")
    dest = Path(ecfg.dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not ecfg.overwrite:
        raise ConfigError(f"export.dir={dest} exists and is not empty; pass export.overwrite=true to replace it")
    ckpt = checkpoint_of(run_dir, ecfg.step)
    cfg = run_config(ckpt)
    try:
        check_exportable(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tmp = dest.parent / f"{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export(ckpt, cfg, tmp, ecfg.dtype, ecfg.max_shard_bytes)
        old = dest.parent / f"{dest.name}.old-{os.getpid()}"
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {ckpt} to {dest}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
