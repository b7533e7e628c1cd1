"""`python -m train.export output_dir=<run> export.dir=<dir> [export.step=N] [export.dtype=bfloat16]
[export.overwrite=true]`: a run's checkpoint as a Hugging Face directory.

Whatever layout wrote the checkpoint, DCP reads it back here on one process one tensor at a time (a
partial load of a single key; expert stacks a few experts at a time), through a reader that reads from the
files only the rows it is asked for, and each tensor goes to the output shard being filled, so host memory
stays about one shard plus the largest non-expert tensor. The directory loads with transformers'
`AutoModelForCausalLM.from_pretrained`: DeepseekV3ForCausalLM for sigmoid + noaux_tc routing (with the MTP
layers as layers num_hidden_layers + k), else DeepseekV2ForCausalLM. It is written to `<dir>.tmp-<pid>`
and renamed; the run's tokenizer.json (when its data had one) is saved beside the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.futures import Future

from model import Transformer
from model.config import TORCH_DTYPES, require
from ..config import ConfigError
from ..data.prepare import staged_dir
from ..runfiles import checkpoint_of, main_guard, parse_args, run_config, run_data, run_tokenizer
from ..targets import unsafe_target
from .format import ShardWriter, check_exportable, exported_names, hf_items

log = logging.getLogger("train.export")
DTYPES = TORCH_DTYPES


@dataclass
class ExportConfig:
    dir: Optional[str] = None  # the Hugging Face directory to write
    step: Optional[int] = None  # None: the newest checkpoint
    dtype: str = "float32"  # float32 | bfloat16 | float16
    overwrite: bool = False  # replace a non-empty export.dir
    max_shard_bytes: int = 5 * 2**30

    def __post_init__(self) -> None:
        require(self.dtype in DTYPES, f"export.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}",
                ConfigError)
        require(self.max_shard_bytes >= 1, f"export.max_shard_bytes must be >= 1, got {self.max_shard_bytes}",
                ConfigError)
        require(self.step is None or self.step >= 0, f"export.step must be >= 0 (or null: newest), got {self.step}",
                ConfigError)


# expert stacks are read this many bytes of experts (at least one expert) at a time
EXPERT_READ_BYTES = 64 * 2**20


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


class RowsReader(FileSystemReader):
    """DCP's file reader, except that a tensor read item reads from the file only the dim-0 rows of the stored
    piece it covers, straight into the destination where it can, where DCP's own reader `torch.load`s the
    whole piece and copies it (about 3 x the piece in memory at once). The metadata is read once."""

    def __init__(self, path: str):
        super().__init__(path)
        self._meta = None

    def read_metadata(self, *args, **kwargs):
        if self._meta is None:
            self._meta = super().read_metadata(*args, **kwargs)
        return self._meta

    def read_data(self, plan: LoadPlan, planner):
        infos = [self.storage_data[r.storage_index] for r in plan.items]
        if any(r.type != LoadItemType.TENSOR or i.transform_descriptors for r, i in zip(plan.items, infos)):
            return super().read_data(plan, planner)  # bytes or transformed (e.g. compressed) pieces
        for req, info in zip(plan.items, infos):
            with self.fs.create_stream(self.fs.concat_path(self.path, info.relative_path), "rb") as f:
                # the piece is a torch.save zip at info.offset; a meta load gives its shape, strides and the
                # offset of its data in the zip without reading the data
                src = torch.load(self._slice_file(f, info), map_location="meta", weights_only=True)
                at = src.untyped_storage()._checkpoint_offset
                if at is None:
                    raise ValueError(f"{info.relative_path}: tensor {req.storage_index.fqn} has no data offset "
                                     f"(not a zip-format torch.save piece)")
                target = planner.resolve_tensor(req).detach()
                _copy_region(f, info.offset + at, src, req, target)
                planner.commit_tensor(req, target)
        fut: Future = Future()
        fut.set_result(None)
        return fut


def _narrow(t: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for d, (o, n) in enumerate(zip(offsets, lengths)):
        t = t.narrow(d, o, n)
    return t


def _read_into(f, t: torch.Tensor) -> None:
    """Fill the contiguous tensor `t` with the next bytes of `f`."""
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"checkpoint file {getattr(f, 'name', f)} ends early (truncated?)")
        got += n


def _copy_region(f, data_at: int, src: torch.Tensor, req, target: torch.Tensor) -> None:
    """Copy the region (req.storage_offsets, req.lengths) of the stored tensor `src` (meta; its storage's data
    starts at byte `data_at` of `f`) into `target`: from a contiguous piece only the rows of dim 0 it spans."""
    size = src.element_size()
    if src.dim() == 0 or not src.is_contiguous():  # the whole stored storage, then the view torch.save kept
        raw = torch.empty(src.untyped_storage().nbytes(), dtype=torch.uint8)
        f.seek(data_at)
        _read_into(f, raw)
        whole = torch.empty(0, dtype=src.dtype).set_(raw.untyped_storage(), src.storage_offset(), src.shape,
                                                     src.stride())
        target.copy_(_narrow(whole, req.storage_offsets, req.lengths))
        return
    first, rows = int(req.storage_offsets[0]), int(req.lengths[0])
    f.seek(data_at + (src.storage_offset() + first * src.stride(0)) * size)
    if target.is_contiguous() and target.dtype == src.dtype and tuple(req.lengths[1:]) == tuple(src.shape[1:]):
        _read_into(f, target)
        return
    buf = torch.empty((rows, *src.shape[1:]), dtype=src.dtype)
    _read_into(f, buf)
    target.copy_(_narrow(buf, [0, *req.storage_offsets[1:]], req.lengths))


def checkpoint_tensors(ckpt: Path, names: list[str], before_load=lambda nbytes: None):
    """(name, first expert index, tensor) of the checkpoint's model: one tensor in memory at a time, and of an
    expert stack, EXPERT_READ_BYTES of experts at a time, whatever pieces the saving layout stored."""
    reader = RowsReader(str(ckpt))
    meta = reader.read_metadata().state_dict_metadata
    for name in names:
        key = "model." + name
        if key not in meta:
            raise ValueError(f"{ckpt}: no tensor {key!r} in the checkpoint (a different model?)")
        md = meta[key]
        n = int(md.size[0])
        step = n
        if ".mlp.experts." in name:
            row_bytes = md.size.numel() // n * md.properties.dtype.itemsize
            step = max(1, EXPERT_READ_BYTES // row_bytes)
        for start in range(0, n, step):
            t = torch.empty((min(step, n - start), *md.size[1:]), dtype=md.properties.dtype)
            before_load(t.numel() * t.element_size())
            dcp.load({"model": {name: t}}, storage_reader=reader, planner=_RowsPlanner(start))
            yield name, start, t
            del t


def export(ckpt: Path, cfg, out: Path, dtype: str, max_shard_bytes: int) -> None:
    """Write the Hugging Face directory `out` (it must not exist yet) from the checkpoint `ckpt`."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    names = [n for n, _ in exported_names(model)]
    out.mkdir(parents=True)
    writer = ShardWriter(out, max_shard_bytes)
    # the shard being filled is written out first when it and the next tensor read would not fit in one shard
    for name, first, t in checkpoint_tensors(ckpt, names, writer.make_room):
        for hf, piece in hf_items(cfg.model, name, t, first):
            writer.add(hf, piece if hf.endswith("e_score_correction_bias") else piece.to(DTYPES[dtype]))
        del t
    writer.close(cfg.model, dtype)
    _save_tokenizer(cfg, out)


