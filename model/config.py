"""ModelConfig: every hyperparameter of a DeepSeek-V2/V3-style model, and named presets.

Field names follow the Hugging Face DeepSeek-V2/V3 `config.json` wherever one exists, so a config
dict from the Hub maps onto this dataclass key for key. Fields without a Hugging Face twin (the
balance-loss coefficients, token dropping, multi-token prediction weight) carry the paper's names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ATTENTIONS = ("mla", "mha", "gqa", "mqa")
SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass
class ModelConfig:
    # --- sizes ---
    vocab_size: int = 256
    hidden_size: int = 64
    num_hidden_layers: int = 2
    max_position_embeddings: int = 4096
    # --- attention ---
    # mla: Multi-head Latent Attention (the fields below); mha | gqa | mqa: q/k/v/o projections with RoPE over the
    # whole head and a plain K/V cache (the ablations of DeepSeek-V2 appendix D)
    attention: str = "mla"
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None  # gqa: K/V heads (divides num_attention_heads); mha: heads; mqa: 1
    head_dim: Optional[int] = None  # mha/gqa/mqa head width (even); None: v_head_dim
    # --- Multi-head Latent Attention ---
    q_lora_rank: Optional[int] = None  # None: queries are not compressed (V2-Lite)
    kv_lora_rank: int = 32  # width of the cached latent c_KV
    qk_nope_head_dim: int = 16  # per-head query/key width without position
    qk_rope_head_dim: int = 8  # decoupled rotary width; one rotary key is shared by all heads
    v_head_dim: int = 16
    rope_theta: float = 10000.0
    # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    #        "mscale", "mscale_all_dim"}; None: plain RoPE.
    rope_scaling: Optional[dict] = None
    rms_norm_eps: float = 1e-6
    # --- feed-forward ---
    intermediate_size: int = 128  # dense layers (the first `first_k_dense_replace`)
    moe_intermediate_size: int = 32  # each routed and shared expert
    first_k_dense_replace: int = 1
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    # --- routing ---
    scoring_func: str = "softmax"  # softmax (V2) | sigmoid (V3)
    topk_method: str = "greedy"  # greedy | group_limited_greedy (V2: group score = max) | noaux_tc (V3: top-2 sum)
    n_group: int = 1  # expert groups (= devices for device-limited routing)
    topk_group: int = 1  # groups a token may reach
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False  # normalise the chosen weights to sum 1 (then scale)
    # --- load balance (DeepSeek-V2 sec. 2.2.3, DeepSeek-V3 sec. 2.1.2) ---
    aux_loss_alpha: float = 0.0  # expert-level balance loss, alpha_1
    device_aux_loss_alpha: float = 0.0  # device-level balance loss, alpha_2
    comm_aux_loss_alpha: float = 0.0  # communication balance loss, alpha_3
    seq_aux_loss_alpha: float = 0.0  # V3 sequence-wise balance loss
    n_balance_groups: Optional[int] = None  # D for the device/comm losses and dropping; None: n_group
    aux_loss_free_bias: bool = False  # V3: a per-expert bias, used for selection only
    bias_update_speed: float = 0.001  # gamma of the bias update, applied once per optimizer step
    capacity_factor: Optional[float] = None  # V2 device-level token dropping; None: never drop
    no_drop_fraction: float = 0.1  # fraction of sequences whose tokens are never dropped
    # --- multi-token prediction (V3) ---
    num_nextn_predict_layers: int = 0  # MTP depth D; 0: off
    mtp_loss_weight: float = 0.3  # lambda
    # --- init / misc ---
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict)  # free-form notes (published param counts, source)

    def __post_init__(self) -> None:
        _validate(self)

    # derived sizes ---------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_heads(self) -> int:
        """K/V heads: every query head has its own under mla (after decompression) and mha, one under mqa."""
        if self.attention == "gqa":
            return self.num_key_value_heads
        return 1 if self.attention == "mqa" else self.num_attention_heads

    @property
    def attn_head_dim(self) -> int:
        """Per-head width of q, k and v under mha/gqa/mqa."""
        return self.head_dim if self.head_dim is not None else self.v_head_dim

    @property
    def rope_dim(self) -> int:
        """Rotary width: MLA's decoupled key/query part, the whole head otherwise."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.attn_head_dim

    @property
    def balance_groups(self) -> int:
        return self.n_balance_groups if self.n_balance_groups is not None else self.n_group

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    def moe_layer_ids(self) -> list[int]:
        """Global indices of every MoE layer (the MTP depths follow the last decoder layer)."""
        return [i for i in range(self.num_hidden_layers + self.num_nextn_predict_layers) if self.is_moe_layer(i)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# dtype names of the config (precision.param_dtype, export.dtype, ...) -> torch dtypes, for every part that reads one
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require(cond: bool, msg: str, error: type[Exception] = ValueError) -> None:
    """Raise `error(msg)` unless `cond`: the one check of every config validator (model/ and train/)."""
    if not cond:
        raise error(msg)


_require = require


def _validate(c: ModelConfig) -> None:
    positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                "qk_nope_head_dim", "v_head_dim", "intermediate_size", "max_position_embeddings"]
    for name in positive:
        _require(getattr(c, name) > 0, f"model.{name} must be > 0, got {getattr(c, name)}")
    _require(c.qk_rope_head_dim > 0 and c.qk_rope_head_dim % 2 == 0,
             f"model.qk_rope_head_dim must be a positive even number, got {c.qk_rope_head_dim}")
    _validate_attention(c)
    _require(c.q_lora_rank is None or c.q_lora_rank > 0,
             f"model.q_lora_rank must be null or > 0, got {c.q_lora_rank}")
    _require(0 <= c.first_k_dense_replace <= c.num_hidden_layers,
             f"model.first_k_dense_replace={c.first_k_dense_replace} must lie in [0, num_hidden_layers="
             f"{c.num_hidden_layers}]")
    _require(c.scoring_func in SCORING_FUNCS,
             f"model.scoring_func must be one of {SCORING_FUNCS}, got {c.scoring_func!r}")
    _require(c.topk_method in TOPK_METHODS, f"model.topk_method must be one of {TOPK_METHODS}, got {c.topk_method!r}")
    if c.n_routed_experts > 0:
        _validate_moe(c)
    _validate_rope_scaling(c.rope_scaling)
    for name in ("aux_loss_alpha", "device_aux_loss_alpha", "comm_aux_loss_alpha", "seq_aux_loss_alpha",
                 "bias_update_speed", "mtp_loss_weight", "initializer_range"):
        _require(getattr(c, name) >= 0, f"model.{name} must be >= 0, got {getattr(c, name)}")
    _require(c.num_nextn_predict_layers >= 0,
             f"model.num_nextn_predict_layers must be >= 0, got {c.num_nextn_predict_layers}")


