"""A training step's routing statistics over every MoE layer of the model, whichever ranks hold them.

Each MoE module accumulates, between optimizer steps, its routed assignments per expert, its dropped and total
assignments and its latest balance-loss values (model/moe.py). `MoEStats.collect` reads them from this rank's
layers, sums them over the pipeline ranks (each layer lives on one stage) and over the data- and
context-parallel ranks (each routed other tokens) in one collective each, applies the V3 expert-bias update
with the global loads, resets the modules and keeps what the metrics need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.moe import MoE, active_balance_terms

from .metrics import max_vio


@dataclass(frozen=True)
class StatsGroups:
    """The process groups the statistics are summed over (None: one rank)."""
    device: torch.device
    pp_group: Any = None  # pipeline ranks: each holds some of the layers
    token_group: Any = None  # data- and context-parallel ranks: each routed other tokens
    token_world: int = 1

    def gather(self, rows: dict[int, torch.Tensor], ids: list[int], width: int) -> torch.Tensor:
        """[len(ids), width]: this rank's rows (by global layer index) in place, summed over pipeline ranks."""
        full = torch.zeros(len(ids), width, device=self.device)
        for i, row in rows.items():
            full[ids.index(i)] = row.float()
        if self.pp_group is not None:
            dist.all_reduce(full, group=self.pp_group)
        return full


@dataclass
class MoEStats:
    layer_ids: list[int]  # every MoE layer of the model (global index; MTP depths follow the last layer)
    loads: torch.Tensor  # [layers, experts] each layer's load fractions over the step's whole batch (CPU)
    dropped_fraction: float  # dropped / routed assignments over all layers
    aux: dict[str, float]  # "aux/<term>": balance-loss value, mean over the token ranks, summed over layers

    @classmethod
    @torch.no_grad()
    def collect(cls, layers: dict[int, MoE], cfg: ModelConfig, groups: StatsGroups,
                update_bias: bool) -> MoEStats | None:
        """The step's statistics from this rank's `layers`; the modules' counters are reset. None: no MoE."""
        ids, names, e = cfg.moe_layer_ids(), active_balance_terms(cfg), cfg.n_routed_experts
        if not ids:
            return None
        counts_at, dropped_at, aux_at = slice(0, e), slice(e, e + 2), slice(e + 2, e + 2 + len(names))
        rows = {i: torch.cat([m.tokens_per_expert, m.dropped,
                              *[m.aux_values.get(n, m.dropped.new_zeros(())).float().view(1) for n in names]])
                for i, m in layers.items()}
        full = groups.gather(rows, ids, aux_at.stop)
        if groups.token_world > 1:  # loads summed over the token ranks; each rank's balance losses are its own
            dist.all_reduce(full, group=groups.token_group)  # tokens' (its mean affinity P): the loss the
            full[:, aux_at] /= groups.token_world  # averaged gradients follow is their mean
        counts, dropped = full[:, counts_at], full[:, dropped_at].sum(0)
        for i, m in layers.items():
            if update_bias:
                m.update_expert_bias(counts[ids.index(i)])
            m.reset_stats()
        aux = {f"aux/{n}": float(full[:, aux_at.start + k].sum()) for k, n in enumerate(names)}
        loads = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        return cls(ids, loads.cpu(), float(dropped[0] / dropped[1].clamp_min(1)), aux)

    def metrics(self) -> dict[str, float]:
        return {"max_vio": max_vio(self.loads), "dropped_fraction": self.dropped_fraction, **self.aux}


def gathered_expert_bias(layers: dict[int, MoE], cfg: ModelConfig, groups: StatsGroups) -> torch.Tensor:
    """[layers, experts] the V3 expert bias of every MoE layer (CPU)."""
    local = {i: m.gate.expert_bias for i, m in layers.items()}
    return groups.gather(local, cfg.moe_layer_ids(), cfg.n_routed_experts).cpu()
