"""Context parallelism: every sequence split into `cp` equal consecutive parts, one per rank of the `cp` mesh
axis, with Ulysses-style attention (DeepSpeed-Ulysses, arXiv 2309.14509).

Everything but attention works on tokens independently, so each rank runs the model on its part: the
embedding, norms, MLPs, routing and experts see [B, T/cp] tokens, and RoPE starts at the part's first
position (`Transformer.sequence_shard`). Attention needs whole sequences; MLA's core is swapped for one that
  all-to-all   q, k [B, T/cp, H, N+R], v [B, T/cp, H, V]  ->  [B, T, H/cp, .]   (sequence gathered, heads split;
               MHA/GQA/MQA's k, v with K heads -> K/cp: rank j's query heads read exactly its K/V heads)
  local causal SDPA on whole sequences for H/cp heads
  all-to-all   out [B, T, H/cp, V]  ->  [B, T/cp, H, V]                           (back to the sequence part)
so each rank computes exactly the scores one process would for those heads, and the causal work is even.
Per layer that is 2 all-to-alls forward and 2 backward of (2(N+R) + 2V) * H/cp * T/cp * B elements each way,
independent of cp's size in total volume per rank, which is why Ulysses scales to long contexts.

The rest of the step needs only reductions: the loss is the mean over the parts' tokens (equal counts), the
weights' gradients are averaged over cp like over data-parallel ranks (FSDP shards over cp too), and the
balance losses count whole sequences (`MoE.reduce_counts` / `MoE.reduce_sequence` sum over cp).

Multi-token prediction: depth k at position i reads token i+k, which for the part's last k positions lies on
the next part, so each rank gets its labels with up to D positions of the next part beyond its own (the trainer,
which reads whole sequences); depth k covers positions i < T - k, so the last part is k positions shorter
there, and that depth's attention pads it back to equal parts for the all-to-all (the padding lies after every
real position of the sequence, which causal attention never reads) and drops the padding after.

Requires num_attention_heads % cp == 0 (and K/V heads % cp == 0) and seq_len / cp > the MTP depth; no tensor
parallelism with it yet
(checked by ParallelDims).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig

from .expert import all_to_all, reduce_loads_over


def check_cp(cfg: ModelConfig, cp: int) -> None:
    """ValueError naming the numbers when the model cannot run split over `cp` ranks per sequence."""
    if cfg.num_attention_heads % cp:
        raise ValueError(f"num_attention_heads={cfg.num_attention_heads} is not divisible by cp={cp} "
                         f"(context parallelism gives each rank a share of the heads for whole sequences)")
    if cfg.kv_heads % cp:
        raise ValueError(f"model.attention={cfg.attention} has {cfg.kv_heads} K/V heads, not divisible by cp={cp} "
                         f"(context parallelism gives each rank a share of the K/V heads for whole sequences)")


class UlyssesAttention:
    """`MLA.attend` on a part of each sequence: whole sequences for H/cp heads between two all-to-alls.
    `tail`: the whole sequence is that many positions shorter than cp equal parts (MTP depth k: k), so the last
    part (`pad` = tail there, 0 elsewhere) is padded to the others' length."""

    def __init__(self, group, local, pad: int = 0, tail: int = 0):
        self.group = group
        self.cp = dist.get_world_size(group)
        self.local = local  # the single-process attention core
        self.pad, self.tail = pad, tail

    @torch.compiler.disable  # collectives with Python-side split sizes; the rest of the block still compiles
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 observe=None) -> torch.Tensor:
        if self.pad:  # at the sequence's end: causal attention never reads it for a real position
            q, k, v = (F.pad(x, (0, 0, 0, 0, 0, self.pad)) for x in (q, k, v))
        real = None if observe is None else lambda q, k: observe(*(x[:, :x.shape[1] - self.tail] for x in (q, k)))
        out = self._to_sequence(self.local(self._to_heads(q), self._to_heads(k), self._to_heads(v), scale, real))
        return out[:, :out.shape[1] - self.pad]

    def _exchange(self, chunks: torch.Tensor) -> torch.Tensor:
        """[cp, B, ...] with chunk j for rank j -> [cp, B, ...] with chunk j from rank j."""
        b = chunks.shape[1]
        sizes = [b] * self.cp
        return all_to_all(chunks.flatten(0, 1), sizes, sizes, self.group).unflatten(0, (self.cp, b))

    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T/cp, H, D] -> [B, T, H/cp, D]: send head group j to rank j, receive every part of the sequence."""
        b, t, h, d = x.shape
        parts = self._exchange(x.unflatten(2, (self.cp, h // self.cp)).permute(2, 0, 1, 3, 4))  # (cp, B, t, H/cp, D)
        return parts.permute(1, 0, 2, 3, 4).flatten(1, 2)

    def _to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H/cp, D] -> [B, T/cp, H, D]: the inverse of `_to_heads`."""
        b, t, h, d = x.shape
        heads = self._exchange(x.unflatten(1, (self.cp, t // self.cp)).transpose(0, 1))  # (cp, B, t/cp, H/cp, D)
        return heads.permute(1, 2, 0, 3, 4).flatten(2, 3)


def apply_cp(model: nn.Module, cp_mesh) -> None:
    """Make this rank's model (part) compute its part of every sequence: RoPE offsets, Ulysses attention, and
    the sequence-wise balance loss over whole sequences."""
    from model.attention import MLA, Attention
    from model.moe import MoE

    group = cp_mesh.get_group()
    model.sequence_shard = (cp_mesh.get_local_rank(), cp_mesh.size())
    reduce = reduce_loads_over(group)
    last = cp_mesh.get_local_rank() == cp_mesh.size() - 1
    depth = {id(m.block.self_attn): k for k, m in enumerate(model.mtp or [], start=1)}
    for module in model.modules():
        if isinstance(module, (MLA, Attention)):
            tail = depth.get(id(module), 0)
            module.attend = UlyssesAttention(group, module.attend, pad=tail if last else 0, tail=tail)
        elif isinstance(module, MoE):
            module.reduce_sequence = reduce
