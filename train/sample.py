"""`python -m train.sample output_dir=<run> sample.prompt="..." [sample.max_new_tokens=64] [sample.temperature=0]
[sample.top_p=0.9] [sample.top_k=50] [sample.step=N] [sample.prompt_file=<one prompt a line>] [sample.seed=0]`

Loads a checkpoint of the run on one device (a GPU when there is one) and prints each prompt's continuation,
decoded with the run's tokenizer, generated through the latent KV cache (model/generate.py). Several prompts
run as one left-padded batch.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from model.config import require
from model.generate import generate

from .config import ConfigError
from .runfiles import checkpoint_of, load_model, main_guard, parse_args, run_config, run_tokenizer


@dataclass
class SampleConfig:
    prompt: Optional[str] = None
    prompt_file: Optional[str] = None  # one prompt a line
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    step: Optional[int] = None  # None: the newest checkpoint
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.max_new_tokens >= 1, f"sample.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _require(math.isfinite(self.temperature) and self.temperature >= 0,
                 f"sample.temperature must be >= 0 (0: greedy), got {self.temperature}")
        _require(self.top_p is None or 0 < self.top_p <= 1,
                 f"sample.top_p must lie in (0, 1] (or null: off), got {self.top_p}")
        _require(self.top_k is None or self.top_k >= 1, f"sample.top_k must be >= 1 (or null: off), got {self.top_k}")
        _require(self.step is None or self.step >= 0, f"sample.step must be >= 0 (or null: newest), got {self.step}")
        _require(self.seed >= 0, f"sample.seed must be >= 0, got {self.seed}")


def _require(cond: bool, msg: str) -> None:
    require(cond, msg, ConfigError)


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> (ids [B, T] padded on the left, pad counts [B])."""
    width = max(len(r) for r in rows)
    pad = torch.tensor([width - len(r) for r in rows])
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    return ids, pad


def prompts_of(scfg: SampleConfig) -> list[str]:
    if scfg.prompt_file:
        lines = [line for line in Path(scfg.prompt_file).read_text().splitlines() if line]
        return lines + ([scfg.prompt] if scfg.prompt else [])
    if scfg.prompt is None:
        raise ConfigError("sample.prompt=<text> or sample.prompt_file=<file> is required")
    return [scfg.prompt]


def sample(model, tok, prompts: list[str], scfg: SampleConfig, device) -> list[list[int]]:
    """Each prompt's new token ids (up to its end-of-document token)."""
    rows = [tok.encode(p) or [tok.eos_id] for p in prompts]
    ids, pad = left_padded(rows, tok.eos_id)
    gen = torch.Generator(device=device).manual_seed(scfg.seed)
    out = generate(model, ids.to(device), scfg.max_new_tokens, scfg.temperature, scfg.top_k, gen, tok.eos_id,
                   scfg.top_p, pad.to(device) if bool(pad.any()) else None)
    new = out[:, ids.shape[1]:].tolist()
    return [r[: r.index(tok.eos_id)] if tok.eos_id in r else r for r in new]


def run(argv: list[str]) -> int:
    run_dir, scfg, rest = parse_args(argv, SampleConfig, "sample")
    if rest:
        raise ConfigError(f"unknown arguments {rest}; expected output_dir=... sample.<key>=...")
    prompts = prompts_of(scfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = checkpoint_of(run_dir, scfg.step)
    cfg = run_config(ckpt)
    tok = run_tokenizer(cfg).tok
    model = load_model(ckpt, cfg, device)
    for prompt, ids in zip(prompts, sample(model, tok, prompts, scfg, device)):
        print(f"{prompt}{tok.decode(ids)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_guard(run, argv)


if __name__ == "__main__":
    sys.exit(main())
