"""One full training step (forward + backward + AdamW) of a preset: ours vs transformers' DeepseekV2ForCausalLM
built from the same config, the same weights and the same tokens.

transformers 5.x runs the routed experts through `experts_implementation`: `eager` (a Python loop over the
experts hit), `grouped_mm` (torch's grouped GEMM over tokens sorted by expert; the default whenever the model
supports it, CPU included) and `batched_mm` (one gathered weight matrix per (token, expert) pair). The default
is read from transformers itself and labelled in the output. Every variant is timed, alternating step by step
in one process (the order rotates each round) so slow phases of the machine hit all alike; the speedup is
reported against the fastest. Both sides run fp32 in train mode, the same fused torch AdamW and the same loss
code, so differences are the models'. Our balance losses are off (transformers' forward computes none); the
first-step losses must agree, and so must the losses after the last step (the same number of identical
updates: that checks gradients and optimizer too).

Peak memory is measured in a separate pass (see `peak_step_memory_mib`).

--dtype bf16 runs every variant's forward and loss under CPU autocast (bf16; the fp32 weights, gradients and
AdamW states as in the trainer's `precision=bf16` without FSDP). bf16 is measured only on a CPU whose bf16 GEMMs
are at least as fast as fp32 (AMX or AVX512-BF16, `machine.bf16_gemms_fast`); on others (AVX2 only) the script
says so and measures fp32. After the timing, one more step of our fastest variant and of the fastest
transformers variant runs under torch.profiler: `gemm_attention_share` is the share of that step's CPU time
(self time of every op, summed) spent in GEMMs (aten::mm, bmm, addmm, baddbmm, _grouped_mm) and in SDPA's
kernels, forward and backward.

With --compile, a second variant of ours runs each block under torch.compile, as `parallel.compile=true`
does in the trainer (the routed-expert grouped GEMMs stay eager); it is timed in the same rotation.

    python bench/model_step.py [--preset small] [--batch 4] [--seq-len 256] [--steps 6] [--warmup 2] [--compile]
                               [--dtype fp32|bf16]
Last line: speedup_vs_hf=<our fastest variant's tokens/s / fastest transformers variant's tokens/s>.

Timings need an otherwise idle machine: with default (all-core) threading, every parallel region waits for
the slowest thread, so under competing load an op costs about one scheduler time slice whatever its size and
implementations with many small ops look worse than they are. The output says how much CPU other processes
took during the timing.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import Transformer, load_preset  # noqa: E402
from train.hf.format import to_hf  # noqa: E402
from parallel.recompute import apply_compile  # noqa: E402
from machine import bf16_gemms_fast, describe  # noqa: E402  (bench/, beside this file)

# `batched_mm` is not timed by default: it gathers the weights of every (token, expert) pair and keeps them for
# backward, [4096, 512, 512] + [4096, 512, 256] fp32 = 6 GiB per MoE layer, 42 GiB for the `small` preset at
# batch 4 x 256; it targets small decode batches. Add it with --variants grouped_mm eager batched_mm.
DEFAULT_VARIANTS = ("grouped_mm", "eager")
LOSS_RTOL = {"fp32": 1e-3, "bf16": 1e-2}  # bf16: the two models round their activations at different places
GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_grouped_mm")
OURS = ("ours", "ours_compiled")

Step = Callable[[], float]


# --------------------------------------------------------------------------------------------- models
def build_ours(preset: str) -> Transformer:
    torch.manual_seed(0)
    cfg = load_preset(preset).replace(aux_loss_alpha=0.0, device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0,
                                      seq_aux_loss_alpha=0.0)
    return Transformer(cfg).train()


def build(name: str, preset: str, weights_dir: str) -> tuple[torch.nn.Module, Callable]:
    """(model, tokens -> logits) for 'ours' or a transformers experts implementation, from the same weights."""
    if name in OURS:
        model = build_ours(preset)
        if name == "ours_compiled":
            apply_compile(model)
        return model, model
    import transformers
    from transformers import DeepseekV2ForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = DeepseekV2ForCausalLM.from_pretrained(weights_dir, attn_implementation="sdpa",
                                                  experts_implementation=name, dtype=torch.float32).train()
    # use_cache=False: a training forward; the default (config.use_cache) would fill a KV cache every step
    return model, lambda tokens: model(tokens, use_cache=False).logits


def hf_default_experts(weights_dir: str) -> str:
    """The experts implementation transformers picks when none is requested (built on meta: no weights)."""
    from transformers import AutoConfig, DeepseekV2ForCausalLM

    with torch.device("meta"):
        return DeepseekV2ForCausalLM(AutoConfig.from_pretrained(weights_dir)).config._experts_implementation


def make_tokens(vocab_size: int, batch: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1))


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def make_step(model: torch.nn.Module, logits_fn: Callable, tokens: torch.Tensor, dtype: str = "fp32") -> Step:
    """A closure running one training step on `tokens` [B, T+1] (next-token cross-entropy), returning the loss;
    dtype bf16: forward and loss under autocast."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step() -> float:
        with autocast(dtype):
            logits = logits_fn(tokens[:, :-1])  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


