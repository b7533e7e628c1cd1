"""Peak memory of one whole training step (forward, loss, backward, AdamW) at DeepSeek's vocabularies: our model
with the fused loss (train.fused_loss: DeepSpeed's linear cross-entropy, no logits), our model with fp32 logits
and F.cross_entropy, and transformers' DeepseekV2ForCausalLM on the same config computing its own loss.

The model is `tiny` (4 layers) with the vocabulary and hidden size replaced (--hidden, default 256), so the loss
dominates the step as it does on a pipeline's last stage. (DeepSpeed sizes its logits blocks like the hidden
states, so at tiny's own hidden size of 64 the fused loss runs ~1,600 blocks a pass, slow in Python on 2 cores.)
Memory is bench/model_step.py's measure: the RSS high-water mark over two steps minus
the RSS of the built model, in a fresh child process per case, with glibc mapping every tensor above 64 KiB on
its own (so RSS follows live tensors). A case whose fp32 logits, kept about four times over (logits, their
softmax and gradient, transformers' upcast), would not fit the memory the machine has free is skipped and says so.

    python bench/loss_memory.py [--vocab 102400 129280] [--seq-len 4096 16384] [--batch 1] [--hidden 256]
Last line: fused_vs_unfused=<ratio> fused_vs_hf=<ratio> at the first vocabulary and sequence length.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_step import _proc_status_kib  # noqa: E402
from machine import describe  # noqa: E402  (bench/, beside this file)

VARIANTS = ("fused", "unfused", "transformers")


def _config(vocab: int, hidden: int):
    from model import load_preset

    return load_preset("tiny").replace(vocab_size=vocab, hidden_size=hidden, aux_loss_alpha=0.0,
                                       device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0, seq_aux_loss_alpha=0.0)


def _step_fn(variant: str, vocab: int, hidden: int):
    """(model, tokens [B, T+1] -> loss) for a variant."""
    torch.manual_seed(0)
    cfg = _config(vocab, hidden)
    if variant == "transformers":
        import transformers
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

        from train.hf.format import config_to_hf
        transformers.logging.set_verbosity_error()
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**config_to_hf(cfg))).train()
        return model, lambda t: model(t[:, :-1], labels=t[:, :-1], use_cache=False).loss
    from model import Transformer
    from parallel.deepspeed_ops import fused_lm_loss

    model = Transformer(cfg, return_head_input=variant == "fused").train()
    if variant == "fused":
        loss_fn = fused_lm_loss(model)
    else:
        def loss_fn(logits, labels):
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    return model, lambda t: loss_fn(model(t[:, :-1]), t[:, 1:])


def _peak_child(variant: str, vocab: int, hidden: int, batch: int, seq_len: int) -> float:
    model, loss_of = _step_fn(variant, vocab, hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1))
    base = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark to the built model's RSS
    for _ in range(2):  # AdamW's states exist from the first step on: the peak comes in the second
        loss_of(tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (_proc_status_kib("VmHWM") - base) / 1024


def _available_mib() -> float:
    return _proc_status_mem("MemAvailable") / 1024


def _proc_status_mem(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_mib(variant: str, vocab: int, hidden: int, batch: int, seq_len: int) -> float:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when the child starts
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_peak_child, variant, vocab, hidden, batch, seq_len).result()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[102400, 129280])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args()
    print(describe(), flush=True)
    first = None
    print(f"{'vocab':>7} {'tokens':>7} " + " ".join(f"{v:>13}" for v in VARIANTS) + "   MiB, whole step's peak")
    for vocab in args.vocab:
        for seq in args.seq_len:
            logits_mib = 4 * args.batch * seq * vocab / 2**20
            row = {}
            for variant in VARIANTS:
                if variant != "fused" and 4 * logits_mib > _available_mib():
                    row[variant] = None
                    continue
                row[variant] = peak_mib(variant, vocab, args.hidden, args.batch, seq)
            cells = " ".join(f"{'skipped':>13}" if v is None else f"{v:13.0f}" for v in row.values())
            print(f"{vocab:7d} {args.batch * seq:7d} {cells}   (one fp32 logits tensor: {logits_mib:.0f} MiB)",
                  flush=True)
            first = first or row
    ratio = {k: (first["fused"] / first[k] if first[k] else float("nan")) for k in ("unfused", "transformers")}
    print(f"fused_vs_unfused={ratio['unfused']:.3f} fused_vs_hf={ratio['transformers']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
