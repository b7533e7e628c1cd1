"""Hugging Face DeepSeek-V2/V3 weights into a run under any parallel layout (`checkpoint.init_from=<HF dir>`).

The directory is served to torch.distributed.checkpoint (DCP) through `HFReader`, a storage reader that
describes every tensor under our names and global shapes. DCP's load planner computes, for each rank, the
pieces of each global tensor that rank holds (FSDP / TP DTensor shards, the experts of its EP rank, the
layers of its pipeline stage), and the reader reads just those pieces with safetensors' lazy `get_slice`:
no rank ever holds the whole model. Reading maps the Hub layout onto ours on the fly: per-expert
`experts.<j>.{gate,up,down}_proj.weight` (or transformers' stacked `experts.gate_up_proj` / `down_proj`)
into our stacked [E, D, 2I] / [E, I, D] expert weights, `e_score_correction_bias` into the expert bias,
V3's MTP layers (index >= num_hidden_layers) into `mtp.<k>`, and FP8 weights with a `weight_scale_inv`
(blocks of quantization_config.weight_block_size, 128 x 128 as DeepSeek ships V3) dequantized.
"""

from __future__ import annotations

import json
import logging
import math

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint import DefaultLoadPlanner, StorageReader
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, TensorProperties,
                                                   TensorStorageMetadata)
from torch.futures import Future
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from model import ModelConfig, Transformer
from ..checkpoint import CheckpointError
from ..config import ConfigError
from .format import config_from_hf, hf_name

log = logging.getLogger(__name__)
FP8_BLOCK = 128  # DeepSeek-V3's weight quantization block side, when config.json's quantization_config names none
DTYPES = {"F32", "F16", "BF16", "F64", "F8_E4M3"}
# fields that set a tensor's shape: a difference makes the directory unusable for the run's model
SHAPE_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
                "moe_intermediate_size", "first_k_dense_replace", "n_routed_experts", "n_shared_experts"]


class HFWeightsError(CheckpointError):
    """A Hugging Face directory whose files or tensors cannot give the run's weights (one line, exit 1)."""


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / ".metadata").exists() and \
        not (path / "checkpoints").is_dir()


# ------------------------------------------------------------------------------------------ the directory
def tensor_files(directory: Path) -> dict[str, Path]:
    """Hugging Face tensor name -> the safetensors file holding it (index, single file, or every file)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise HFWeightsError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        files = {name: directory / f for name, f in weight_map.items()}
        for name, f in files.items():
            if not f.is_file():
                raise HFWeightsError(f"{f} is missing: {index.name} places tensor {name!r} in it")
        return files
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise HFWeightsError(f"{directory} is not a Hugging Face model directory: no *.safetensors and no "
                             f"model.safetensors.index.json beside config.json")
    files = {}
    for f in shards:
        with ExitStack() as stack:
            files.update({name: f for name in opened(f, stack).keys()})
    return files


def opened(f: Path, stack: ExitStack):
    """safe_open(f) entered on `stack`; safetensors' own error for a damaged or truncated file becomes one
    HFWeightsError line naming the file."""
    try:
        return stack.enter_context(safe_open(str(f), framework="pt"))
    except SafetensorError as e:
        raise HFWeightsError(f"{f}: not a readable safetensors file, damaged or truncated ({e})") from None


def check_config(hf: dict, cfg: ModelConfig, where: Path) -> None:
    """ConfigError naming the first shape-bearing field where config.json and the run's model differ."""
    try:
        theirs = config_from_hf(hf)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    for key in SHAPE_FIELDS:
        if getattr(theirs, key) != getattr(cfg, key):
            raise ConfigError(f"checkpoint.init_from: {where} has {key}={getattr(theirs, key)}, the run's model has "
                              f"model.{key}={getattr(cfg, key)}")
    if cfg.num_nextn_predict_layers > theirs.num_nextn_predict_layers:
        raise ConfigError(f"checkpoint.init_from: {where} has num_nextn_predict_layers="
                          f"{theirs.num_nextn_predict_layers}, the run's model has model.num_nextn_predict_layers="
                          f"{cfg.num_nextn_predict_layers}")
    other = [k for k in ("scoring_func", "topk_method", "n_group", "topk_group", "routed_scaling_factor",
                         "norm_topk_prob", "rope_theta", "rope_scaling", "rms_norm_eps")
             if getattr(theirs, k) != getattr(cfg, k)]
    if other:
        log.warning("%s: the run's model differs from config.json in %s (weights load; the function differs)",
                    where, other)


