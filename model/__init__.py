"""DeepSeek-V2/V3-style models in plain single-device PyTorch (no distributed code, no Hydra).

Extension points: attributes with single-device defaults that parallel/ replaces to run the same modules at
scale (the model never calls a collective itself):
  MLA.attend, Attention.attend      the attention core, (q, k, v, scale, observe=None) -> out, calling
                                    observe(q, k) on the whole sequences it attends over (QK-clip's
                                    measurement); default fused causal SDPA; context parallelism puts Ulysses
                                    attention here (parallel/context.py)
  Transformer.sequence_shard        (index, count) of the sequence part this model sees; default (0, 1);
                                    sets RoPE positions and the MTP share under context parallelism
  MoE.reduce_counts                 sums expert loads over the data-parallel ranks (global balance losses);
                                    default None: this rank's own (parallel/__init__.py)
  MoE.reduce_sequence               sums per-sequence counts over the context-parallel ranks; default None
  GroupedExperts.gemm               the grouped GEMM of the experts; default None: torch._grouped_mm in high
                                    precision; FP8 recipes put theirs here (parallel/fp8.py)
"""

from .config import ModelConfig, load_preset
from .transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "load_preset"]