def _validate_attention(c: ModelConfig) -> None:
    _require(c.attention in ATTENTIONS, f"model.attention must be one of {ATTENTIONS}, got {c.attention!r}")
    h, kv = c.num_attention_heads, c.num_key_value_heads
    if c.attention == "gqa":
        _require(kv is not None and kv > 0 and h % kv == 0,
                 f"model.attention=gqa needs model.num_key_value_heads dividing num_attention_heads={h}, got {kv}")
    else:
        want = {"mqa": 1, "mha": h}.get(c.attention)
        _require(kv is None or kv == want, f"model.num_key_value_heads={kv} does not fit model.attention="
                                           f"{c.attention} (null{'' if want is None else f' or {want}'})")
    _require(c.head_dim is None or c.head_dim > 0, f"model.head_dim must be null or > 0, got {c.head_dim}")
    if c.attention != "mla":
        _require(c.attn_head_dim % 2 == 0, f"model.attention={c.attention} rotates the whole head: head width "
                                           f"{c.attn_head_dim} (head_dim, else v_head_dim) must be even")


def _validate_moe(c: ModelConfig) -> None:
    e, k = c.n_routed_experts, c.num_experts_per_tok
    _require(c.moe_intermediate_size > 0, f"model.moe_intermediate_size must be > 0, got {c.moe_intermediate_size}")
    _require(0 < k <= e, f"model.num_experts_per_tok={k} must lie in [1, n_routed_experts={e}]")
    _require(c.n_shared_experts >= 0, f"model.n_shared_experts must be >= 0, got {c.n_shared_experts}")
    _require(c.n_group >= 1 and e % c.n_group == 0,
             f"model.n_routed_experts={e} must be divisible by n_group={c.n_group}")
    _require(1 <= c.topk_group <= c.n_group, f"model.topk_group={c.topk_group} must lie in [1, n_group={c.n_group}]")
    if c.topk_method != "greedy":
        per_group = e // c.n_group
        _require(per_group * c.topk_group >= k,
                 f"model: topk_group={c.topk_group} groups of {per_group} experts cannot hold num_experts_per_tok={k}")
    if c.topk_method == "noaux_tc":
        _require(e // c.n_group >= 2, f"model.topk_method=noaux_tc scores a group by its top-2 experts; "
                                      f"n_routed_experts/n_group={e // c.n_group} < 2")
    d = c.balance_groups
    _require(d >= 1 and e % d == 0, f"model.n_routed_experts={e} must be divisible by n_balance_groups={d}")
    _require(c.capacity_factor is None or c.capacity_factor > 0,
             f"model.capacity_factor must be null or > 0, got {c.capacity_factor}")
    _require(0.0 <= c.no_drop_fraction <= 1.0, f"model.no_drop_fraction must lie in [0, 1], got {c.no_drop_fraction}")


def _validate_rope_scaling(rs: Optional[dict]) -> None:
    if rs is None:
        return
    kind = rs.get("type", rs.get("rope_type"))
    _require(kind == "yarn", f"model.rope_scaling.type must be 'yarn' (or rope_scaling null), got {kind!r}")
    for key in ("factor", "original_max_position_embeddings"):
        _require(key in rs, f"model.rope_scaling is missing '{key}'")
    _require(rs["factor"] >= 1.0, f"model.rope_scaling.factor must be >= 1, got {rs['factor']}")


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a dict, rejecting keys it does not know (one line naming them)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    _require(not unknown, f"unknown model config keys: {unknown}")
    return ModelConfig(**d)


def load_preset(name: str) -> ModelConfig:
    """Read `conf/model/<name>.yaml` into a ModelConfig."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ValueError(f"no model preset {name!r} (looked for {path}); available: {have}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    data.pop("defaults", None)
    data.pop("name", None)
    return config_from_dict(data)