def _save_tokenizer(cfg, out: Path) -> None:
    """The run's tokenizer beside the weights as a transformers tokenizer: its data's tokenizer.json, or for
    byte-tokenized data the byte tokenizer (bytes are ids 0-255, its end-of-document token 256)."""
    from transformers import PreTrainedTokenizerFast

    from ..data.tokenizer import BPE_EOS, byte_level_tokenizer

    tok = run_tokenizer(cfg)
    if tok.file is None:
        PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(), eos_token=BPE_EOS).save_pretrained(out)
        return
    eos = tok.tok.tok.id_to_token(tok.tok.eos_id)
    PreTrainedTokenizerFast(tokenizer_file=str(tok.file), eos_token=eos).save_pretrained(out)


def run(argv: list[str]) -> int:
    run_dir, ecfg, rest = parse_args(argv, ExportConfig, "export")
    if rest:
        raise ConfigError(f"unknown arguments {rest}; expected output_dir=... export.<key>=...")
    if not ecfg.dir:
        raise ConfigError("export.dir=<directory to write> is required")
    dest = Path(ecfg.dir)
    ckpt = checkpoint_of(run_dir, ecfg.step)
    cfg = run_config(ckpt)
    unsafe = unsafe_target(dest, [run_dir, *run_data(cfg)])
    if unsafe:
        raise ConfigError(f"export.dir={dest} {unsafe}; export to a directory of its own")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not ecfg.overwrite:
        raise ConfigError(f"export.dir={dest} exists and is not empty; pass export.overwrite=true to replace it")
    try:
        check_exportable(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    with staged_dir(dest) as tmp:
        export(ckpt, cfg, tmp, ecfg.dtype, ecfg.max_shard_bytes)
    print(f"exported {ckpt} to {dest}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_guard(run, argv)
