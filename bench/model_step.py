"""One full training step (forward + backward + AdamW) of a preset: ours vs transformers' DeepseekV2ForCausalLM
built from the same config and the same weights, on the same tokens.

transformers 5.x offers several routed-expert implementations (`experts_implementation`): `eager` (a Python
loop over the experts hit), `batched_mm` and `grouped_mm` (the default when torch has grouped GEMM). Every
variant is timed, alternating step by step in one process so machine noise hits all alike; the speedup is
reported against the fastest. Both sides use the same fused torch AdamW, so differences are the model's.
Our balance losses are switched off (transformers computes none in a plain forward) so the losses compare.

Peak memory is measured in a separate pass, each variant in its own child process (ru_maxrss is
per-process): the growth of the peak RSS over two training steps from a baseline taken once the model and
optimizer exist, i.e. activations, gradients and optimizer states.

    python bench/model_step.py [--preset small] [--batch 4] [--seq-len 256] [--steps 5]
Last line: speedup_vs_hf=<ours tokens/s / fastest transformers tokens/s>.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import Transformer, load_preset  # noqa: E402
from model.hf import to_hf  # noqa: E402

# `batched_mm` is left out by default: it gathers one expert weight matrix per (token, expert) pair, ~16 GB
# for the `small` preset at batch 4 x 256 (it was killed by the OOM killer on a 24 GB machine); it targets
# small decode batches. Pass --variants grouped_mm batched_mm eager to include it anyway.
HF_VARIANTS = ["grouped_mm", "eager"]


def build(name: str, preset: str, weights_dir: str):
    """(model, logits_fn) for 'ours' or an HF experts implementation, all from the same weights."""
    if name == "ours":
        torch.manual_seed(0)
        cfg = load_preset(preset).replace(aux_loss_alpha=0.0, device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0)
        model = Transformer(cfg)
        return model.train(), model
    from transformers import DeepseekV2ForCausalLM

    model = DeepseekV2ForCausalLM.from_pretrained(weights_dir, attn_implementation="sdpa", experts_implementation=name,
                                                  dtype=torch.float32)
    return model.train(), lambda tokens: model(tokens).logits


def make_step(model, logits_fn, tokens):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step() -> float:
        logits = logits_fn(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def write_weights(preset: str, directory: str) -> None:
    model, _ = build("ours", preset, directory)
    to_hf(model, directory)


def peak_memory_child(name: str, preset: str, weights_dir: str, batch: int, seq_len: int, queue) -> None:
    tokens = torch.randint(0, load_preset(preset).vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1))
    model, fn = build(name, preset, weights_dir)
    step = make_step(model, fn, tokens)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    step()
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)  # KiB -> MiB


def measure_memory(names, args, weights_dir) -> dict[str, float]:
    # glibc keeps freed heap memory, which would hide a step's allocations inside the peak reached while
    # building the model; with a low mmap threshold every tensor above 64 KiB is mapped and unmapped on
    # its own, so the peak RSS tracks live tensor memory
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    ctx = mp.get_context("spawn")
    out = {}
    for name in names:
        q = ctx.Queue()
        p = ctx.Process(target=peak_memory_child, args=(name, args.preset, weights_dir, args.batch, args.seq_len, q))
        p.start()
        out[name] = q.get()
        p.join()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=HF_VARIANTS)
    args = ap.parse_args()

    weights_dir = tempfile.mkdtemp(prefix="bench_model_step_")
    write_weights(args.preset, weights_dir)
    names = ["ours"] + args.variants
    tokens = torch.randint(0, load_preset(args.preset).vocab_size, (args.batch, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(1))
    steps = {n: make_step(*build(n, args.preset, weights_dir), tokens) for n in names}
    first_loss = {n: steps[n]() for n in names}  # the first step: same weights, same tokens
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.warmup - 1 + args.steps):
        for n in names:  # alternate so slow phases of the machine hit every variant
            t = time.perf_counter()
            steps[n]()
            if i >= args.warmup - 1:
                times[n].append(time.perf_counter() - t)
    memory = measure_memory(names, args, weights_dir)

    tokens_per_step = args.batch * args.seq_len
    tps = {n: tokens_per_step / statistics.median(times[n]) for n in names}
    print(f"preset={args.preset} batch={args.batch} seq_len={args.seq_len} steps={args.steps} threads={torch.get_num_threads()}")
    for n in names:
        label = "ours" if n == "ours" else f"hf[{n}]"
        print(f"{label}: {tps[n]:,.0f} tok/s, median step {statistics.median(times[n]):.3f} s, "
              f"peak +{memory[n]:.0f} MiB, first-step loss {first_loss[n]:.6f}")
    ref = first_loss["ours"]
    bad = {n: v for n, v in first_loss.items() if abs(v - ref) > 1e-3 * abs(ref)}
    if bad:
        print(f"first-step losses differ from ours ({ref}): {bad}")
        return 1
    fastest = max(args.variants, key=lambda n: tps[n])
    print(f"fastest transformers variant: {fastest}")
    print(f"speedup_vs_hf={tps['ours'] / tps[fastest]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
