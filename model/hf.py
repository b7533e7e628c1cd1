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

from .config import ModelConfig
from .transformer import Transformer

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
    kw["topk_method"] = d.get("topk_method") or "greedy"
    kw["scoring_func"] = d.get("scoring_func") or "softmax"
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


def config_to_hf(cfg: ModelConfig) -> dict:
    d = {k: getattr(cfg, k) for k in _SAME_KEYS}
    d.update(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", hidden_act="silu",
             num_key_value_heads=cfg.num_attention_heads, n_group=cfg.n_group, topk_group=cfg.topk_group,
             topk_method=cfg.topk_method, scoring_func=cfg.scoring_func, moe_layer_freq=1,
             aux_loss_alpha=cfg.aux_loss_alpha, seq_aux=cfg.seq_aux_loss_alpha > 0, attention_bias=False,
             rope_theta=cfg.rope_theta, rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
             initializer_range=cfg.initializer_range, bos_token_id=None, eos_token_id=None, torch_dtype="float32")
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


def _hf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) pairs in the Hub layout, one at a time."""
    inter = model.cfg.moe_intermediate_size
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p  # DTensor (FSDP/TP) -> whole tensor
        t = t.detach()
        hf = name if name == "lm_head.weight" else "model." + name
        if name.endswith("mlp.experts.gate_up_proj"):
            base = hf[: -len("gate_up_proj")]
            for j in range(t.shape[0]):
                yield f"{base}{j}.gate_proj.weight", t[j, :, :inter].t()
                yield f"{base}{j}.up_proj.weight", t[j, :, inter:].t()
        elif name.endswith("mlp.experts.down_proj"):
            base = hf[: -len("down_proj")]
            for j in range(t.shape[0]):
                yield f"{base}{j}.down_proj.weight", t[j].t()
        elif name.startswith("mtp."):
            continue  # the DeepseekV2 format has no multi-token-prediction module
        else:
            yield hf, t
    for name, b in model.named_buffers():
        if name.endswith("gate.expert_bias") and model.cfg.aux_loss_free_bias:
            yield "model." + name.replace("gate.expert_bias", "gate.e_score_correction_bias"), b.detach()


def to_hf(model: Transformer, directory: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json + safetensors shards (+ index) that transformers' DeepseekV2ForCausalLM loads."""
    if model.cfg.attention != "mla":
        raise ValueError(f"Hugging Face export writes DeepSeek-V2 checkpoints, which hold MLA only; this model has "
                         f"model.attention={model.cfg.attention}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, total_bytes, shard_names = 0, 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        fname = f"model-{len(shard_names) + 1:05d}.safetensors"
        save_file(shard, str(directory / (fname + ".tmp")), metadata={"format": "pt"})
        os.replace(directory / (fname + ".tmp"), directory / fname)
        shard_names.append(fname)
        weight_map.update({k: fname for k in shard})
        shard, shard_bytes = {}, 0

    for name, t in _hf_tensors(model):
        size = t.numel() * t.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = t.contiguous().cpu()
        shard_bytes += size
        total_bytes += size
    if shard:
        flush()
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (directory / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=1))
