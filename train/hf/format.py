"""Hugging Face interop: read and write the `DeepseekV2ForCausalLM` directory format.

A directory holds `config.json` and safetensors weights (one file, or shards named by
`model.safetensors.index.json`). Weights are streamed shard by shard and tensor by tensor, so a large
model never needs all of them in memory at once.

Hub checkpoints store each routed expert separately (`mlp.experts.<j>.{gate,up,down}_proj.weight`, nn.Linear
[out, in] layout); transformers >= 5 may also hold them stacked (`mlp.experts.gate_up_proj` [E, 2I, D],
`mlp.experts.down_proj` [E, D, I]). Both load; `to_hf` writes the per-expert Hub layout, which every
transformers version reads. The rotary layout needs no permutation: DeepSeek's checkpoints and this model
both rotate interleaved pairs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import ModelConfig, Transformer

# ------------------------------------------------------------------------------------------ config
_SAME_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings", "num_attention_heads",
              "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rms_norm_eps",
              "intermediate_size", "moe_intermediate_size", "first_k_dense_replace", "n_routed_experts",
              "n_shared_experts", "num_experts_per_tok", "routed_scaling_factor", "norm_topk_prob",
              "tie_word_embeddings", "num_nextn_predict_layers"]


def config_from_hf(d: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face DeepSeek-V2/V3 config dict (legacy `rope_scaling` or v5 `rope_parameters`)."""
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={d['hidden_act']!r}; only 'silu' is supported")
    if d.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"config.json moe_layer_freq={d['moe_layer_freq']}; only 1 is supported")
    kw = {k: d[k] for k in _SAME_KEYS if d.get(k) is not None}
    kw["n_group"] = d.get("n_group") or 1
    kw["topk_group"] = d.get("topk_group") or 1
    v3 = d.get("model_type") == "deepseek_v3"  # transformers' V3 config names no routing: sigmoid + noaux_tc
    kw["topk_method"] = d.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    kw["scoring_func"] = d.get("scoring_func") or ("sigmoid" if v3 else "softmax")
    kw["aux_loss_free_bias"] = kw["topk_method"] == "noaux_tc"
    kw["q_lora_rank"] = d.get("q_lora_rank")
    kw["rope_theta"], kw["rope_scaling"] = _rope_from_hf(d)
    if "initializer_range" in d:
        kw["initializer_range"] = d["initializer_range"]
    return ModelConfig(**kw)


def _rope_from_hf(d: dict) -> tuple[float, dict | None]:
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:  # transformers >= 5
        theta = params["rope_theta"]
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type", "type")}
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = dict(d.get("rope_scaling") or {})
        kind = scaling.pop("type", scaling.pop("rope_type", "default")) if scaling else "default"
    if kind in ("default", None):
        return theta, None
    if kind != "yarn":
        raise ValueError(f"config.json rope type {kind!r}; supported: default, yarn")
    return theta, {"type": "yarn", **scaling}


def is_v3(cfg: ModelConfig) -> bool:
    """The DeepseekV3 architecture (sigmoid scores, top-2-sum group choice, correction bias) fits this routing."""
    return cfg.scoring_func == "sigmoid" and cfg.topk_method == "noaux_tc"


def config_to_hf(cfg: ModelConfig) -> dict:
    d = {k: getattr(cfg, k) for k in _SAME_KEYS}
    arch, kind = ("DeepseekV3ForCausalLM", "deepseek_v3") if is_v3(cfg) else ("DeepseekV2ForCausalLM", "deepseek_v2")
    d.update(architectures=[arch], model_type=kind, hidden_act="silu", rope_interleave=True,
             num_key_value_heads=cfg.num_attention_heads, n_group=cfg.n_group, topk_group=cfg.topk_group,
             topk_method=cfg.topk_method, scoring_func=cfg.scoring_func, moe_layer_freq=1,
             aux_loss_alpha=cfg.aux_loss_alpha, seq_aux=cfg.seq_aux_loss_alpha > 0, attention_bias=False,
             rope_theta=cfg.rope_theta, rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
             initializer_range=cfg.initializer_range, bos_token_id=None, eos_token_id=None, torch_dtype="float32")
    if not is_v3(cfg):
        d["num_nextn_predict_layers"] = 0  # the DeepseekV2 format has no MTP module
    return d