@dataclass
class Source:
    """Where one of our tensors comes from: `names` in the Hub layout, `kind` how they combine."""
    kind: str  # direct | gate_up | down (per-expert) | gate_up_stacked | down_stacked
    names: list[str]
    shape: torch.Size
    dtype: torch.dtype


def _source(name: str, shape: torch.Size, dtype: torch.dtype, cfg: ModelConfig, files: dict) -> Source:
    hf = hf_name(name, cfg.num_hidden_layers)
    for kind, suffix in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
        if name.endswith("mlp.experts." + suffix):
            if hf in files:  # transformers' stacked layout
                return Source(kind + "_stacked", [hf], shape, dtype)
            base = hf[: -len(suffix)]
            projs = ["gate_proj", "up_proj"] if kind == "gate_up" else ["down_proj"]
            return Source(kind, [f"{base}{j}.{p}.weight" for j in range(shape[0]) for p in projs], shape, dtype)
    return Source("direct", [hf], shape, dtype)


def _expected_shapes(src: Source) -> list[tuple[int, ...]]:
    e, a, b = (src.shape + (0, 0))[:3]
    if src.kind == "gate_up":
        return [(b // 2, a)] * len(src.names)
    if src.kind == "down":
        return [(b, a)] * len(src.names)
    if src.kind in ("gate_up_stacked", "down_stacked"):
        return [(e, b, a)]
    return [tuple(src.shape)]


def plan_sources(directory: Path, cfg: ModelConfig) -> tuple[dict[str, Source], dict[str, Path]]:
    """Our tensor name -> Source for every tensor of the run's model the directory holds, with every shape
    and dtype checked from the file headers (nothing is read). HFWeightsError when a parameter has no source."""
    files = tensor_files(directory)
    with torch.device("meta"):
        model = Transformer(cfg)
    params = {n for n, _ in model.named_parameters()}
    sources = {}
    for name, t in model.state_dict().items():
        src = _source(name, t.shape, t.dtype, cfg, files)
        absent = [n for n in src.names if n not in files]
        if absent and name in params:
            raise HFWeightsError(f"{directory} has no tensor {absent[0]!r} (for {name}, shape {tuple(t.shape)})")
        if not absent:
            sources[name] = src
    _check_headers(sources, files)
    return sources, files


def _check_headers(sources: dict[str, Source], files: dict[str, Path]) -> None:
    with ExitStack() as stack:
        handles = {}
        for src in sources.values():
            for name, want in zip(src.names, _expected_shapes(src)):
                f = files[name]
                if f not in handles:
                    handles[f] = opened(f, stack)
                piece = handles[f].get_slice(name)
                if piece.get_dtype() not in DTYPES:
                    raise HFWeightsError(f"{f}: tensor {name!r} has dtype {piece.get_dtype()}; expected one of "
                                         f"{sorted(DTYPES)}")
                if tuple(piece.get_shape()) != tuple(want):
                    raise HFWeightsError(f"{f}: tensor {name!r} has shape {tuple(piece.get_shape())}, the run's "
                                         f"model expects {tuple(want)}")


# ------------------------------------------------------------------------------------------ the reader
class HFReader(StorageReader):
    """A DCP storage reader serving a Hugging Face directory under our names and layout, slice by slice."""

    def __init__(self, sources: dict[str, Source], files: dict[str, Path], cfg: ModelConfig, block: int = FP8_BLOCK):
        super().__init__()
        self.sources, self.files, self.cfg, self.block = sources, files, cfg, block
        self._handles: dict[Path, object] = {}

    def reset(self, checkpoint_id=None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True

    def read_metadata(self, *args, **kwargs) -> Metadata:
        md = {name: TensorStorageMetadata(TensorProperties(dtype=s.dtype), s.shape,
                                          [ChunkStorageMetadata(torch.Size([0] * len(s.shape)), s.shape)])
              for name, s in self.sources.items()}
        return Metadata(state_dict_metadata=md)

    def set_up_storage_reader(self, metadata, is_coordinator, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def read_data(self, plan, planner) -> Future:
        with ExitStack() as stack:
            self._handles = {f: opened(f, stack)
                             for f in {self.files[n] for req in plan.items
                                       for n in self._names(self.sources[req.storage_index.fqn])}}
            for req in plan.items:
                index = tuple(slice(o, o + n) for o, n in zip(req.storage_offsets, req.lengths))
                target = planner.resolve_tensor(req).detach()
                target.copy_(self.read(req.storage_index.fqn, index))
                planner.commit_tensor(req, target)
            self._handles = {}
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _names(self, src: Source) -> list[str]:
        """The Hub tensors (and FP8 scales) that reading `src` may open."""
        return src.names + [n + "_scale_inv" for n in src.names if n + "_scale_inv" in self.files]

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """The piece `index` of our global tensor `name`."""
        src = self.sources[name]
        if src.kind == "direct":
            return self._get(src.names[0], index)
        e, a, b = index
        if src.kind.endswith("_stacked"):  # Hub (E, 2I or D, D or I) -> ours (E, D or I, 2I or D)
            return self._get(src.names[0], (e, b, a)).transpose(1, 2)
        if src.kind == "down":  # per expert (D, I) -> ours (E, I, D)
            return torch.stack([self._get(src.names[j], (b, a)).t() for j in range(e.start, e.stop)])
        inter = self.cfg.moe_intermediate_size  # gate_up: ours (E, D, 2I), gate columns then up columns
        experts = []
        for j in range(e.start, e.stop):
            pieces = []
            for k, off in ((0, 0), (1, inter)):
                lo, hi = max(b.start, off), min(b.stop, off + inter)
                if lo < hi:
                    pieces.append(self._get(src.names[2 * j + k], (slice(lo - off, hi - off), a)).t())
            experts.append(torch.cat(pieces, dim=1))
        return torch.stack(experts)

    def _get(self, hf: str, index: tuple[slice, ...]) -> torch.Tensor:
        t = self._handles[self.files[hf]].get_slice(hf)[index]
        scale = hf + "_scale_inv"
        if scale not in self.files:
            return t
        return t.float() * _block_scales(self._handles[self.files[scale]].get_slice(scale), *index, self.block)


def _block_scales(scales, rows: slice, cols: slice, b: int) -> torch.Tensor:
    """The per-element dequantization factor of weight[rows, cols] from its b x b block scales."""
    r0, c0 = rows.start // b, cols.start // b
    s = scales[r0:math.ceil(rows.stop / b), c0:math.ceil(cols.stop / b)].float()
    s = s.repeat_interleave(b, 0).repeat_interleave(b, 1)
    return s[rows.start - r0 * b: rows.stop - r0 * b, cols.start - c0 * b: cols.stop - c0 * b]


# ------------------------------------------------------------------------------------------ entry points
@dataclass
class HFCheckpoint:
    """A checked Hugging Face directory: our tensor name -> Source, Hub tensor -> file, FP8 block side."""
    sources: dict[str, Source]
    files: dict[str, Path]
    block: int


def check_hf_dir(directory: Path, cfg: ModelConfig) -> HFCheckpoint:
    """Config and every header checked before a run writes anything; what `load_hf_weights` reads."""
    try:
        hf = json.loads((directory / "config.json").read_text())
    except ValueError as e:
        raise HFWeightsError(f"{directory / 'config.json'}: not JSON ({e})") from None
    if not str(hf.get("model_type", "")).startswith("deepseek_v"):
        raise HFWeightsError(f"{directory / 'config.json'}: model_type={hf.get('model_type')!r}, expected "
                             f"deepseek_v2 or deepseek_v3")
    check_config(hf, cfg, directory)
    block = (hf.get("quantization_config") or {}).get("weight_block_size") or [FP8_BLOCK, FP8_BLOCK]
    if len(set(block)) != 1:
        raise HFWeightsError(f"{directory / 'config.json'}: weight_block_size={block}; only square blocks are read")
    return HFCheckpoint(*plan_sources(directory, cfg), block=int(block[0]))


def load_hf_weights(directory: Path, parts, cfg: ModelConfig, checked: HFCheckpoint | None = None) -> None:
    """The directory's weights into this rank's model `parts` (any layout); each rank reads only its pieces."""
    hf = checked or check_hf_dir(directory, cfg)
    state = {k: v for part in parts for k, v in get_model_state_dict(part).items()}
    missing = [k for k in state if k not in hf.sources and not k.endswith("expert_bias")]
    if missing:
        raise HFWeightsError(f"{directory} has no weights for {missing[:3]}")
    dcp.load(state, storage_reader=HFReader(hf.sources, hf.files, cfg, hf.block),
             planner=DefaultLoadPlanner(allow_partial_load=True))
    for part in parts:
        set_model_state_dict(part, state, options=StateDictOptions(strict=False))
