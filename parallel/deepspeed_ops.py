"""What the run takes from DeepSpeed: its fused vocabulary-parallel linear cross-entropy, imported quietly.

`fused_lm_loss(part)` is the loss of a model part whose forward returns the head's input (the final norm's
output, `Transformer.return_head_input`): DeepSpeed's `vocab_parallel_linear_cross_entropy` multiplies it by
`part.lm_head.weight` a block of tokens at a time in forward and recomputes the logits a block of the vocabulary at
a time in backward, so the [tokens, vocab] logits and their gradient never exist whole. Layouts:
  - tensor parallelism: the head's weight is a vocab-sharded DTensor; each rank passes its rows and the tp group
    (DeepSpeed all-reduces the softmax statistics and the hidden-state gradient over it). The hidden states,
    sequence-sharded under sequence parallelism, are all-gathered first (the fused function needs every
    token on every tp rank, as a column-parallel head does); backward hands each rank its part of the
    all-reduced gradient.
  - pipeline parallelism: the last stage's loss (the heads of MTP depths too).
  - context parallelism: each rank's mean over its part, as the unfused loss (no sp_group: the trainer
    averages the parts' losses and FSDP their gradients).
The weight is read when the loss runs: FSDP2 keeps the root module's parameters gathered from its forward to its
backward, so it is the gathered (and mixed-precision) weight the unfused head would have used.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import warnings
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard


def import_deepspeed(name: str):
    """Import DeepSpeed module `name` without the accelerator-detection lines its import logs to stdout."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return importlib.import_module(name)
    finally:
        logging.disable(previous)


def deepspeed_problem(name: str = "deepspeed.sequence.linear_cross_entropy") -> str | None:
    """Why DeepSpeed module `name` cannot be used here (one line), or None when it imports."""
    try:
        import_deepspeed(name)
    except Exception as e:  # ImportError, or a broken install failing inside DeepSpeed's own import
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def _use_group(group) -> None:
    """DeepSpeed's collectives go through `deepspeed.comm`, which must wrap the torch process group once."""
    comm = import_deepspeed("deepspeed.comm")
    if not comm.is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # on CPU it prints that it built its shared-memory op
            comm.init_distributed(dist_backend=dist.get_backend(group), auto_mpi_discovery=False, verbose=False)


def _local_head(weight: torch.Tensor):
    """(this rank's rows of the head's weight, the tp process group or None)."""
    if not isinstance(weight, DTensor):
        return weight, None
    sharded = [i for i, p in enumerate(weight.placements) if isinstance(p, Shard) and p.dim == 0]
    group = weight.device_mesh.get_group(sharded[0]) if sharded else None
    if group is not None:
        _use_group(group)
    return weight.to_local(), group


def _whole_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """Every token's hidden state on every rank of its mesh, as a plain tensor."""
    if isinstance(hidden, DTensor):
        return hidden.redistribute(placements=[Replicate()] * hidden.device_mesh.ndim).to_local()
    return hidden


def fused_lm_loss(part: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(hidden [B, T, D], labels [B, T]) -> mean cross-entropy of part.lm_head(hidden), fused (fp32 scalar)."""
    linear_ce = import_deepspeed("deepspeed.sequence.linear_cross_entropy").vocab_parallel_linear_cross_entropy

    def loss(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight, group = _local_head(part.lm_head.weight)
        with warnings.catch_warnings():  # DeepSpeed checks the vocabulary shards with a collective torch deprecates
            warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated",
                                    category=FutureWarning)
            return linear_ce(_whole_tokens(hidden), weight, labels, tp_group=group)
    return loss