# ------------------------------------------------------------------------------------------ names
_EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def _our_prefix(hf_name: str, n_layers: int) -> str:
    """Strip `model.`; MTP layers (index >= n_layers, V3 layout) map to `mtp.<k>.`."""
    name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    m = re.match(r"layers\.(\d+)\.(.*)$", name)
    if m and int(m.group(1)) >= n_layers:
        k, rest = int(m.group(1)) - n_layers, m.group(2)
        if rest.startswith(("enorm", "hnorm", "eh_proj")):
            return f"mtp.{k}.{rest}"
        if rest.startswith("shared_head.norm"):
            return f"mtp.{k}.norm" + rest[len("shared_head.norm"):]
        return f"mtp.{k}.block.{rest}"
    return name


def _load_tensor(model: Transformer, hf_name: str, t: torch.Tensor, params: dict[str, torch.Tensor]) -> list[str]:
    """Copy one Hugging Face tensor into the model; returns the names of the parameters it (partly) filled."""
    n = model.cfg.num_hidden_layers
    name = _our_prefix(hf_name, n)
    name = name.replace("mlp.gate.e_score_correction_bias", "mlp.gate.expert_bias")
    m = _EXPERT.search(name)
    if m:
        layer, j, kind = m.group(1), int(m.group(2)), m.group(3)
        base = name[: m.start()] + f"layers.{layer}.mlp.experts."
        inter = model.cfg.moe_intermediate_size
        if kind == "down_proj":
            params[base + "down_proj"][j].copy_(t.t())
            return [base + "down_proj"]
        gate_up = params[base + "gate_up_proj"][j]  # (D, 2I): gate columns first, then up
        half = gate_up[:, :inter] if kind == "gate_proj" else gate_up[:, inter:]
        half.copy_(t.t())
        return [base + "gate_up_proj"]
    m = _STACKED.search(name)
    if m:
        params[name].copy_(t.transpose(1, 2))
        return [name]
    if _IGNORED.search(name) or re.match(r"mtp\.\d+\.block\.(embed_tokens|shared_head\.head)", name):
        return []  # derived or shared with the main model
    if name not in params:
        raise ValueError(f"checkpoint tensor {hf_name!r} has no place in this model (mapped to {name!r})")
    if params[name].shape != t.shape:
        raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(t.shape)}, model expects "
                         f"{tuple(params[name].shape)}")
    params[name].copy_(t)
    return [name]


# ------------------------------------------------------------------------------------------ load/save
def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / f for f in names]
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    raise ValueError(f"{directory} holds neither model.safetensors nor model.safetensors.index.json")


def from_hf(directory: str | os.PathLike, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32) -> Transformer:
    """Build a Transformer from a Hugging Face DeepSeek-V2 directory, streaming the weights."""
    directory = Path(directory)
    cfg = config_from_hf(json.loads((directory / "config.json").read_text()))
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device).to(dtype)
    model.init_weights()  # buffers (expert bias, stats) and anything tied; every parameter is overwritten below
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    filled: set[str] = set()
    with torch.no_grad():
        for path in _weight_files(directory):
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    filled.update(_load_tensor(model, key, f.get_tensor(key), params))
    missing = [n for n, _ in model.named_parameters() if n not in filled]
    if missing:
        raise ValueError(f"{directory}: no weights for {len(missing)} parameters, e.g. {missing[:5]}")
    return model


def hf_name(name: str, n_layers: int) -> str:
    """The Hugging Face name of one of our non-expert tensors (MTP depth k is layer n_layers + k, V3 layout)."""
    if name == "lm_head.weight":
        return name
    name = name.replace("mlp.gate.expert_bias", "mlp.gate.e_score_correction_bias")
    m = re.match(r"mtp\.(\d+)\.(.*)$", name)
    if m:
        layer, rest = n_layers + int(m.group(1)), m.group(2)
        rest = rest[len("block."):] if rest.startswith("block.") else \
            "shared_head." + rest if rest.startswith("norm.") else rest
        return f"model.layers.{layer}.{rest}"
    return "model." + name