# --------------------------------------------------------------------------------------------- timing
def time_alternating(steps: dict[str, Step], warmup: int, n: int) -> tuple[dict, dict, dict]:
    """Run every variant warmup + n steps, interleaved. -> (step times, first-step loss, last-step loss)."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    first, last = {}, {}
    for i in range(warmup + n):
        for name in names[i % len(names):] + names[: i % len(names)]:  # rotate: no variant always goes first
            t = time.perf_counter()
            last[name] = steps[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
            first.setdefault(name, last[name])
    return times, first, last


def _machine_busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (/proc/stat: everything but idle and iowait)."""
    jiffies = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK")


def others_cpu_share(run: Callable[[], object]) -> tuple[object, float]:
    """run() and the share of this machine's CPU capacity that other processes used meanwhile."""
    busy, own, wall = _machine_busy_seconds(), sum(os.times()[:2]), time.perf_counter()
    result = run()
    others = (_machine_busy_seconds() - busy) - (sum(os.times()[:2]) - own)
    return result, max(others, 0.0) / ((time.perf_counter() - wall) * os.cpu_count())


def gemm_attention_share(step: Step) -> float:
    """The share of one step's CPU time (the self time of every profiled op, summed) in GEMMs and SDPA kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    core = sum(e.self_cpu_time_total for e in events
               if e.key in GEMM_OPS or "scaled_dot_product" in e.key or "flash_attention" in e.key)
    return core / total


# --------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _peak_memory_child(name: str, preset: str, weights_dir: str, batch: int, seq_len: int, dtype: str) -> float:
    model, logits_fn = build(name, preset, weights_dir)
    step = make_step(model, logits_fn, make_tokens(load_preset(preset).vocab_size, batch, seq_len), dtype)
    with torch.no_grad():  # transformers keeps some weights as views of the mmapped checkpoint: fault them in
        for p in model.parameters():
            p.sum()
    base = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's RSS high-water mark (VmHWM) to VmRSS
    step()  # AdamW creates its states here, after the activations are freed
    step()  # ... so the peak (states + activations + gradients) comes in the second step
    return (_proc_status_kib("VmHWM") - base) / 1024


def peak_step_memory_mib(names: list[str], preset: str, weights_dir: str, batch: int, seq_len: int,
                         dtype: str = "fp32") -> dict:
    """Per variant: the RSS high-water mark over two training steps minus the RSS of the built model (MiB), i.e.
    gradients + AdamW states + activations + temporaries.

    Why this way: CPU tensors have no allocator statistics like CUDA's, so we read the OS. Each variant runs in
    a fresh child process (spawn), so no variant's heap or peak shows in another's. The high-water mark is
    /proc's VmHWM, reset once the model exists (`clear_refs`), not getrusage's ru_maxrss: that one is
    inherited through fork+exec, so a child would report at least the parent's peak. glibc would keep freed
    heap memory and let a step reuse it unseen; with a 64 KiB mmap threshold every tensor above it is
    mapped and unmapped on its own, so RSS follows live tensor memory (that slows the child, not the timings).
    """
    out = {}
    env_before = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when the child starts
    try:
        for name in names:
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
                out[name] = pool.submit(_peak_memory_child, name, preset, weights_dir, batch, seq_len,
                                       dtype).result()
    finally:
        if env_before is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = env_before
    return out


# --------------------------------------------------------------------------------------------- report
def losses_disagree(losses: dict[str, float], dtype: str = "fp32") -> dict[str, float]:
    ref = losses["ours"]
    return {n: v for n, v in losses.items() if abs(v - ref) > LOSS_RTOL[dtype] * abs(ref)}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (the first is the loss check)")
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                    help="transformers experts_implementation values to time")
    ap.add_argument("--compile", action="store_true", help="also time ours with each block torch.compiled")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: forward and loss under CPU autocast (measured only where bf16 GEMMs are fast)")
    args = ap.parse_args()
    print(describe(), flush=True)
    if args.dtype == "bf16" and not bf16_gemms_fast():
        print("bf16 is not measured on this CPU: its bf16 GEMMs are slower than fp32 (no AMX or AVX512-BF16 "
              "units); measuring fp32", flush=True)
        args.dtype = "fp32"
    if args.steps < 1 or args.warmup < 1:
        raise ValueError(f"--steps and --warmup must be >= 1, got steps={args.steps} warmup={args.warmup}")
    return args


def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_model_step_") as weights_dir:
        to_hf(build_ours(args.preset), weights_dir)
        default = hf_default_experts(weights_dir)
        variants = list(dict.fromkeys(args.variants + [default]))  # the default is always timed
        ours = ["ours"] + (["ours_compiled"] if args.compile else [])
        names = ours + variants
        tokens = make_tokens(load_preset(args.preset).vocab_size, args.batch, args.seq_len)
        steps = {n: make_step(*build(n, args.preset, weights_dir), tokens, args.dtype) for n in names}
        timed, contention = others_cpu_share(lambda: time_alternating(steps, args.warmup, args.steps))
        times, first, last = timed
        tps = {n: args.batch * args.seq_len / statistics.median(times[n]) for n in names}
        fastest = {max(ours, key=tps.get), max(variants, key=tps.get)}
        share = {n: gemm_attention_share(steps[n]) for n in names if n in fastest}
        steps.clear()  # free the timed models before the memory pass
        memory = peak_step_memory_mib(names, args.preset, weights_dir, args.batch, args.seq_len, args.dtype)
    return dict(default=default, ours=ours, variants=variants, times=times, first=first, last=last,
                contention=contention, memory=memory, share=share)


def report(args: argparse.Namespace, r: dict) -> int:
    names = r["ours"] + r["variants"]
    label = {n: n if n in OURS else f"hf[{n}]" for n in names}
    median = {n: statistics.median(r["times"][n]) for n in names}
    tps = {n: args.batch * args.seq_len / median[n] for n in names}
    print(f"preset={args.preset} batch={args.batch} seq_len={args.seq_len} steps={args.steps} warmup={args.warmup} "
          f"threads={torch.get_num_threads()}; {args.dtype}"
          + (" (autocast; fp32 weights, gradients, AdamW)" if args.dtype == "bf16" else "")
          + ", train mode, our balance losses off")
    print(f"transformers {__import__('transformers').__version__} (attention sdpa), experts implementations timed: "
          + ", ".join(f"{v} (transformers' default here)" if v == r["default"] else v for v in r["variants"]))
    print(f"other processes used {r['contention']:.0%} of the CPUs during timing"
          + (": timings are unreliable, rerun on an idle machine" if r["contention"] > 0.05 else ""))
    print("peak = RSS high-water mark over 2 steps minus RSS of the built model (grads + AdamW states + activations)")
    for n in names:
        print(f"{label[n]}: {tps[n]:,.0f} tok/s, median step {median[n]:.3f} s, peak {r['memory'][n]:,.0f} MiB")
    for what, losses in (("first_step_loss", r["first"]), (f"loss_after_{args.warmup + args.steps}_steps", r["last"])):
        print(what + " " + " ".join(f"{label[n]}={losses[n]:.6f}" for n in names))
        bad = losses_disagree(losses, args.dtype)
        if bad:
            print(f"{what} disagrees with ours by more than {LOSS_RTOL[args.dtype]:g} relative: "
                  f"{', '.join(label[n] for n in bad)}")
            return 1
    fastest = max(r["variants"], key=lambda n: tps[n])
    best = max(r["ours"], key=lambda n: tps[n])
    print(f"fastest transformers variant: {fastest}; our fastest: {best}")
    for n in r["ours"]:
        print(f"{n}_vs_hf={tps[n] / tps[fastest]:.2f}")
    print("gemm_attention_share (GEMMs + SDPA, of one profiled step's CPU time): "
          + ", ".join(f"{label[n]}={v:.0%}" for n, v in r["share"].items()))
    print(f"speedup_vs_hf={tps[best] / tps[fastest]:.2f}")
    return 0


def main() -> int:
    args = parse_args()
    if args.compile:  # compile in this process: worker processes would count as other load in the timing
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    return report(args, measure(args))


if __name__ == "__main__":
    sys.exit(main())
