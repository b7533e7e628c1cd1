"""ParallelDims: the sizes of every parallel axis, validated against the world size and the model
before any process group exists, and the named DeviceMesh built from them.

world = pp * dp_replicate * dp_shard * cp * tp; expert parallelism borrows its ranks from dp_shard.

Mesh axes: ("pp", "dp_replicate", "efsdp", "cp", "ep", "tp") with dp_shard = efsdp * ep, plus flattened
views: "dp" (dp_replicate, efsdp, ep), the ranks that read different sequences (the data stream); "dp_cp"
(dp, cp), every rank with different tokens (the loss, the global loads); "dp_shard" (efsdp, ep) for dense
FSDP, and "efsdp" for expert weights, which, already split over "ep", are FSDP-sharded over what dp_shard
leaves (both replicated over "dp_replicate"). Context parallelism (cp) splits each sequence over its ranks
(parallel/context.py); they hold the same weights, so FSDP shards over them too: "dp_shard_cp" (efsdp, cp,
ep) and "efsdp_cp" (efsdp, cp) take the place of "dp_shard" and "efsdp" when cp > 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig


# cp before ep: a flattened (efsdp, cp) axis must precede "ep" for FSDP to combine it with the expert split
MESH_AXES = ("pp", "dp_replicate", "efsdp", "cp", "ep", "tp")


class LayoutError(ValueError):
    """An impossible parallel layout (one line naming the numbers)."""


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1
    pp_stages_per_rank: int = 1
    cp: int = 1

    @classmethod
    def resolve(cls, world_size: int, dp_replicate: int = 1, dp_shard: int = -1, tp: int = 1, ep: int = 1,
                pp: int = 1, pp_stages_per_rank: int = 1, cp: int = 1) -> "ParallelDims":
        """Fill dp_shard=-1 with what the other axes leave of the world, then validate."""
        if dp_shard == -1:
            rest = dp_replicate * cp * tp * pp
            if world_size % rest:
                raise LayoutError(f"world size {world_size} is not divisible by dp_replicate*cp*tp*pp = "
                                  f"{dp_replicate}*{cp}*{tp}*{pp} = {rest}")
            dp_shard = world_size // rest
        dims = cls(world_size, dp_replicate, dp_shard, tp, ep, pp, pp_stages_per_rank, cp)
        dims.validate()
        return dims

    def validate(self) -> None:
        prod = self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp
        if prod != self.world_size:
            raise LayoutError(f"pp*dp_replicate*dp_shard*cp*tp = {self.pp}*{self.dp_replicate}*{self.dp_shard}*"
                              f"{self.cp}*{self.tp} = {prod} != world size {self.world_size}")
        if self.dp_shard % self.ep:
            raise LayoutError(f"ep={self.ep} must divide dp_shard={self.dp_shard} (expert parallelism borrows "
                              f"data-parallel ranks)")
        if self.pp_stages_per_rank < 1:
            raise LayoutError(f"pp_stages_per_rank={self.pp_stages_per_rank} must be >= 1")
        if self.cp < 1:
            raise LayoutError(f"cp={self.cp} must be >= 1")
        if self.cp > 1 and self.tp > 1:
            raise LayoutError(f"cp={self.cp} with tp={self.tp}: context parallelism does not combine with tensor "
                              f"parallelism yet; use one of them")

    def validate_model(self, cfg: ModelConfig) -> None:
        if cfg.num_attention_heads % self.tp:
            raise LayoutError(f"num_attention_heads={cfg.num_attention_heads} is not divisible by tp={self.tp}")
        if self.tp > 1:
            from .tensor import check_tp
            try:
                check_tp(cfg, self.tp)
            except ValueError as e:
                raise LayoutError(str(e)) from None

        if self.ep > 1 and cfg.n_routed_experts % self.ep:
            raise LayoutError(f"n_routed_experts={cfg.n_routed_experts} is not divisible by ep={self.ep}")
        if self.ep > 1 and not cfg.n_routed_experts:
            raise LayoutError(f"ep={self.ep} needs routed experts but n_routed_experts=0")
        limited = cfg.topk_method != "greedy" and cfg.n_group > 1
        if self.ep > 1 and limited and cfg.n_group % self.ep and self.ep % cfg.n_group:
            raise LayoutError(f"n_group={cfg.n_group} and ep={self.ep}: one must divide the other so a routing "
                              f"group maps to whole devices (n_group % ep == 0) or devices to whole groups")
        if self.cp > 1:
            from .context import check_cp
            try:
                check_cp(cfg, self.cp)
            except ValueError as e:
                raise LayoutError(str(e)) from None
        stages = self.pp * self.pp_stages_per_rank
        if cfg.num_hidden_layers < stages:
            raise LayoutError(f"num_hidden_layers={cfg.num_hidden_layers} < pipeline stages "
                              f"pp*pp_stages_per_rank = {self.pp}*{self.pp_stages_per_rank} = {stages}")

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ways the global batch is split."""
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh
        shape = (self.pp, self.dp_replicate, self.dp_shard // self.ep, self.cp, self.ep, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_AXES)
        mesh["efsdp", "ep"]._flatten("dp_shard")
        mesh["dp_replicate", "efsdp", "ep"]._flatten("dp")
        mesh["dp_replicate", "efsdp", "cp", "ep"]._flatten("dp_cp")
        mesh["efsdp", "cp", "ep"]._flatten("dp_shard_cp")
        mesh["efsdp", "cp"]._flatten("efsdp_cp")
        return mesh