def hf_items(cfg: ModelConfig, name: str, t: torch.Tensor, first: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) pairs in the per-expert Hub layout for our tensor `name` (whole, or for an
    expert stack, the experts first, first + 1, ...)."""
    inter, base = cfg.moe_intermediate_size, hf_name(name, cfg.num_hidden_layers)
    if name.endswith("mlp.experts.gate_up_proj"):
        base = base[: -len("gate_up_proj")]
        for j in range(t.shape[0]):
            yield f"{base}{first + j}.gate_proj.weight", t[j, :, :inter].t()
            yield f"{base}{first + j}.up_proj.weight", t[j, :, inter:].t()
    elif name.endswith("mlp.experts.down_proj"):
        base = base[: -len("down_proj")]
        for j in range(t.shape[0]):
            yield f"{base}{first + j}.down_proj.weight", t[j].t()
    else:
        yield base, t


def exported_names(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (name, tensor) pairs that the Hugging Face format holds: parameters (MTP only in the V3 format)
    and the aux-loss-free expert bias."""
    for name, p in model.named_parameters():
        if not name.startswith("mtp.") or is_v3(model.cfg):
            yield name, p
    if model.cfg.aux_loss_free_bias:
        for name, b in model.named_buffers():
            if name.endswith("gate.expert_bias") and (not name.startswith("mtp.") or is_v3(model.cfg)):
                yield name, b


def _hf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) pairs in the Hub layout, one at a time."""
    for name, p in exported_names(model):
        t = p.full_tensor() if hasattr(p, "full_tensor") else p  # DTensor (FSDP/TP) -> whole tensor
        yield from hf_items(model.cfg, name, t.detach())


class ShardWriter:
    """Safetensors shards of at most `max_shard_bytes` (a tensor larger than that gets a shard of its own),
    each written to a temporary name and renamed, then the index; tensors are added one at a time."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory, self.max_bytes = directory, max_shard_bytes
        self.weight_map: dict[str, str] = {}
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_bytes = self.total_bytes = self.count = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.shard and self.shard_bytes + size > self.max_bytes:
            self.flush()
        self.shard[name] = t.contiguous().cpu()
        self.shard_bytes += size
        self.total_bytes += size

    def make_room(self, nbytes: int) -> None:
        """Write the shard being filled out now if `nbytes` more would not fit in it."""
        if self.shard and self.shard_bytes + nbytes > self.max_bytes:
            self.flush()

    def flush(self) -> None:
        self.count += 1
        fname = f"model-{self.count:05d}.safetensors"
        tmp = self.directory / (fname + ".tmp")
        tmp.touch()  # the mode the umask gives a new file (0644 under 022): safetensors writes its files 0600
        mode = tmp.stat().st_mode & 0o777
        save_file(self.shard, str(tmp), metadata={"format": "pt"})
        tmp.chmod(mode)
        os.replace(tmp, self.directory / fname)
        self.weight_map.update({k: fname for k in self.shard})
        self.shard, self.shard_bytes = {}, 0

    def close(self, cfg: ModelConfig, dtype: str = "float32") -> None:
        if self.shard:
            self.flush()
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (self.directory / "config.json").write_text(json.dumps(config_to_hf(cfg) | {"torch_dtype": dtype}, indent=1))


def check_exportable(cfg: ModelConfig) -> None:
    """ValueError unless the model is one DeepSeek's Hugging Face format holds (MLA attention)."""
    if cfg.attention != "mla":
        raise ValueError(f"Hugging Face export writes DeepSeek-V2/V3 checkpoints, which hold MLA only; this model has "
                         f"model.attention={cfg.attention}")


def to_hf(model: Transformer, directory: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json + safetensors shards (+ index) that transformers' DeepseekV2/V3ForCausalLM loads."""
    check_exportable(model.cfg)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(directory, max_shard_bytes)
    for name, t in _hf_tensors(model):
        writer.add(name, t)
    writer.close(model.cfg)
