"""`python -m train.evaluate output_dir=<run> eval.data=<prepared dataset> [eval.step=N] [eval.batches=N]
[eval.split=val]`: loss, perplexity and bits per byte of a checkpoint on a dataset's split.

Runs as one process or under torchrun with any layout (`parallel.*=...` overrides the run's own): the
checkpoint's model weights are loaded into the layout's model parts (DCP reshards them) and the batches are
the training validation's (the split's first `eval.batches` batches of train.global_batch_size sequences),
so on the run's validation split the loss equals the run's own `val_loss` at that step. The results are
printed and appended to the run's metrics.jsonl as `eval/loss`, `eval/perplexity`, `eval/bits_per_byte`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from model.config import require

from .checkpoint import load_model_weights
from .config import ConfigError
from .env import rank_env
from .runfiles import checkpoint_of, main_guard, parse_args, run_config, run_tokenizer


SPLITS = ("train", "val")  # the splits train.data.prepare writes
ONE_PROCESS = ["parallel.dp_replicate=1", "parallel.dp_shard=-1", "parallel.tp=1", "parallel.ep=1", "parallel.pp=1",
               "parallel.cp=1", "parallel.pp_stages_per_rank=1"]


@dataclass
class EvalConfig:
    data: Optional[str] = None  # a prepared dataset (python -m train.data.prepare)
    split: str = "val"
    step: Optional[int] = None  # None: the newest checkpoint
    batches: Optional[int] = None  # None: the run's data.val_batches

    def __post_init__(self) -> None:
        require(self.split in SPLITS, f"eval.split must be one of {', '.join(SPLITS)}, got {self.split!r}", ConfigError)
        require(self.batches is None or self.batches >= 1,
                f"eval.batches must be >= 1 (or null: the run's data.val_batches), got {self.batches}", ConfigError)
        require(self.step is None or self.step >= 0, f"eval.step must be >= 0 (or null: newest), got {self.step}",
                ConfigError)


def token_bytes(tok, ids: torch.Tensor) -> int:
    """UTF-8 bytes the tokens stand for (byte tokenizer: ids below 256; others: their decoded text)."""
    if getattr(tok, "spec", None) == "byte":
        return int((ids < 256).sum())
    return sum(len(tok.decode(row).encode("utf-8")) for row in ids.tolist())


def evaluate(rt, ckpt: Path, ecfg: EvalConfig) -> dict:
    """{"loss", "perplexity", "bits_per_byte"} of the checkpoint on the split, over every rank of the runtime
    `rt` (its model parts built)."""
    from .data.loader import TokenDataset, TokenLoader
    from .step import Step

    cfg, g = rt.cfg, rt.groups
    load_model_weights(ckpt, rt.parts, check=False)  # checkpoint_of verified it
    loader = TokenLoader(TokenDataset(Path(ecfg.data), ecfg.split), seq_len=cfg.data.seq_len,
                         global_batch_size=cfg.train.global_batch_size, micro_batch_size=cfg.train.micro_batch_size,
                         dp_rank=g.dp_rank, dp_world=g.dp_world, seed=cfg.train.seed)
    batches = cfg.data.val_batches if ecfg.batches is None else ecfg.batches
    whole = loader.val_batches(batches, cfg.train.global_batch_size // g.dp_world)
    step = Step(rt)
    loss = torch.stack(step.losses(step.sequence_part(whole), int(ckpt.name.split("_")[-1]))).mean()
    tok = run_tokenizer(cfg, Path(ecfg.data)).tok
    counts = torch.tensor([sum(y.numel() for _, y in whole), sum(token_bytes(tok, y) for _, y in whole)],
                          dtype=torch.float64)
    if g.token_world > 1:
        dist.all_reduce(loss, group=g.token_group)
        loss /= g.token_world
        dist.all_reduce(counts, group=rt.mesh["dp"].get_group())
    value = float(loss)
    tokens, nbytes = float(counts[0]), float(counts[1])
    bpb = value * tokens / (math.log(2) * nbytes) if nbytes else float("nan")
    return {"loss": value, "perplexity": math.exp(value), "bits_per_byte": bpb}


def run(argv: list[str]) -> int:
    from .data.loader import DataError
    from .runtime import build_runtime

    run_dir, ecfg, rest = parse_args(argv, EvalConfig, "eval")
    if not ecfg.data:
        raise ConfigError("eval.data=<a prepared dataset directory> is required")
    if not Path(ecfg.data).is_dir():
        raise DataError(f"eval.data={ecfg.data}: no such dataset directory (python -m train.data.prepare writes one)")
    ckpt = checkpoint_of(run_dir, ecfg.step)
    one_process = [] if rank_env(os.environ).world > 1 else ONE_PROCESS  # else the run's layout
    cfg = run_config(ckpt, one_process + rest + [f"output_dir={run_dir}", "checkpoint.init_from=null"])
    rt = build_runtime(cfg, data=False, optimizers=False)
    try:
        result = evaluate(rt, ckpt, ecfg)
        step = int(ckpt.name.split("_")[-1])
        if rt.env.rank == 0:
            record = {"step": step, **{f"eval/{k}": v for k, v in result.items()}, "eval/data": str(ecfg.data)}
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"step {step} | eval loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | "
                  f"bits/byte {result['bits_per_byte']:.4f}", flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
